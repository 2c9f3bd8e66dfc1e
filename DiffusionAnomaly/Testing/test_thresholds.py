"""The calibrated threshold: read off each scan, with the constants each model was calibrated with."""

import numpy as np
import pytest

from DiffusionAnomalyLib.config import CalibrationConfig
from DiffusionAnomalyLib.thresholds import (
    FALSE_POSITIVE_LIMIT_PERCENT,
    CalibrationSample,
    ScanThreshold,
    calibrated_threshold,
    choose_calibration,
    score_calibration,
    threshold_map,
)
from DiffusionAnomalyLib.preprocessing import Orientation

SLICES, SIDE = 24, 48


def scan(seed: int, lesion: bool, raised_slices=()) -> CalibrationSample:
    """A canonical map of translation noise; a suspected healthy slice is raised everywhere (guidance changed all of it)."""
    rng = np.random.default_rng(seed)
    anomaly_map = np.abs(rng.normal(0.0, 0.02, (SLICES, SIDE, SIDE))).astype(np.float32)
    analysed = np.zeros(anomaly_map.shape, dtype=bool)
    analysed[:, 4:-4, 4:-4] = True
    truth = np.zeros_like(analysed)
    suspected = np.zeros(SLICES, dtype=bool)
    for index in raised_slices:
        anomaly_map[index] += 0.08
        suspected[index] = True
    if lesion:
        truth[10:14, 20:28, 20:28] = True
        anomaly_map[truth] += 0.25
        suspected[10:14] = True
    return CalibrationSample(anomaly_map * analysed, analysed, truth, not lesion, ~suspected)


def flagged_percent(sample: CalibrationSample, calibration: CalibrationConfig) -> float:
    threshold = calibrated_threshold(sample.anomaly_map, sample.analysed, sample.healthy_slices, calibration)
    mask, _ = threshold_map(sample.anomaly_map, sample.analysed, "calibrated", calibrated=threshold)
    return 100.0 * mask.sum() / sample.analysed.sum()


def test_a_healthy_slice_the_classifier_suspects_is_not_flagged_in_bulk_with_a_slice_floor():
    healthy = scan(0, lesion=False, raised_slices=(3, 4, 5))
    assert flagged_percent(healthy, CalibrationConfig()) > FALSE_POSITIVE_LIMIT_PERCENT, "the failure the slice floor is for"
    assert flagged_percent(healthy, CalibrationConfig(slice_floor_mads=5.0)) <= FALSE_POSITIVE_LIMIT_PERCENT
    diseased = scan(1, lesion=True)
    threshold = calibrated_threshold(diseased.anomaly_map, diseased.analysed, diseased.healthy_slices, CalibrationConfig(slice_floor_mads=5.0))
    assert threshold.floor.shape == (SLICES, 1, 1)
    mask, value = threshold_map(diseased.anomaly_map, diseased.analysed, "calibrated", calibrated=threshold)
    found = (mask.astype(bool) & diseased.lesion).sum() / diseased.lesion.sum()
    assert found > 0.95 and value == pytest.approx(float(np.median(threshold.floor)))


def test_a_preview_slice_through_a_lesion_uses_its_noise_floor_only():
    diseased = scan(2, lesion=True)
    one_slice = np.zeros_like(diseased.analysed)
    one_slice[12] = diseased.analysed[12]
    threshold = calibrated_threshold(diseased.anomaly_map * one_slice, one_slice, np.zeros(SLICES, dtype=bool))
    lesion_values = diseased.anomaly_map[12][diseased.lesion[12]]
    assert float(threshold.floor[12, 0, 0]) < lesion_values.min(), "the lesion is a minority of the slice: the floor stays below it"


def test_calibration_is_chosen_within_half_the_limit_and_needs_both_kinds_of_subject():
    samples = [scan(s, lesion=s % 2 == 0, raised_slices=(3, 4) if s % 2 else ()) for s in range(6)]
    chosen, rows = choose_calibration(samples)
    assert len(rows) > 10
    scores = score_calibration(samples, chosen)
    assert scores["healthy_fp_percent"] <= FALSE_POSITIVE_LIMIT_PERCENT / 2 and scores["pooled_dice"] > 0.9
    assert chosen.slice_floor_mads is not None, "only a slice floor keeps the suspected healthy slices out"
    with pytest.raises(ValueError, match="with and without lesions"):
        choose_calibration([s for s in samples if not s.healthy_subject])


