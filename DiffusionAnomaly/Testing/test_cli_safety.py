"""The command line never destroys an input, never leaves a partial result, and refuses nonsense before any work."""

from __future__ import annotations

import hashlib
from pathlib import Path

import nibabel
import numpy as np
import pytest
import SimpleITK as sitk

from DiffusionAnomalyLib.cli import main
from DiffusionAnomalyLib.imageio import Geometry, check_output_paths, write_images

from conftest import brain_phantom, write_image


@pytest.fixture
def study(tmp_path: Path):
    """A two-channel study (T1, FLAIR) in its own folder, and an empty output folder."""
    arrays, _ = brain_phantom(lesion_centre=(6, 10, 9))
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    paths = [write_image(array, inputs / f"case_{name}.nii.gz") for array, name in zip(arrays, ("t1", "flair"))]
    out = tmp_path / "out"
    out.mkdir()
    return paths, out


def _digest(folder: Path) -> dict:
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def _detect(tiny_bundle, inputs, *options) -> int:
    return main(["detect", *map(str, inputs), "--model", str(tiny_bundle), "--device", "cpu", *map(str, options)])


def _bad_input_kinds(paths, out, tmp_path):
    t1, flair = paths
    nan_nifti = tmp_path / "inputs" / "nan_flair.nii.gz"
    data = sitk.GetArrayFromImage(sitk.ReadImage(str(flair))).astype(np.float32)
    data[5, 5, 5] = np.nan
    nibabel.save(nibabel.Nifti1Image(np.transpose(data, (2, 1, 0)), np.eye(4)), str(nan_nifti))
    not_an_image = tmp_path / "inputs" / "report.nii.gz"
    not_an_image.write_text("a radiology report", encoding="utf-8")
    a_file = out / "a_file"
    a_file.write_text("x", encoding="utf-8")
    link = out / "link_to_flair.nii.gz"
    link.symlink_to(flair)
    good = ["--output-map", out / "map.nii.gz"]
    return {
        "map onto an input": ([t1, flair], ["--output-map", flair], "is the input"),
        "mask onto an input": ([t1, flair], [*good, "--output-mask", t1], "is the input"),
        "map onto an input through a link": ([t1, flair], ["--output-map", link], "is the input"),
        "map and mask on one path": ([t1, flair], [*good, "--output-mask", out / "map.nii.gz"], "two outputs would be written"),
        "healthy file onto the map": ([t1, flair], ["--output-map", out / "h_T1.nii.gz", "--output-healthy", out / "h.nii.gz"], "two outputs"),
        "output folder missing": ([t1, flair], ["--output-map", out / "missing" / "map.nii.gz"], "does not exist"),
        "output folder is a file": ([t1, flair], ["--output-map", a_file / "map.nii.gz"], "is a file, not a folder"),
        "output is a folder": ([t1, flair], ["--output-map", out], "has no image extension"),
        "unknown output extension": ([t1, flair], ["--output-map", out / "map.png"], "has no image extension"),
        "output where nothing can be written": ([t1, flair], ["--output-map", "/proc/map.nii.gz"], "does not let this user create files"),
        "NaN voxels in a NIfTI file": ([t1, nan_nifti], good, "contains NaN"),
        "not an image": ([t1, not_an_image], good, "cannot read report.nii.gz as an image"),
        "missing input": ([t1, tmp_path / "nowhere.nii.gz"], good, "does not exist"),
        "too few inputs": ([t1], good, "expects 2 input volume(s)"),
        "threshold above the map's range": ([t1, flair], [*good, "--threshold", "5"], "at most 2"),
        "negative threshold": ([t1, flair], [*good, "--threshold", "-1"], "above 0"),
        "NaN threshold": ([t1, flair], [*good, "--threshold", "nan"], "finite"),
        "batch size 0": ([t1, flair], [*good, "--batch-size", "0"], "batch size must be a whole number from 1"),
        "negative component size": ([t1, flair], [*good, "--min-component-voxels", "-5"], "from 0"),
        "too few steps": ([t1, flair], [*good, "--steps", "2"], "steps must be a whole number from 4 to 1000, got 2"),
        "noise level above 1": ([t1, flair], [*good, "--noise-level", "1.5"], "noise level must be a number from 0.01 to 1"),
        "infinite guidance": ([t1, flair], [*good, "--guidance-scale", "inf"], "finite"),
    }


