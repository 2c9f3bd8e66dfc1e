"""Studies as clinics have them: heads with the skull, DICOM series, a single sequence, thick slices."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from DiffusionAnomalyLib import resources
from DiffusionAnomalyLib.brain import extract_brain, find_brain, looks_skull_stripped
from DiffusionAnomalyLib.bundle import save_bundle
from DiffusionAnomalyLib.cli import main
from DiffusionAnomalyLib.detector import AnomalyDetector
from DiffusionAnomalyLib.imageio import Geometry, read_image
from DiffusionAnomalyLib.networks import build_classifier, build_unet
from DiffusionAnomalyLib.sequences import choose_model, guess_sequence
from DiffusionAnomalyLib.settings import DetectionSettings
from DiffusionAnomalyLib.synth_anatomy import MRICRON_TEMPLATES

from conftest import brain_phantom, tiny_card

COLIN27 = MRICRON_TEMPLATES / "ch2.nii.gz"
needs_colin27 = pytest.mark.skipif(not COLIN27.is_file(), reason="Colin27 comes with Debian's mricron-data (apt-get install mricron-data)")


def write_dicom_series(image: sitk.Image, folder: Path, description: str, series_uid: str) -> Path:
    """One DICOM file per axial slice, with the tags a series reader sorts and places them by."""
    folder.mkdir(parents=True, exist_ok=True)
    image = sitk.Cast(image, sitk.sitkInt16)
    d = image.GetDirection()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        plane = image[:, :, k]
        for tag, value in (("0008|0060", "MR"), ("0020|000d", "1.2.826.0.1.3680043.2.1125.7"), ("0020|000e", series_uid),
                           ("0008|103e", description), ("0020|0037", "\\".join(str(v) for v in (d[0], d[3], d[6], d[1], d[4], d[7]))),
                           ("0020|0032", "\\".join(str(v) for v in image.TransformIndexToPhysicalPoint((0, 0, k)))),
                           ("0020|0013", str(k + 1)), ("0018|0050", str(image.GetSpacing()[2]))):
            plane.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{series_uid[-4:]}_{k:03d}.dcm"))
        writer.Execute(plane)
    return folder


# -- sequences and models --------------------------------------------------------------------

def test_sequences_are_recognised_from_clinical_names():
    names = {"AX_FLAIR": "FLAIR", "t2_tse_tra": "T2", "T1_MPRAGE_POST_GD": "T1ce", "sub-01_T1w": "T1", "BraTS-GLI-00001-000-t2f": "FLAIR",
             "BraTS-GLI-00001-000-t1c": "T1ce", "BraTS-GLI-00001-000-t1n": "T1", "BraTS-GLI-00001-000-t2w": "T2", "localizer": None}
    assert {name: guess_sequence(name) for name in names} == names


def test_the_model_that_fits_the_sequences_is_chosen():
    models = {"four": ("T1", "T1ce", "T2", "FLAIR"), "flair": ("FLAIR",), "t1ce": ("T1ce",)}
    assert choose_model(["FLAIR"], models) == ("flair", [0])
    assert choose_model(["T1ce"], models) == ("t1ce", [0])
    assert choose_model(["FLAIR", "T2", "T1ce", "T1"], models) == ("four", [3, 2, 1, 0])
    with pytest.raises(ValueError, match="no model fits the sequences given \\(T2\\)"):
        choose_model(["T2"], models)


@pytest.fixture
def two_models(tmp_path, monkeypatch) -> Path:
    """Bundled models for (T1, FLAIR) and FLAIR alone, as the product would ship them."""
    folder = tmp_path / "Models"
    torch.manual_seed(0)
    for name, channels in (("tiny-t1-flair", ("T1", "FLAIR")), ("tiny-flair", ("FLAIR",))):
        card = tiny_card(channels=channels, brain_mask="none")
        card.name = name
        save_bundle(folder / name, card, build_unet(card), build_classifier(card))
    monkeypatch.setattr(resources, "MODELS", folder)
    monkeypatch.setattr(resources, "DEFAULT_MODEL_NAME", "tiny-t1-flair")
    return folder


def test_detect_picks_the_bundled_model_for_a_flair_alone_and_says_which(two_models, tmp_path, capsys):
    arrays, _ = brain_phantom(lesion_centre=(6, 10, 9))
    flair = tmp_path / "case_FLAIR.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(arrays[1]), str(flair))
    assert main(["detect", str(flair), "--output-map", str(tmp_path / "map.nii.gz"), "--device", "cpu"]) == 0
    assert "model tiny-flair (FLAIR)" in capsys.readouterr().out
    t1 = tmp_path / "other.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(arrays[0]), str(t1))
    # Names that say nothing: the user names the sequences, in any order.
    assert main(["detect", str(flair), str(t1), "--sequences", "FLAIR,T1", "--output-map", str(tmp_path / "map2.nii.gz"), "--device", "cpu"]) == 0
    assert "model tiny-t1-flair (T1, FLAIR)" in capsys.readouterr().out
    assert main(["detect", str(t1), "--sequences", "T2", "--output-map", str(tmp_path / "map3.nii.gz")]) == 2
    assert "no model fits the sequences given (T2)" in capsys.readouterr().err


# -- DICOM -------------------------------------------------------------------------------------

def test_a_dicom_series_folder_is_an_input_and_the_outputs_keep_its_geometry(tiny_bundle, tmp_path):
    arrays, _ = brain_phantom(lesion_centre=(6, 10, 9))
    folders = []
    for array, name in zip(arrays, ("T1", "FLAIR")):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((0.9, 0.9, 5.0))
        image.SetOrigin((-10.0, 20.0, -30.0))
        folders.append(write_dicom_series(image, tmp_path / f"series_{name}", f"AX {name}", f"1.2.826.0.1.3680043.2.1125.{len(folders) + 10}"))
    out = tmp_path / "map.nrrd"
    assert main(["detect", *map(str, folders), "--model", str(tiny_bundle), "--brain-mask", "none", "--output-map", str(out), "--device", "cpu"]) == 0
    written, series = sitk.ReadImage(str(out)), read_image(folders[0])
    assert written.GetSize() == series.GetSize() == (18, 20, 12)
    assert written.GetSpacing() == pytest.approx((0.9, 0.9, 5.0)) and written.GetOrigin() == pytest.approx(series.GetOrigin())


def test_a_folder_with_two_series_is_refused_naming_them(tmp_path, capsys, tiny_bundle):
    arrays, _ = brain_phantom()
    folder = tmp_path / "study"
    write_dicom_series(sitk.GetImageFromArray(arrays[0]), folder, "AX T1", "1.2.826.0.1.3680043.2.1125.21")
    write_dicom_series(sitk.GetImageFromArray(arrays[1]), folder, "AX FLAIR", "1.2.826.0.1.3680043.2.1125.22")
    assert main(["detect", str(folder), str(folder), "--model", str(tiny_bundle), "--output-map", str(tmp_path / "m.nii.gz")]) == 2
    error = capsys.readouterr().err
    assert "holds 2 DICOM series" in error and "AX T1" in error and "AX FLAIR" in error and len(error.strip().splitlines()) == 1


# -- brain extraction ----------------------------------------------------------------------------

def _colin27_head():
    image = read_image(COLIN27)
    brain = sitk.GetArrayFromImage(sitk.Resample(read_image(MRICRON_TEMPLATES / "ch2bet.nii.gz"), image)) > 0
    return sitk.GetArrayFromImage(image).astype(np.float32)[np.newaxis], Geometry.of(image), brain


def test_skull_stripped_inputs_are_recognised_and_heads_are_not():
    sample = np.stack([sitk.GetArrayFromImage(read_image(p)) for p in resources.sample_channels()]).astype(np.float32)
    assert looks_skull_stripped(sample, Geometry.of(read_image(resources.sample_channels()[0])))
    if COLIN27.is_file():
        head, geometry, _ = _colin27_head()
        assert not looks_skull_stripped(head, geometry)


@needs_colin27
def test_brain_extraction_finds_the_brain_of_a_real_head():
    head, geometry, truth = _colin27_head()
    found = extract_brain(head, geometry, ("T1",))
    dice = 2 * (found.mask & truth).sum() / (found.mask.sum() + truth.sum())
    print(f"\nColin27: brain extraction Dice {dice:.3f} against ch2bet in {found.seconds:.1f} s")
    assert dice > 0.9
    assert find_brain(head, geometry, ("T1",), "auto").source.startswith("extracted by deepbet")


def test_what_is_not_a_head_gets_one_clear_message(tiny_bundle):
    rng = np.random.default_rng(0)
    noise = rng.normal(100, 30, (1, 40, 48, 48)).astype(np.float32)  # a phantom full of noise: no head in it
    with pytest.raises(ValueError, match="does not look like a head MRI"):
        find_brain(noise, Geometry.default(3), ("T1",), "extract")


def test_a_brain_mask_on_another_grid_is_refused(tiny_bundle, tmp_path, capsys):
    arrays, _ = brain_phantom()
    paths = []
    for array, name in zip(arrays, ("t1", "flair")):
        paths.append(tmp_path / f"case_{name}.nii.gz")
        sitk.WriteImage(sitk.GetImageFromArray(array), str(paths[-1]))
    mask = sitk.GetImageFromArray((arrays[0] > 0).astype(np.uint8)[:, :-2])
    sitk.WriteImage(mask, str(tmp_path / "brain.nii.gz"))
    assert main(["detect", *map(str, paths), "--model", str(tiny_bundle), "--brain-mask", str(tmp_path / "brain.nii.gz"),
                 "--output-map", str(tmp_path / "map.nii.gz")]) == 2
    assert "is on another voxel grid than case_t1.nii.gz" in capsys.readouterr().err
    assert not (tmp_path / "map.nii.gz").exists()


@needs_colin27
def test_nothing_is_flagged_outside_the_brain_of_a_head_with_its_skull(tiny_bundle, tmp_path):
    from DiffusionAnomalyLib import synth
    from DiffusionAnomalyLib.synth_domains import DOMAINS

    subject = synth.make_subject(3, True, anatomy="colin27", acquisition=DOMAINS["skull"], spacing_mm=3.0)
    folder = synth.write_subject(subject, tmp_path, sequences=("t1", "flair"))
    inputs = [folder / f"{subject.name}_{s}.nii.gz" for s in ("t1", "flair")]
    detector = AnomalyDetector.from_bundle(tiny_bundle, device="cpu")
    result = detector.detect([read_image(p) for p in inputs], settings=DetectionSettings(threshold="calibrated"))
    truth = subject.brain_mask
    assert result.brain_source.startswith("extracted by deepbet")
    brain = result.brain_mask.astype(bool)
    assert 2 * (brain & truth).sum() / (brain.sum() + truth.sum()) > 0.85, "the brain found is the head's brain"
    assert not (result.mask.astype(bool) & ~brain).any(), "nothing is flagged outside the brain"
    assert not (result.anomaly_map[~brain] > 0).any()
    assert (result.anomaly_map[brain] > 0).mean() > 0.9, "the brain inside the skull was translated"
