"""The calibrated threshold: read off each scan, with the constants each model was calibrated with."""

import numpy as np
import pytest

from DiffusionAnomalyLib.config import CalibrationConfig
from DiffusionAnomalyLib.thresholds import (
    FALSE_POSITIVE_LIMIT_PERCENT,
    CalibrationSample,
    calibrated_threshold,
    choose_calibration,
    score_calibration,
    threshold_from_text,
    threshold_map,
    threshold_to_text,
)

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
    assert threshold.shape == (SLICES, 1, 1)
    mask, value = threshold_map(diseased.anomaly_map, diseased.analysed, "calibrated", calibrated=threshold)
    found = (mask.astype(bool) & diseased.lesion).sum() / diseased.lesion.sum()
    assert found > 0.95 and value == pytest.approx(float(np.median(threshold)))


def test_a_preview_slice_through_a_lesion_uses_its_noise_floor_only():
    diseased = scan(2, lesion=True)
    one_slice = np.zeros_like(diseased.analysed)
    one_slice[12] = diseased.analysed[12]
    threshold = calibrated_threshold(diseased.anomaly_map * one_slice, one_slice, np.zeros(SLICES, dtype=bool))
    lesion_values = diseased.anomaly_map[12][diseased.lesion[12]]
    assert float(threshold[12, 0, 0]) < lesion_values.min(), "the lesion is a minority of the slice: the floor stays below it"


def test_calibration_is_chosen_within_half_the_limit_and_needs_both_kinds_of_subject():
    samples = [scan(s, lesion=s % 2 == 0, raised_slices=(3, 4) if s % 2 else ()) for s in range(6)]
    chosen, rows = choose_calibration(samples)
    assert len(rows) > 10
    scores = score_calibration(samples, chosen)
    assert scores["healthy_fp_percent"] <= FALSE_POSITIVE_LIMIT_PERCENT / 2 and scores["pooled_dice"] > 0.9
    assert chosen.slice_floor_mads is not None, "only a slice floor keeps the suspected healthy slices out"
    with pytest.raises(ValueError, match="with and without lesions"):
        choose_calibration([s for s in samples if not s.healthy_subject])


def test_a_calibrated_threshold_survives_being_kept_as_text():
    values = np.linspace(0.05, 0.2, 7, dtype=np.float32).reshape(1, 7, 1)
    assert np.allclose(threshold_from_text(threshold_to_text(values)), values)
    assert float(threshold_from_text("0.0625")) == 0.0625, "scenes saved before per-slice thresholds"


def test_a_card_with_impossible_calibration_is_refused():
    with pytest.raises(ValueError, match="quantile"):
        CalibrationConfig(quantile=1.5).validate()
    with pytest.raises(ValueError, match="slice_floor_mads"):
        CalibrationConfig(slice_floor_mads=-1.0).validate()
