"""The whole-volume pipeline: geometry round trips, orientation, the map where the lesion is."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from DiffusionAnomalyLib.detector import REDRAW_MIN_AREA_MM2, AnomalyDetector
from DiffusionAnomalyLib.config import CalibrationConfig
from DiffusionAnomalyLib.thresholds import ScanThreshold, threshold_map
from DiffusionAnomalyLib.imageio import Geometry
from DiffusionAnomalyLib.preprocessing import Orientation
from DiffusionAnomalyLib.settings import DetectionSettings
from DiffusionAnomalyLib.translation import TranslationCancelled

from conftest import AnalyticGaussians, brain_phantom, oblique_direction, tiny_card


def analytic_detector(image_size: int = 24) -> AnomalyDetector:
    """Healthy tissue maps to about −0.75 in the network range; lesions are broad outliers."""
    models = AnalyticGaussians(healthy_mean=-0.75, healthy_std=0.1, diseased_mean=-0.75, diseased_std=1.0)
    card = tiny_card(channels=("T1", "FLAIR"), image_size=image_size, noise_level=0.3, steps=10, guidance_scale=3.0)
    return AnomalyDetector(card, models.eps, models.classifier, "cpu")


def as_images(arrays: np.ndarray, geometry: Geometry):
    return [geometry.applied_to(sitk.GetImageFromArray(a)) for a in arrays]


def test_orientation_and_axial_pixel_area_match_dicom_orient_for_oblique_and_permuted_grids():
    array = np.random.default_rng(0).random((5, 6, 7))
    for direction in (oblique_direction(), (0, 0, 1, 1, 0, 0, 0, -1, 0), (-1, 0, 0, 0, 0, -1, 0, 1, 0)):
        image = sitk.GetImageFromArray(array)
        image.SetDirection(direction)
        image.SetSpacing((0.5, 2.0, 3.0))
        orientation = Orientation.from_direction(direction)
        oriented = sitk.DICOMOrient(image, "LPS")
        expected = sitk.GetArrayFromImage(oriented)
        np.testing.assert_array_equal(orientation.to_canonical(array), expected)
        np.testing.assert_array_equal(orientation.from_canonical(expected), array)
        assert orientation.axial_pixel_area(image.GetSpacing()) == oriented.GetSpacing()[0] * oriented.GetSpacing()[1]


@pytest.mark.parametrize(
    "direction",
    [
        (1, 0, 0, 0, 1, 0, 0, 0, 1),
        oblique_direction(),
        # stored sagittally: index i runs posterior, j inferior (the axial axis is the middle array axis), k right
        (0, 0, -1, 1, 0, 0, 0, -1, 0),
    ],
    ids=["axial", "oblique", "sagittal-stored"],
)
def test_outputs_keep_the_input_geometry_and_the_map_lights_up_at_the_lesion(direction):
    arrays, lesion = brain_phantom(shape=(14, 22, 20), lesion_centre=(6, 9, 12), lesion_radius=3.5)
    geometry = Geometry(spacing=(0.9, 1.1, 2.5), origin=(-10.0, 20.0, 5.5), direction=tuple(float(d) for d in direction))
    detector = analytic_detector()
    # Regions are cut at half their peak within each axial slice, whichever array axis that is.
    detector.card.calibration = CalibrationConfig(slice_floor_mads=3.0, peak_fraction=0.5)
    result = detector.detect(as_images(arrays, geometry), settings=DetectionSettings(threshold="calibrated"))

    assert result.geometry == geometry
    assert result.anomaly_map.shape == arrays.shape[1:] == result.mask.shape
    assert all(h.shape == arrays.shape[1:] for h in result.healthy)
    brain = arrays[0] > 0
    assert (result.anomaly_map[~brain] == 0).all(), "the map is zero outside the foreground"
    assert result.anomaly_map[lesion].mean() > 4 * result.anomaly_map[brain & ~lesion].mean()
    flagged = result.mask.astype(bool)
    assert (flagged & lesion).sum() / flagged.sum() > 0.5, "most flagged voxels are lesion voxels"
    # The healthy translation brings the lesion toward normal tissue, in scanner units.
    assert result.healthy[1][lesion].mean() < arrays[1][lesion].mean() - 20
    # The per-slice calibrated threshold, kept with the map on the input grid, re-cuts the same
    # segmentation there (as the Slicer scene and the web app do when the threshold moves).
    kept = ScanThreshold.from_text(result.calibrated_threshold.to_text())
    recut, _ = threshold_map(result.anomaly_map, result.foreground.astype(bool), "calibrated", calibrated=kept)
    np.testing.assert_array_equal(recut, result.mask)


def test_results_follow_the_voxels_through_any_orientation():
    """The same anatomy stored with permuted and flipped axes gives the same map, voxel for voxel."""
    arrays, _ = brain_phantom(shape=(12, 20, 16), lesion_centre=(5, 8, 10))
    detector = analytic_detector()
    reference = detector.detect(as_images(arrays, Geometry()))
    permuted = np.flip(np.transpose(arrays, (0, 3, 1, 2)), axis=2)  # array (i, k, j), j flipped
    # index axes now: i' = j (flipped, so -P), j' = k (S), k' = i (L)
    geometry = Geometry(direction=(0.0, 0.0, 1.0, -1.0, 0.0, 0.0, 0.0, 1.0, 0.0))
    moved = detector.detect(as_images(np.ascontiguousarray(permuted), geometry))
    back = np.transpose(np.flip(moved.anomaly_map, axis=1), (1, 2, 0))
    np.testing.assert_allclose(back, reference.anomaly_map, atol=1e-5)


def test_numpy_inputs_with_a_geometry_and_real_networks(tiny_bundle):
    detector = AnomalyDetector.from_bundle(tiny_bundle, device="cpu")
    arrays, _ = brain_phantom()
    geometry = Geometry(spacing=(1.0, 1.0, 3.0), origin=(1.0, 2.0, 3.0), direction=oblique_direction())
    result = detector.detect(list(arrays), geometry, DetectionSettings(batch_size=4))
    assert result.geometry == geometry
    assert result.anomaly_map.dtype == np.float32 and np.isfinite(result.anomaly_map).all()
    assert result.mask.dtype == np.uint8 and set(np.unique(result.mask)) <= {0, 1}
    assert result.slices_processed == int((arrays[0] > 0).any(axis=(1, 2)).sum())


def test_a_single_slice_volume_and_a_2d_image_work(tiny_bundle):
    detector = AnomalyDetector.from_bundle(tiny_bundle, device="cpu")
    arrays, _ = brain_phantom(shape=(12, 20, 18))
    one_slice = arrays[:, 6:7]
    result = detector.detect(as_images(one_slice, Geometry(spacing=(1.0, 1.0, 5.0))))
    assert result.anomaly_map.shape == (1, 20, 18) and result.slices_processed == 1

    planes = [sitk.GetImageFromArray(a[6]) for a in arrays]
    for plane in planes:
        plane.SetSpacing((0.5, 0.7))
    flat = detector.detect(planes)
    assert flat.anomaly_map.shape == (20, 18) and flat.mask.shape == (20, 18)


def test_preview_of_chosen_axial_slices_only(tiny_bundle):
    detector = AnomalyDetector.from_bundle(tiny_bundle, device="cpu")
    arrays, _ = brain_phantom()
    result = detector.detect(list(arrays), axial_slices=[6])
    assert result.slices_processed == 1
    others = np.delete(result.anomaly_map, 6, axis=0)
    assert (others == 0).all() and result.anomaly_map[6].max() > 0


def test_progress_covers_all_batches_and_cancel_leaves_no_result(tiny_bundle):
    detector = AnomalyDetector.from_bundle(tiny_bundle, device="cpu")
    arrays, _ = brain_phantom()
    seen = []
    detector.detect(list(arrays), settings=DetectionSettings(batch_size=3, steps=4), progress=lambda d, t: seen.append((d, t)))
    totals = {t for _, t in seen}
    assert len(totals) == 1 and seen[-1][0] == seen[-1][1]
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    with pytest.raises(TranslationCancelled):
        detector.detect(list(arrays), cancel=lambda: True)


def test_map_smoothing_keeps_the_lesion_and_damps_isolated_pixels():
    arrays, lesion = brain_phantom(shape=(14, 22, 20), lesion_centre=(6, 9, 12), lesion_radius=3.5)
    detector = analytic_detector()
    raw = detector.detect(list(arrays), settings=DetectionSettings(map_smoothing=0.0))
    smooth = detector.detect(list(arrays), settings=DetectionSettings(map_smoothing=1.0))
    brain = arrays[0] > 0
    assert smooth.anomaly_map[lesion].mean() > 3 * smooth.anomaly_map[brain & ~lesion].mean()
    assert smooth.anomaly_map[lesion].mean() > 0.5 * raw.anomaly_map[lesion].mean(), "smoothing keeps most of the lesion's signal"
    healthy, _ = brain_phantom(shape=(14, 22, 20))
    inside = healthy[0] > 0
    noisy = detector.detect(list(healthy), settings=DetectionSettings(map_smoothing=0.0)).anomaly_map[inside]
    smoothed = detector.detect(list(healthy), settings=DetectionSettings(map_smoothing=1.0)).anomaly_map[inside]
    assert smoothed.std() < 0.8 * noisy.std() and smoothed.max() < noisy.max(), "pixel noise of healthy tissue is damped"
    with pytest.raises(ValueError, match="map smoothing must be a number from 0 to 10"):
        detector.detect(list(arrays), settings=DetectionSettings(map_smoothing=-1.0))


def test_threshold_choices_and_small_component_removal():
    anomaly = np.zeros((4, 10, 10), dtype=np.float32)
    anomaly[1:3, 2:6, 2:6] = 1.0  # 32-voxel blob
    anomaly[3, 8, 8] = 1.0  # single voxel
    foreground = np.ones_like(anomaly, dtype=bool)
    mask, value = threshold_map(anomaly, foreground, "otsu")
    assert 0 <= value < 1 and mask.sum() == 33
    mask, value = threshold_map(anomaly, foreground, 0.5, min_component_voxels=2)
    assert value == 0.5 and mask.sum() == 32
    mask, _ = threshold_map(np.zeros_like(anomaly), foreground, "otsu")
    assert mask.sum() == 0, "a flat map flags nothing"


def test_maps_averaged_over_noise_levels_report_progress_over_all_of_them(tiny_bundle):
    detector = AnomalyDetector.from_bundle(tiny_bundle, device="cpu")
    arrays, _ = brain_phantom()
    seen = []
    single = detector.detect(list(arrays), settings=DetectionSettings(map_levels=1, noise_level=0.4, steps=4))
    averaged = detector.detect(list(arrays), settings=DetectionSettings(map_levels=2, noise_level=0.4, steps=4),
                               progress=lambda done, total: seen.append((done, total)))
    assert seen[-1][0] == seen[-1][1] and len({total for _, total in seen}) == 1
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert averaged.settings.map_levels == 2 and not np.array_equal(averaged.anomaly_map, single.anomaly_map)
    with pytest.raises(ValueError, match="noise levels averaged must be a whole number from 1 to 8"):
        detector.detect(list(arrays), settings=DetectionSettings(map_levels=9))


def test_a_map_against_the_reconstruction_shows_only_what_guidance_removed():
    arrays, lesion = brain_phantom(shape=(14, 22, 20), lesion_centre=(6, 9, 12), lesion_radius=3.5)
    detector = analytic_detector()
    # At 10 DDIM steps the encoding does not invert exactly, and that error is in the paper's map.
    coarse = DetectionSettings(steps=10)
    against_input = detector.detect(list(arrays), settings=coarse)
    seen = []
    against_reconstruction = detector.detect(list(arrays), settings=coarse.replace(map_reference="reconstruction"),
                                             progress=lambda done, total: seen.append((done, total)))
    brain = arrays[0] > 0
    healthy_tissue = brain & ~lesion
    assert against_reconstruction.anomaly_map[lesion].mean() > 4 * against_reconstruction.anomaly_map[healthy_tissue].mean()
    assert against_reconstruction.anomaly_map[healthy_tissue].mean() < 0.5 * against_input.anomaly_map[healthy_tissue].mean()
    # The healthy image is the input less what guidance changed: healthy tissue as scanned.
    normal = arrays[1][healthy_tissue]
    assert np.abs(against_reconstruction.healthy[1][healthy_tissue] - normal).mean() < np.abs(against_input.healthy[1][healthy_tissue] - normal).mean()
    assert against_reconstruction.healthy[1][lesion].mean() < arrays[1][lesion].mean() - 20
    assert seen[-1][0] == seen[-1][1] and [d for d, _ in seen] == sorted(d for d, _ in seen)
    # Without guidance nothing is removed, so nothing is shown.
    unguided = detector.detect(list(arrays), settings=coarse.replace(map_reference="reconstruction", guidance_scale=0.0))
    assert np.abs(unguided.anomaly_map).max() < 1e-5 and not unguided.mask.any()
    with pytest.raises(ValueError, match="map reference must be one of input, reconstruction"):
        detector.detect(list(arrays), settings=DetectionSettings(map_reference="healthy"))


def test_redrawing_the_segmented_lesion_from_deeper_heals_it_more_and_keeps_the_other_slices():
    radius = 3.5
    arrays, lesion = brain_phantom(shape=(14, 22, 20), lesion_centre=(6, 9, 12), lesion_radius=radius)
    # Voxels large enough that the lesion's middle section is twice the area a region needs to be redrawn.
    side = float(np.sqrt(2 * REDRAW_MIN_AREA_MM2 / (np.pi * radius ** 2)))
    large = Geometry(spacing=(side, side, side))
    detector = analytic_detector()
    detector.card.calibration = CalibrationConfig(slice_floor_mads=3.0, peak_fraction=0.5)
    first = detector.detect(list(arrays), large)
    seen = []
    second = detector.detect(list(arrays), large, DetectionSettings(redraw_noise_level=0.6),
                             progress=lambda done, total: seen.append((done, total)))
    brain = arrays[0] > 0
    normal = arrays[1][brain & ~lesion].mean()
    assert abs(second.healthy[1][lesion].mean() - normal) < abs(first.healthy[1][lesion].mean() - normal), "the lesion is removed further"
    untouched = [k for k in range(arrays.shape[1]) if not first.mask[k].any() and not first.mask[max(k - 1, 0):k + 2].any()]
    assert untouched, "the phantom has slices far from the lesion"
    for k in untouched:
        np.testing.assert_array_equal(second.healthy[1][k], first.healthy[1][k])
        np.testing.assert_array_equal(second.anomaly_map[k], first.anomaly_map[k])
    flagged = second.mask.astype(bool)
    assert (flagged & lesion).sum() / flagged.sum() > 0.5 and (flagged & lesion).sum() >= 0.8 * (first.mask.astype(bool) & lesion).sum()
    assert second.settings.redraw_noise_level == 0.6 and second.slices_redrawn > 0 and first.slices_redrawn == 0
    assert seen[-1][0] == seen[-1][1] and [d for d, _ in seen] == sorted(d for d, _ in seen)

    # A redraw shallower than the first translation (L 0.3 here) is not used, and with nothing
    # segmented there is nothing to redraw: both give the first translation, progress complete.
    shallow = detector.detect(list(arrays), large, DetectionSettings(redraw_noise_level=0.2))
    np.testing.assert_array_equal(shallow.anomaly_map, first.anomaly_map)
    seen.clear()
    nothing = detector.detect(list(arrays), large, DetectionSettings(threshold=2.0, redraw_noise_level=0.6),
                              progress=lambda done, total: seen.append((done, total)))
    assert nothing.slices_redrawn == 0 and seen[-1][0] == seen[-1][1] and len({total for _, total in seen}) == 1
    # The same lesion in 1 mm voxels is small: the first translation already heals it, and it is not redrawn.
    small = detector.detect(list(arrays), settings=DetectionSettings(redraw_noise_level=0.6))
    assert small.mask.any() and small.slices_redrawn == 0
    with pytest.raises(ValueError, match="redraw noise level must be a number from 0 to 1"):
        detector.detect(list(arrays), settings=DetectionSettings(redraw_noise_level=1.5))