def test_every_bad_input_kind_is_refused_in_one_line_with_nothing_written(tiny_bundle, study, tmp_path, capsys):
    paths, out = study
    kinds = _bad_input_kinds(paths, out, tmp_path)
    refused = []
    for kind, (inputs, options, message) in kinds.items():
        inputs_before, outputs_before = _digest(tmp_path / "inputs"), _digest(out)
        code = _detect(tiny_bundle, inputs, *options)
        error = capsys.readouterr().err.strip()
        clean = (code == 2 and message in error and len(error.splitlines()) == 1
                 and _digest(tmp_path / "inputs") == inputs_before and _digest(out) == outputs_before)
        if clean:
            refused.append(kind)
        else:
            print(f"{kind}: exit {code}, {error!r}")
    print(f"\nthe CLI refused {len(refused)} of {len(kinds)} bad-input kinds cleanly")
    assert refused == list(kinds)


def test_outputs_appear_together_or_not_at_all(tmp_path):
    existing = tmp_path / "map.nii.gz"
    existing.write_bytes(b"the previous map")
    good = np.ones((3, 4, 5), np.float32)
    with pytest.raises(OSError):  # the second output's folder refuses new files
        write_images([(good, Geometry.default(3), existing), (good, Geometry.default(3), Path("/proc/diffusion-anomaly-mask.nrrd"))])
    assert existing.read_bytes() == b"the previous map", "a failed write keeps the old file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map.nii.gz"], "and leaves no temporary file"

    write_images([(good, Geometry.default(3), existing), (good, Geometry.default(3), tmp_path / "mask.nrrd")])
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(existing))).shape == (3, 4, 5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map.nii.gz", "mask.nrrd"]


def test_an_existing_output_that_is_not_an_input_is_replaced(tmp_path):
    source = write_image(np.ones((3, 4, 5), np.float32), tmp_path / "t1.nii.gz")
    check_output_paths([tmp_path / "old_map.nii.gz"], [source])
    (tmp_path / "old_map.nii.gz").write_bytes(b"old")
    check_output_paths([tmp_path / "old_map.nii.gz"], [source])


def test_four_2d_channels_give_2d_outputs_on_the_input_grid(tmp_path):
    from DiffusionAnomalyLib import resources

    paths = []
    for source, name in zip(resources.sample_channels(), ("t1", "t1ce", "t2", "flair")):
        plane = sitk.ReadImage(str(source))[:, :, 60]
        plane.SetSpacing((0.9, 1.1))
        plane.SetOrigin((10.0, -20.0))
        paths.append(tmp_path / f"slice_{name}.nii.gz")
        sitk.WriteImage(plane, str(paths[-1]))
    out = tmp_path / "map.nii.gz"
    assert main(["detect", *map(str, paths), "--model", str(resources.default_model()), "--device", "cpu", "--output-map", str(out),
                 "--output-mask", str(tmp_path / "mask.nrrd")]) == 0
    written, reference = sitk.ReadImage(str(out)), sitk.ReadImage(str(paths[0]))
    assert written.GetDimension() == 2 and written.GetSize() == reference.GetSize()
    assert written.GetSpacing() == pytest.approx(reference.GetSpacing()) and written.GetOrigin() == pytest.approx(reference.GetOrigin())
    assert sitk.GetArrayFromImage(written).max() > 0


@pytest.mark.parametrize("command", [["diffusion-anomaly", "detect", "--help"], ["diffusion-anomaly-web", "--help"]])
def test_help_prints_on_an_ascii_terminal(command):
    """A server or CI runner with the C locale: the help, with symbols such as s·t/L, still prints."""
    import os
    import subprocess

    ascii_terminal = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    shown = subprocess.run(command, capture_output=True, env=ascii_terminal, timeout=120)
    assert shown.returncode == 0, shown.stderr.decode(errors="replace")[-500:]
    assert b"usage:" in shown.stdout


@pytest.mark.parametrize("command", ["evaluate", "calibrate"])
@pytest.mark.parametrize("option, value, message", [("--limit", "-1", "--limit must be at least 1"), ("--limit", "0", "--limit must be at least 1"),
                                                     ("--slice-step", "0", "--slice-step must be at least 1")])
def test_cohort_options_out_of_range_are_refused_before_any_work(tiny_bundle, tmp_path, capsys, command, option, value, message):
    card = tiny_bundle / "card.json"
    before = card.read_bytes()
    # No data folder at all: the option is refused before the model or the data is read.
    assert main([command, "--model", str(tiny_bundle), "--data", str(tmp_path / "nowhere"), option, value]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1
    assert card.read_bytes() == before
