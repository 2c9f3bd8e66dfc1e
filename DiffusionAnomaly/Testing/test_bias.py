"""Bias-field correction: the coil's shading is taken out before detection and put back into the healthy translation."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from DiffusionAnomalyLib import bias
from DiffusionAnomalyLib.bias import correct_bias
from DiffusionAnomalyLib.cli import main
from DiffusionAnomalyLib.detector import AnomalyDetector
from DiffusionAnomalyLib.imageio import Geometry
from DiffusionAnomalyLib.settings import DetectionSettings

from conftest import brain_phantom, write_image

SPACING = Geometry((2.0, 2.0, 2.0))


def shaded_phantom(strength: float = 0.45, lesion_centre=(20, 28, 14)):
    """A two-sequence phantom (with a lesion unless ``lesion_centre`` is None), shaded by a smooth field from 0.6 to 1.6 times."""
    arrays, lesion = brain_phantom(shape=(40, 56, 48), lesion_centre=lesion_centre, lesion_radius=6, channels=2)
    k, j, i = np.meshgrid(*(np.linspace(-1, 1, n) for n in lesion.shape), indexing="ij")
    field = np.exp(strength * i + 0.2 * j).astype(np.float32)
    return arrays, arrays * field, field, lesion, i


def test_n4_takes_out_the_shading_and_keeps_the_lesion_contrast():
    arrays, shaded, field, lesion, i = shaded_phantom()
    brain = arrays[0] > 0
    tissue = brain & ~lesion
    right, left = tissue & (i > 0.4), tissue & (i < -0.4)
    corrected = correct_bias(shaded, brain, SPACING, ["T1", "FLAIR"])
    for channel in range(2):
        before = np.median(shaded[channel][right]) / np.median(shaded[channel][left])
        after = np.median(corrected.corrected[channel][right]) / np.median(corrected.corrected[channel][left])
        assert before > 1.5 and abs(after - 1) < 0.05, f"one side of the brain is {after:.2f} times the other after correction"
        recovered = corrected.fields[channel][brain] / field[brain]
        assert recovered.std() / recovered.mean() < 0.03, "the field found is the field put in (up to its scale)"
        contrast = np.median(corrected.corrected[channel][lesion]) / np.median(corrected.corrected[channel][tissue])
        truth = np.median(arrays[channel][lesion]) / np.median(arrays[channel][tissue])
        assert contrast == pytest.approx(truth, rel=0.03), "the lesion keeps its contrast to the tissue around it"
    assert (corrected.fields[:, ~brain] == 1).all(), "nothing outside the brain is changed"
    assert "N4" in corrected.describe()


def test_detection_with_n4_returns_the_healthy_translation_in_the_input_intensities(tiny_bundle):
    _, shaded, _, _, _ = shaded_phantom(lesion_centre=None)
    detector = AnomalyDetector.from_bundle(tiny_bundle, device="cpu")
    settings = DetectionSettings(brain_mask="none", threshold="otsu")
    plain = detector.detect(list(shaded), SPACING, settings.replace(bias_correction="none"))
    corrected = detector.detect(list(shaded), SPACING, settings.replace(bias_correction="n4"))
    assert plain.bias_correction == "none" and corrected.bias_correction.startswith("bias field (N4)")
    outside = ~corrected.foreground.astype(bool)
    for given, healthy in zip(shaded, corrected.healthy):
        np.testing.assert_array_equal(healthy[outside], given[outside])
    # The networks saw the shading-free brain: its intensity range shrinks to the tissue's own texture.
    for channel in range(2):
        spread = [result.intensity_scale.high[channel] / result.intensity_scale.low[channel] for result in (plain, corrected)]
        assert spread[0] > 2 and spread[1] < 1.3
    # A 2D slice has no volume to fit a field over: it is analysed as given.
    single = detector.detect([channel[20] for channel in shaded], settings=settings.replace(bias_correction="n4"))
    assert single.bias_correction == "none"


def test_a_sequence_that_is_not_a_magnitude_image_cannot_be_corrected():
    arrays, _ = brain_phantom(shape=(20, 24, 22), channels=2)
    brain = arrays[0] > 0
    z_scored = (arrays[1] - arrays[1][brain].mean()) / arrays[1][brain].std() * brain
    with pytest.raises(ValueError, match=r"bias correction of FLAIR: [45]\d % of the brain has intensities at or below 0.*'none'"):
        correct_bias(np.stack([arrays[0], z_scored]), brain, SPACING, ["T1", "FLAIR"])


def test_too_small_a_brain_to_fit_a_field_is_refused_with_its_size():
    arrays, _ = brain_phantom(shape=(8, 20, 18), channels=1)
    with pytest.raises(ValueError, match=r"bias correction of T1ce: the brain has only [\d,]+ voxels, too few .*'none'"):
        correct_bias(arrays, arrays[0] > 0, SPACING, ["T1ce"])


def test_bias_correction_must_be_a_known_method(tiny_bundle):
    detector = AnomalyDetector.from_bundle(tiny_bundle, device="cpu")
    with pytest.raises(ValueError, match="bias correction must be one of none, n4"):
        DetectionSettings(bias_correction="retrospective").resolve(detector.card)


def test_detect_on_the_command_line_corrects_the_bias_and_says_so(tiny_bundle, tmp_path, capsys):
    _, shaded, _, _, _ = shaded_phantom()
    inputs = [write_image(channel, tmp_path / f"{name}.nii.gz", spacing=SPACING.spacing) for channel, name in zip(shaded, ("t1", "flair"))]
    code = main(["detect", *map(str, inputs), "--model", str(tiny_bundle), "--brain-mask", "none", "--bias-correction", "n4",
                 "--output-map", str(tmp_path / "map.nii.gz"), "--output-healthy", str(tmp_path / "healthy.nii.gz")])
    assert code == 0
    assert "bias correction: bias field (N4)" in capsys.readouterr().out
    healthy = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "healthy_FLAIR.nii.gz")))
    outside = shaded[1] == 0
    np.testing.assert_array_equal(healthy[outside], 0)
    inside = ~outside
    # In the input's intensities: the healthy translation keeps the scan's shading.
    k, j, i = np.nonzero(inside)
    assert np.median(healthy[k[i > 30], j[i > 30], i[i > 30]]) > 1.3 * np.median(healthy[k[i < 17], j[i < 17], i[i < 17]])


def test_a_second_look_at_the_same_volume_reuses_its_field_and_an_edit_refits_it(monkeypatch):
    fits = []
    fit = bias.n4_field
    monkeypatch.setattr(bias, "n4_field", lambda *args: fits.append(args[3]) or fit(*args))
    arrays, shaded, _, _, _ = shaded_phantom(strength=0.5)  # a volume no other test corrected
    brain = arrays[0] > 0
    first = correct_bias(shaded, brain, SPACING, ["T1", "FLAIR"])
    again = correct_bias(shaded.copy(), brain, SPACING, ["T1", "FLAIR"])
    assert fits == ["T1", "FLAIR"], "the same volume again (e.g. the next preview) is not fitted again"
    np.testing.assert_array_equal(again.fields, first.fields)
    edited = shaded.copy()
    edited[1] *= np.float32(2.0)  # e.g. the FLAIR volume replaced or rescaled in the scene
    refitted = correct_bias(edited, brain, SPACING, ["T1", "FLAIR"])
    assert fits == ["T1", "FLAIR", "T1", "FLAIR"], "an edited volume is fitted anew"
    np.testing.assert_allclose(refitted.corrected[1], 2 * first.corrected[1], rtol=0.02)


@pytest.mark.parametrize("slices", [8, 3])
def test_a_clinical_thick_slice_stack_is_corrected(slices):
    """256² in plane at 0.9 mm, 6 mm slices: the field is fitted in plane even when the stack is thin."""
    k, j, i = np.meshgrid(np.linspace(-1, 1, slices), np.linspace(-1, 1, 256), np.linspace(-1, 1, 256), indexing="ij")
    brain = (i**2 + j**2 + (0.9 * k) ** 2) < 0.7
    tissue = 100 + np.random.default_rng(0).normal(0, 3, brain.shape)
    shaded = np.where(brain, tissue * np.exp(0.4 * i), 0).astype(np.float32)
    corrected = correct_bias(shaded[np.newaxis], brain, Geometry((0.9, 0.9, 6.0)), ["T1ce"]).corrected[0]
    right, left = brain & (i > 0.4), brain & (i < -0.4)
    assert np.median(shaded[right]) / np.median(shaded[left]) > 1.5
    assert np.median(corrected[right]) / np.median(corrected[left]) == pytest.approx(1.0, abs=0.05)
