"""How well a translation heals: measured against the image as it was before the lesion was put in.

A map can light up a lesion that the translation only dimmed. Synthetic data knows each
subject's true healthy image, so the translation x̂ is compared with it directly, in the
map's units (each channel's foreground percentile range is 1, summed over channels):

- ``lesion_error``: mean Σ_c |x̂ − h| over the lesion (0: the lesion is gone and what is
  under it restored);
- ``healthy_error``: the same over the analysed brain away from the lesion (what the
  translation changed where nothing had to change; compare with a plain reconstruction);
- ``contrast_removed``: 1 − lesion_error / mean Σ_c |x − h| over the lesion: the share of
  the lesion's contrast to healthy tissue that the translation took away.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np
from scipy import ndimage

from .preprocessing import IntensityScale

# Lesion volume groups of the report, in ml: small < 5, medium, large >= 30.
SIZE_GROUPS = (("small", 0.0, 5.0), ("medium", 5.0, 30.0), ("large", 30.0, float("inf")))
# Voxels this close to a lesion belong to neither side (partial volume, oedema fading out).
LESION_MARGIN_VOXELS = 2


def size_group(lesion_ml: float) -> str:
    return next(name for name, low, high in SIZE_GROUPS if low <= lesion_ml < high)


def _in_map_units(images: Sequence[np.ndarray], scale: IntensityScale) -> np.ndarray:
    low = np.asarray(scale.low, dtype=np.float32).reshape(-1, 1, 1, 1)
    high = np.asarray(scale.high, dtype=np.float32).reshape(-1, 1, 1, 1)
    return (np.stack([np.asarray(i, dtype=np.float32) for i in images]) - low) / (high - low)


def healing_scores(inputs: Sequence[np.ndarray], healthy_truth: Sequence[np.ndarray], translated: Sequence[np.ndarray],
                   scale: IntensityScale, lesion: np.ndarray, analysed: np.ndarray) -> Dict[str, Optional[float]]:
    """The three measures above for one subject (channels as (k, j, i) arrays on one grid)."""
    x, h, t = (_in_map_units(images, scale) for images in (inputs, healthy_truth, translated))
    error = np.abs(t - h).sum(axis=0)
    lesion = lesion.astype(bool) & analysed.astype(bool)
    away = analysed.astype(bool) & ~ndimage.binary_dilation(lesion, iterations=LESION_MARGIN_VOXELS)
    scores: Dict[str, Optional[float]] = {"healthy_error": float(error[away].mean()) if away.any() else None,
                                          "lesion_error": None, "contrast_removed": None}
    if lesion.any():
        contrast = float(np.abs(x - h).sum(axis=0)[lesion].mean())
        scores["lesion_error"] = float(error[lesion].mean())
        scores["contrast_removed"] = 1.0 - scores["lesion_error"] / contrast if contrast > 0 else None
    return scores


def by_size(rows: List[Dict[str, object]], keys: Sequence[str]) -> Dict[str, Dict[str, object]]:
    """Mean of ``keys`` over the diseased subjects of each lesion-size group."""
    groups: Dict[str, Dict[str, object]] = {}
    for name, low, high in SIZE_GROUPS:
        members = [r for r in rows if not r["healthy"] and low <= float(r["lesion_ml"]) < high]
        summary: Dict[str, object] = {"subjects": len(members), "range_ml": [low, high if np.isfinite(high) else None]}
        for key in keys:
            values = [r[key] for r in members if r.get(key) is not None]
            summary[key] = float(np.mean(values)) if values else None
        groups[name] = summary
    return groups
