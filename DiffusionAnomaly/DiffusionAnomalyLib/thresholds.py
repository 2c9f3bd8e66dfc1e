"""From an anomaly map to a segmentation: the threshold, chosen on the scan itself or given.

A map value does not mean the same on every scanner: the healthy translation's error on
normal tissue grows with noise, contrast and resolution, so a fixed value chosen on one
kind of data cuts an eighth of a tumour on another. The calibrated threshold is read off
the scan's own healthy-looking brain instead: the brain in the slices the classifier calls
healthy, whose map is the translation's error on normal tissue of this very scan. The
threshold of a voxel is the largest of

- a high quantile of that map (``quantile``): by construction at most 1 − that share of
  this scan's healthy-looking brain is flagged, the product's 0.5 % limit;
- a robust noise floor of the same voxels, ``median + noise_floor_mads · 1.4826 · MAD``,
  which keeps a scan whose healthy map is very flat from being cut at its noise;
- optionally, the same noise floor of the voxel's own axial slice (``slice_floor_mads``).
  Guidance changes the whole of a slice the classifier suspects, so a healthy slice it
  wrongly calls diseased has a raised map everywhere and would be flagged in bulk; a lesion
  stands out above its own slice's floor, a slice-wide rise does not.

When the classifier calls too few voxels healthy (a one-slice preview through a tumour), the
reference is every analysed voxel and only the noise floor is used: median and MAD stay
put with a minority of lesion in the reference, a high quantile does not.

The widths are a property of the model (its map's noise differs), stored in its card
(:class:`.config.CalibrationConfig`) and chosen on the model's validation data only: the largest
pooled Dice whose healthy-subject false positives stay within half the 0.5 % limit, a
margin for scanners it was not tuned on. The shifted domains that test the rule were not
used to choose them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from .config import CalibrationConfig
from .preprocessing import otsu_threshold
from .settings import CALIBRATED, OTSU, Threshold

# Fewer healthy-looking voxels than this and the whole analysed brain is the reference.
MIN_REFERENCE_VOXELS = 2000
# An axial slice with fewer analysed voxels than this has no floor of its own.
MIN_SLICE_VOXELS = 200
HEALTHY_PROBABILITY = 0.5
# The share of a healthy brain the product may flag, in percent; calibration keeps half of it as margin.
FALSE_POSITIVE_LIMIT_PERCENT = 0.5
# The widths calibrate tries. A post-contrast T1's map stands far above its noise in the
# enhancing core, so its best widths lie beyond those of the FLAIR and four-sequence maps.
NOISE_FLOOR_CHOICES = (4.0, 5.0, 6.0, 6.5, 7.0, 8.0, 10.0, 12.0, 15.0, 20.0)
SLICE_FLOOR_CHOICES = (None, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0, 16.0)


def _noise_floor(values: np.ndarray, mads: float) -> float:
    median = float(np.median(values))
    return median + mads * 1.4826 * float(np.median(np.abs(values - median)))


def calibrated_threshold(anomaly_map: np.ndarray, analysed: np.ndarray, healthy_slices: Optional[np.ndarray] = None,
                         calibration: Optional[CalibrationConfig] = None) -> np.ndarray:
    """The threshold read off this scan's healthy-looking brain, per axial slice.

    Args:
        anomaly_map, analysed: canonical (axial first) map and the voxels it was computed on.
        healthy_slices: per axial slice, whether the classifier calls it healthy (``None``: unknown).
        calibration: the model's constants (the product's defaults where ``None``).

    Returns:
        (slices, 1, 1) values that broadcast over the canonical map.
    """
    calibration = calibration or CalibrationConfig()
    analysed = analysed.astype(bool)
    reference = analysed
    healthy_looking = False
    if healthy_slices is not None:
        healthy = analysed & np.asarray(healthy_slices, dtype=bool)[:, None, None]
        if healthy.sum() >= MIN_REFERENCE_VOXELS:
            reference, healthy_looking = healthy, True
    values = anomaly_map[reference]
    if values.size == 0:
        return np.full((anomaly_map.shape[0], 1, 1), np.inf, dtype=np.float32)
    level = _noise_floor(values, calibration.noise_floor_mads)
    if healthy_looking:
        # Without a healthy-looking reference it may be mostly lesion (a one-slice preview
        # through a tumour): its top quantile would be lesion, the floor is robust to that.
        level = max(level, float(np.quantile(values, calibration.quantile)))
    per_slice = np.full(anomaly_map.shape[0], max(level, 1e-6), dtype=np.float32)
    if calibration.slice_floor_mads is not None:
        for index in np.flatnonzero(analysed.reshape(len(analysed), -1).sum(axis=1) >= MIN_SLICE_VOXELS):
            per_slice[index] = max(per_slice[index], _noise_floor(anomaly_map[index][analysed[index]], calibration.slice_floor_mads))
    return per_slice[:, None, None]


def summary_value(threshold: np.ndarray) -> float:
    """One number for a threshold that may vary by slice: its median (what the panel shows)."""
    return float(np.median(np.asarray(threshold, dtype=np.float64)))


def threshold_to_text(threshold: np.ndarray) -> str:
    """A calibrated threshold as JSON (to keep with a map, e.g. in a scene node's attribute)."""
    array = np.asarray(threshold, dtype=np.float64)
    return json.dumps({"shape": list(array.shape), "values": [float(v) for v in array.ravel()]})


def threshold_from_text(text: str) -> np.ndarray:
    """The inverse of :func:`threshold_to_text`; a plain number (older scenes) is one value for all."""
    document = json.loads(text)
    if isinstance(document, (int, float)):
        return np.asarray(float(document))
    return np.asarray(document["values"], dtype=np.float64).reshape(document["shape"])


def threshold_map(anomaly_map: np.ndarray, foreground: np.ndarray, threshold: Threshold = OTSU, min_component_voxels: int = 0,
                  calibrated: Optional[np.ndarray] = None) -> Tuple[np.ndarray, float]:
    """Segments an anomaly map: ``map > threshold`` inside the foreground.

    ``threshold`` is ``"calibrated"`` (the values given as ``calibrated``, computed when the map
    was made: one per axial slice, shaped to broadcast over the map), ``"otsu"`` (Otsu's threshold of the map over the foreground, as in the paper)
    or a value in map units. Connected components smaller than ``min_component_voxels`` are
    removed. Returns the uint8 mask and the threshold used (its median where it varies by slice).
    """
    if threshold == CALIBRATED:
        if calibrated is None:
            raise ValueError("this map has no calibrated threshold (it was made elsewhere): choose Otsu's or a value")
        value = np.asarray(calibrated, dtype=np.float32)
    elif threshold == OTSU:
        value = otsu_threshold(anomaly_map[foreground])
    elif isinstance(threshold, str):
        raise ValueError(f"threshold must be 'calibrated', 'otsu' or a number, got {threshold!r}")
    else:
        value = float(threshold)
    mask = ((anomaly_map > value) & foreground).astype(np.uint8)
    if min_component_voxels > 1 and mask.any():
        components = sitk.ConnectedComponent(sitk.GetImageFromArray(mask))
        kept = sitk.RelabelComponent(components, minimumObjectSize=int(min_component_voxels))
        mask = (sitk.GetArrayFromImage(kept) > 0).astype(np.uint8)
    return mask, summary_value(value)


@dataclass
class CalibrationSample:
    """One validation subject's map for choosing a model's calibration (canonical arrays, axial first).

    Args:
        healthy_subject: the subject has no lesion at all (its flagged share counts as false positives).
        healthy_slices: per axial slice, whether the classifier calls it healthy (``None``: no classifier).
    """

    anomaly_map: np.ndarray
    analysed: np.ndarray
    lesion: np.ndarray
    healthy_subject: bool
    healthy_slices: Optional[np.ndarray]


def score_calibration(samples: Sequence[CalibrationSample], calibration: CalibrationConfig) -> Dict[str, float]:
    """Pooled Dice over the subjects with a lesion and mean flagged share (%) of the healthy subjects' brains."""
    intersection = flagged = actual = 0
    false_positives: List[float] = []
    for sample in samples:
        anomaly_map = sample.anomaly_map.astype(np.float32)
        threshold = calibrated_threshold(anomaly_map, sample.analysed, sample.healthy_slices, calibration)
        mask = (anomaly_map > threshold) & sample.analysed
        if sample.healthy_subject:
            false_positives.append(100.0 * float(mask.sum()) / max(int(sample.analysed.sum()), 1))
        else:
            intersection += int((mask & sample.lesion).sum())
            flagged += int(mask.sum())
            actual += int(sample.lesion.sum())
    return {"pooled_dice": 2.0 * intersection / max(flagged + actual, 1), "healthy_fp_percent": float(np.mean(false_positives))}


def choose_calibration(samples: Sequence[CalibrationSample], quantile: float = CalibrationConfig.quantile
                       ) -> Tuple[CalibrationConfig, List[Dict[str, object]]]:
    """The noise-floor widths with the best pooled Dice whose healthy-subject false positives stay
    within half the product's limit, and the scores of every pair tried.

    Of equal Dice (to three decimals), the fewer false positives win. Needs subjects with and without lesions.
    """
    healthy = sum(s.healthy_subject for s in samples)
    if healthy == 0 or healthy == len(samples):
        raise ValueError(f"calibration needs subjects with and without lesions; the data has {healthy} healthy of {len(samples)}")
    rows: List[Dict[str, object]] = []
    for noise_floor in NOISE_FLOOR_CHOICES:
        for slice_floor in SLICE_FLOOR_CHOICES:
            calibration = CalibrationConfig(quantile, noise_floor, slice_floor)
            rows.append({"noise_floor_mads": noise_floor, "slice_floor_mads": slice_floor, **score_calibration(samples, calibration)})
    allowed = [r for r in rows if r["healthy_fp_percent"] <= FALSE_POSITIVE_LIMIT_PERCENT / 2]
    if not allowed:
        raise ValueError("no calibration keeps the healthy subjects' false positives within "
                         f"{FALSE_POSITIVE_LIMIT_PERCENT / 2} %: the model's map is too noisy on this data")
    best = max(allowed, key=lambda r: (round(float(r["pooled_dice"]), 3), -float(r["healthy_fp_percent"])))
    return CalibrationConfig(quantile, float(best["noise_floor_mads"]), best["slice_floor_mads"]), rows