def blurred_lesion_scan(noise: float, seed: int = 0, amplitudes=(0.3, 0.3)) -> CalibrationSample:
    """A map whose lesion is a blurred bump (as the translation's map of a lesion is) on healthy noise,
    one amplitude per axial slice it spans; the truth is the bump's half-maximum extent."""
    rng = np.random.default_rng(seed)
    anomaly_map = np.abs(rng.normal(0.0, noise, (SLICES, SIDE, SIDE))).astype(np.float32)
    analysed = np.zeros(anomaly_map.shape, dtype=bool)
    analysed[:, 4:-4, 4:-4] = True
    rows, columns = np.mgrid[:SIDE, :SIDE]
    bump = np.exp(-((rows - 24.0) ** 2 + (columns - 24.0) ** 2) / (2 * 5.0 ** 2)).astype(np.float32)
    truth = np.zeros_like(analysed)
    for offset, amplitude in enumerate(amplitudes):
        anomaly_map[11 + offset] += amplitude * bump
        truth[11 + offset] = bump > 0.5
    return CalibrationSample(anomaly_map * analysed, analysed, truth, False, ~truth.any(axis=(1, 2)))


def dice(mask: np.ndarray, truth: np.ndarray) -> float:
    return 2.0 * (mask & truth).sum() / (mask.sum() + truth.sum())


def test_a_peak_fraction_outlines_a_lesion_whatever_the_noise():
    """A floor in noise units outlines a blurred lesion wider on a quiet scan than on a noisy one;
    each region cut at half its own peak keeps the lesion's extent on both, and a brighter map
    gives the same outline."""
    floor_only, half_peak = CalibrationConfig(noise_floor_mads=6.0), CalibrationConfig(noise_floor_mads=6.0, peak_fraction=0.5)
    for noise in (0.005, 0.015):
        sample = blurred_lesion_scan(noise)
        cut = calibrated_threshold(sample.anomaly_map, sample.analysed, sample.healthy_slices, half_peak)
        outlined = cut.segment(sample.anomaly_map, sample.analysed)
        assert dice(outlined, sample.lesion) > 0.9, noise
        brighter = calibrated_threshold(2 * sample.anomaly_map, sample.analysed, sample.healthy_slices, half_peak)
        np.testing.assert_array_equal(brighter.segment(2 * sample.anomaly_map, sample.analysed), outlined)
        floor_mask = calibrated_threshold(sample.anomaly_map, sample.analysed, sample.healthy_slices, floor_only).segment(sample.anomaly_map, sample.analysed)
        assert not (outlined & ~floor_mask).any(), "never more than the floor alone"
    quiet = blurred_lesion_scan(0.005)
    wide = calibrated_threshold(quiet.anomaly_map, quiet.analysed, quiet.healthy_slices, floor_only).segment(quiet.anomaly_map, quiet.analysed)
    assert dice(wide, quiet.lesion) < 0.8, "the failure the peak fraction is for"


def test_each_axial_slice_of_a_region_is_cut_at_its_own_peak():
    sample = blurred_lesion_scan(0.005, amplitudes=(0.6, 0.25))
    cut = calibrated_threshold(sample.anomaly_map, sample.analysed, sample.healthy_slices, CalibrationConfig(noise_floor_mads=8.0, peak_fraction=0.5))
    outlined = cut.segment(sample.anomaly_map, sample.analysed)
    for index in (11, 12):
        assert dice(outlined[index], sample.lesion[index]) > 0.9, "the fainter slice keeps its own half maximum"


def test_a_calibrated_threshold_cuts_the_same_voxels_in_any_orientation_and_after_being_kept_as_text():
    sample = blurred_lesion_scan(0.01, amplitudes=(0.6, 0.25))
    cut = calibrated_threshold(sample.anomaly_map, sample.analysed, sample.healthy_slices, CalibrationConfig(noise_floor_mads=8.0, peak_fraction=0.5))
    canonical_mask = cut.segment(sample.anomaly_map, sample.analysed)
    orientation = Orientation(transpose=(2, 0, 1), flip=(True, False, True))
    stored = ScanThreshold.from_text(cut.reoriented(orientation.from_canonical).to_text())
    assert stored.peak_fraction == 0.5 and stored.axial_axis == orientation.transpose[0]
    mask = stored.segment(orientation.from_canonical(sample.anomaly_map), orientation.from_canonical(sample.analysed))
    np.testing.assert_array_equal(mask, orientation.from_canonical(canonical_mask))
    older = ScanThreshold.from_text('{"shape": [1, 7, 1], "values": [0.05, 0.07, 0.1, 0.12, 0.15, 0.17, 0.2]}')
    assert older.peak_fraction is None and older.floor.shape == (1, 7, 1), "scenes saved before peak fractions"
    assert ScanThreshold.from_text("0.0625").summary() == 0.0625, "scenes saved before per-slice thresholds"


def test_a_card_with_impossible_calibration_is_refused():
    with pytest.raises(ValueError, match="quantile"):
        CalibrationConfig(quantile=1.5).validate()
    with pytest.raises(ValueError, match="slice_floor_mads"):
        CalibrationConfig(slice_floor_mads=-1.0).validate()
    with pytest.raises(ValueError, match="peak_fraction"):
        CalibrationConfig(peak_fraction=1.5).validate()
