"""From an anomaly map to a segmentation: the threshold, chosen on the scan itself or given.

A map value does not mean the same on every scanner: the healthy translation's error on
normal tissue grows with noise, contrast and resolution, so a fixed value chosen on one
kind of data cuts an eighth of a tumour on another. The calibrated threshold is read off
the scan's own healthy-looking brain instead: the brain in the slices the classifier calls
healthy, whose map is the translation's error on normal tissue of this very scan. The
threshold is the larger of

- a high quantile of that map (``HEALTHY_QUANTILE``): by construction at most 1 − that
  share of this scan's healthy-looking brain is flagged, the product's 0.5 % limit, and
- a robust noise floor, ``median + NOISE_FLOOR_MADS · 1.4826 · MAD`` of the same voxels,
  which keeps a scan whose healthy map is very flat from being cut at its noise.

When the classifier calls too few voxels healthy (a one-slice preview through a tumour), the
reference is every analysed voxel and only the noise floor is used: median and MAD stay
put with a minority of lesion in the reference, a high quantile does not.

The noise floor's width was chosen on the standard synthetic validation set only (see the
model cards): the largest pooled Dice whose healthy-subject false positives stay within half
the 0.5 % limit, a margin for the scanners it was not tuned on. The shifted domains that
test the rule were not used to choose it.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import SimpleITK as sitk

from .preprocessing import otsu_threshold
from .settings import CALIBRATED, OTSU, Threshold

HEALTHY_QUANTILE = 0.995
NOISE_FLOOR_MADS = 6.5
# Fewer healthy-looking voxels than this and the whole analysed brain is the reference.
MIN_REFERENCE_VOXELS = 2000
HEALTHY_PROBABILITY = 0.5


def calibrated_threshold(anomaly_map: np.ndarray, analysed: np.ndarray, healthy_slices: Optional[np.ndarray] = None,
                         quantile: float = HEALTHY_QUANTILE, floor_mads: float = NOISE_FLOOR_MADS) -> float:
    """The threshold read off this scan's healthy-looking brain (see the module's description).

    Args:
        anomaly_map, analysed: canonical (axial first) map and the voxels it was computed on.
        healthy_slices: per axial slice, whether the classifier calls it healthy (``None``: unknown).
    """
    reference = analysed.astype(bool)
    healthy_looking = False
    if healthy_slices is not None:
        healthy = reference & np.asarray(healthy_slices, dtype=bool)[:, None, None]
        if healthy.sum() >= MIN_REFERENCE_VOXELS:
            reference, healthy_looking = healthy, True
    values = anomaly_map[reference]
    if values.size == 0:
        return float("inf")
    median = float(np.median(values))
    spread = 1.4826 * float(np.median(np.abs(values - median)))
    floor = median + floor_mads * spread
    if not healthy_looking:
        # The reference may be mostly lesion (a one-slice preview through a tumour): its top
        # quantile would be lesion, so only the floor, robust to a minority of lesion, is used.
        return max(floor, 1e-6)
    return max(float(np.quantile(values, quantile)), floor, 1e-6)


def threshold_map(anomaly_map: np.ndarray, foreground: np.ndarray, threshold: Threshold = OTSU, min_component_voxels: int = 0,
                  calibrated: Optional[float] = None) -> Tuple[np.ndarray, float]:
    """Segments an anomaly map: ``map > threshold`` inside the foreground.

    ``threshold`` is ``"calibrated"`` (the value given as ``calibrated``, computed when the map
    was made), ``"otsu"`` (Otsu's threshold of the map over the foreground, as in the paper)
    or a value in map units. Connected components smaller than ``min_component_voxels`` are
    removed. Returns the uint8 mask and the threshold used.
    """
    if threshold == CALIBRATED:
        if calibrated is None:
            raise ValueError("this map has no calibrated threshold (it was made elsewhere): choose Otsu's or a value")
        value = float(calibrated)
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
    return mask, value
