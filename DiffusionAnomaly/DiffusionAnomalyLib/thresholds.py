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

The floor says where something stands out of this scan's noise; it does not say where a lesion
ends. The map of a lesion is a blurred bump whose height follows the lesion's contrast, not the
noise: partial volume in thick slices lowers the bump while it raises the healthy map's spread,
so a floor set in noise units cuts lesions too small exactly where noise is high. With a
``peak_fraction`` (the model's choice), each region above the floor, in its own axial slice (the
map is made slice by slice), keeps what exceeds that share of its own peak: the half-maximum
rule of blurred objects, also the usual fixed-fraction-of-maximum rule of PET tumour contours.
It never flags more than the floor alone, and like the floor it scales with the map, so a
scanner whose maps are twice as bright gives the same segmentation.

When the classifier calls too few voxels healthy (a one-slice preview through a tumour), the
reference is every analysed voxel and only the noise floor is used: median and MAD stay
put with a minority of lesion in the reference, a high quantile does not.

The widths and the fraction are a property of the model (its map's noise and blur differ),
stored in its card (:class:`.config.CalibrationConfig`) and chosen on the model's validation
data only: the largest pooled Dice whose healthy-subject false positives stay within half the
0.5 % limit, a margin for scanners it was not tuned on. The shifted domains that test the rule
were not used to choose them.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

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
PEAK_FRACTION_CHOICES = (None, 0.3, 0.4, 0.5, 0.6)


def _median_and_spread(values: np.ndarray) -> Tuple[float, float]:
    median = float(np.median(values))
    return median, 1.4826 * float(np.median(np.abs(values - median)))


@dataclass(frozen=True)
class _ScanNoise:
    """What the calibrated threshold reads off a scan's map, whatever the model's widths:
    median and robust SD (1.4826 · MAD) of the reference, its top quantile where the reference is
    healthy-looking, and each axial slice's own median and robust SD (NaN: too few voxels)."""

    median: float
    spread: float
    top_quantile: Optional[float]
    slice_medians: np.ndarray
    slice_spreads: np.ndarray

    @classmethod
    def of(cls, anomaly_map: np.ndarray, analysed: np.ndarray, healthy_slices: Optional[np.ndarray], quantile: float) -> Optional["_ScanNoise"]:
        analysed = analysed.astype(bool)
        reference, healthy_looking = analysed, False
        if healthy_slices is not None:
            healthy = analysed & np.asarray(healthy_slices, dtype=bool)[:, None, None]
            if healthy.sum() >= MIN_REFERENCE_VOXELS:
                reference, healthy_looking = healthy, True
        values = anomaly_map[reference]
        if values.size == 0:
            return None
        slice_medians = np.full(len(anomaly_map), np.nan)
        slice_spreads = np.full(len(anomaly_map), np.nan)
        for index in np.flatnonzero(analysed.reshape(len(analysed), -1).sum(axis=1) >= MIN_SLICE_VOXELS):
            slice_medians[index], slice_spreads[index] = _median_and_spread(anomaly_map[index][analysed[index]])
        # Without a healthy-looking reference it may be mostly lesion (a one-slice preview
        # through a tumour): its top quantile would be lesion, median and MAD are robust to that.
        top_quantile = float(np.quantile(values, quantile)) if healthy_looking else None
        return cls(*_median_and_spread(values), top_quantile, slice_medians, slice_spreads)

    def floor(self, noise_floor_mads: float, slice_floor_mads: Optional[float]) -> np.ndarray:
        """The floor per axial slice, (slices, 1, 1)."""
        level = self.median + noise_floor_mads * self.spread
        if self.top_quantile is not None:
            level = max(level, self.top_quantile)
        per_slice = np.full(len(self.slice_medians), max(level, 1e-6), dtype=np.float32)
        if slice_floor_mads is not None:
            own = self.slice_medians + slice_floor_mads * self.slice_spreads
            per_slice = np.where(np.isnan(own), per_slice, np.maximum(per_slice, own)).astype(np.float32)
        return per_slice[:, None, None]


def _peak_cuts(anomaly_map: np.ndarray, above: np.ndarray, fractions: Sequence[float], axial_axis: Optional[int]) -> List[np.ndarray]:
    """``above`` with each region (within its axial slice) cut at each fraction of its own peak."""
    if not above.any():
        return [above for _ in fractions]
    structure = ndimage.generate_binary_structure(above.ndim, 1)
    if axial_axis is not None and above.ndim == 3:
        for neighbour in (0, 2):
            index = [1, 1, 1]
            index[axial_axis] = neighbour
            structure[tuple(index)] = False
    labels, count = ndimage.label(above, structure)
    peaks = np.asarray(ndimage.maximum(anomaly_map, labels, np.arange(1, count + 1)), dtype=np.float64)
    return [above & (anomaly_map > np.concatenate([[np.inf], fraction * peaks])[labels]) for fraction in fractions]


@dataclass(frozen=True)
class ScanThreshold:
    """A scan's calibrated threshold, kept with its map to cut it again.

    Args:
        floor: one value per axial slice, shaped to broadcast over the map.
        peak_fraction: share of its own peak each region above the floor keeps (``None``: the floor alone).
        axial_axis: the map's axis across axial slices (regions do not reach across it); ``None``: a 2D map.
    """

    floor: np.ndarray
    peak_fraction: Optional[float] = None
    axial_axis: Optional[int] = 0

    def segment(self, anomaly_map: np.ndarray, foreground: np.ndarray) -> np.ndarray:
        """The voxels of ``foreground`` this threshold flags (bool)."""
        above = (anomaly_map > self.floor) & foreground
        if self.peak_fraction is None:
            return above
        return _peak_cuts(anomaly_map, above, [self.peak_fraction], self.axial_axis)[0]

    def summary(self) -> float:
        """One number for the floor, which may vary by slice: its median (what the panel shows)."""
        return float(np.median(np.asarray(self.floor, dtype=np.float64)))

    def reoriented(self, reorient) -> "ScanThreshold":
        """The same threshold for the map reoriented by ``reorient`` (a function of a 3D array):
        the axial axis is found where the floor's slice axis went."""
        marker = np.zeros((2, 1, 1))
        moved = reorient(marker)
        axial = [axis for axis, size in enumerate(moved.shape) if size == 2]
        return replace(self, floor=reorient(self.floor), axial_axis=axial[0] if axial else None)

    def to_text(self) -> str:
        """As JSON (to keep with a map, e.g. in a scene node's attribute)."""
        array = np.asarray(self.floor, dtype=np.float64)
        return json.dumps({"shape": list(array.shape), "values": [float(v) for v in array.ravel()],
                           "peak_fraction": self.peak_fraction, "axial_axis": self.axial_axis})

    @classmethod
    def from_text(cls, text: str) -> "ScanThreshold":
        """The inverse of :meth:`to_text`; a plain number (older scenes) is one floor for all."""
        document = json.loads(text)
        if isinstance(document, (int, float)):
            return cls(np.asarray(float(document)), None, None)
        floor = np.asarray(document["values"], dtype=np.float64).reshape(document["shape"])
        return cls(floor, document.get("peak_fraction"), document.get("axial_axis", 0))


def calibrated_threshold(anomaly_map: np.ndarray, analysed: np.ndarray, healthy_slices: Optional[np.ndarray] = None,
                         calibration: Optional[CalibrationConfig] = None) -> ScanThreshold:
    """The threshold read off this scan's healthy-looking brain.

    Args:
        anomaly_map, analysed: canonical (axial first) map and the voxels it was computed on.
        healthy_slices: per axial slice, whether the classifier calls it healthy (``None``: unknown).
        calibration: the model's constants (the product's defaults where ``None``).

    Returns:
        its floor per axial slice, (slices, 1, 1) values that broadcast over the canonical map, and the model's peak fraction.
    """
    calibration = calibration or CalibrationConfig()
    noise = _ScanNoise.of(anomaly_map, analysed, healthy_slices, calibration.quantile)
    if noise is None:
        return ScanThreshold(np.full((anomaly_map.shape[0], 1, 1), np.inf, dtype=np.float32), calibration.peak_fraction)
    return ScanThreshold(noise.floor(calibration.noise_floor_mads, calibration.slice_floor_mads), calibration.peak_fraction)


def threshold_map(anomaly_map: np.ndarray, foreground: np.ndarray, threshold: Threshold = OTSU, min_component_voxels: int = 0,
                  calibrated: Optional[ScanThreshold] = None) -> Tuple[np.ndarray, float]:
    """Segments an anomaly map: ``map > threshold`` inside the foreground.

    ``threshold`` is ``"calibrated"`` (``calibrated``, computed when the map was made), ``"otsu"`` (Otsu's threshold of the map over the foreground, as in the paper)
    or a value in map units. Connected components smaller than ``min_component_voxels`` are
    removed. Returns the uint8 mask and the threshold used (the calibrated floor's median).
    """
    if threshold == CALIBRATED:
        if calibrated is None:
            raise ValueError("this map has no calibrated threshold (it was made elsewhere): choose Otsu's or a value")
        mask, value = calibrated.segment(anomaly_map, foreground).astype(np.uint8), calibrated.summary()
    elif threshold == OTSU:
        value = otsu_threshold(anomaly_map[foreground])
        mask = ((anomaly_map > value) & foreground).astype(np.uint8)
    elif isinstance(threshold, str):
        raise ValueError(f"threshold must be 'calibrated', 'otsu' or a number, got {threshold!r}")
    else:
        value = float(threshold)
        mask = ((anomaly_map > value) & foreground).astype(np.uint8)
    if min_component_voxels > 1 and mask.any():
        components = sitk.ConnectedComponent(sitk.GetImageFromArray(mask))
        kept = sitk.RelabelComponent(components, minimumObjectSize=int(min_component_voxels))
        mask = (sitk.GetArrayFromImage(kept) > 0).astype(np.uint8)
    return mask, float(value)


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


class _Tally:
    def __init__(self) -> None:
        self.intersection = self.flagged = self.actual = 0
        self.false_positives: List[float] = []

    def add(self, sample: CalibrationSample, mask: np.ndarray) -> None:
        if sample.healthy_subject:
            self.false_positives.append(100.0 * float(mask.sum()) / max(int(sample.analysed.sum()), 1))
        else:
            self.intersection += int((mask & sample.lesion).sum())
            self.flagged += int(mask.sum())
            self.actual += int(sample.lesion.sum())

    def scores(self) -> Dict[str, float]:
        return {"pooled_dice": 2.0 * self.intersection / max(self.flagged + self.actual, 1),
                "healthy_fp_percent": float(np.mean(self.false_positives)) if self.false_positives else 0.0}


def _score_choices(samples: Sequence[CalibrationSample], quantile: float, floors: Sequence[Tuple[float, Optional[float]]],
                   fractions: Sequence[Optional[float]]) -> List[Dict[str, object]]:
    """Scores of every (noise floor, slice floor) × peak fraction: each scan's noise is read once,
    and its regions above each floor are found once for all fractions."""
    tallies = {(floor, fraction): _Tally() for floor in floors for fraction in fractions}
    cut_fractions = [f for f in fractions if f is not None]
    for sample in samples:
        anomaly_map = sample.anomaly_map.astype(np.float32)
        noise = _ScanNoise.of(anomaly_map, sample.analysed, sample.healthy_slices, quantile)
        for floor in floors:
            above = (anomaly_map > noise.floor(*floor)) & sample.analysed if noise is not None else np.zeros_like(sample.analysed)
            masks: Dict[Optional[float], np.ndarray] = dict(zip(cut_fractions, _peak_cuts(anomaly_map, above, cut_fractions, axial_axis=0)))
            masks[None] = above
            for fraction in fractions:
                tallies[floor, fraction].add(sample, masks[fraction])
    return [{"noise_floor_mads": floor[0], "slice_floor_mads": floor[1], "peak_fraction": fraction, **tally.scores()}
            for (floor, fraction), tally in tallies.items()]


def score_calibration(samples: Sequence[CalibrationSample], calibration: CalibrationConfig) -> Dict[str, float]:
    """Pooled Dice over the subjects with a lesion and mean flagged share (%) of the healthy subjects' brains."""
    row = _score_choices(samples, calibration.quantile, [(calibration.noise_floor_mads, calibration.slice_floor_mads)], [calibration.peak_fraction])[0]
    return {"pooled_dice": row["pooled_dice"], "healthy_fp_percent": row["healthy_fp_percent"]}


def choose_calibration(samples: Sequence[CalibrationSample], quantile: float = CalibrationConfig.quantile
                       ) -> Tuple[CalibrationConfig, List[Dict[str, object]]]:
    """The noise-floor widths and peak fraction with the best pooled Dice whose healthy-subject false
    positives stay within half the product's limit, and the scores of every choice tried.

    Of equal Dice (to three decimals), the fewer false positives win. Needs subjects with and without lesions.
    """
    healthy = sum(s.healthy_subject for s in samples)
    if healthy == 0 or healthy == len(samples):
        raise ValueError(f"calibration needs subjects with and without lesions; the data has {healthy} healthy of {len(samples)}")
    rows = _score_choices(samples, quantile, list(itertools.product(NOISE_FLOOR_CHOICES, SLICE_FLOOR_CHOICES)), PEAK_FRACTION_CHOICES)
    allowed = [r for r in rows if r["healthy_fp_percent"] <= FALSE_POSITIVE_LIMIT_PERCENT / 2]
    if not allowed:
        raise ValueError("no calibration keeps the healthy subjects' false positives within "
                         f"{FALSE_POSITIVE_LIMIT_PERCENT / 2} %: the model's map is too noisy on this data")
    best = max(allowed, key=lambda r: (round(float(r["pooled_dice"]), 3), -float(r["healthy_fp_percent"])))
    return CalibrationConfig(quantile, float(best["noise_floor_mads"]), best["slice_floor_mads"], best["peak_fraction"]), rows
