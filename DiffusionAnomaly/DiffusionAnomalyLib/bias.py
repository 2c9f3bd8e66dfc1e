"""Bias-field correction: the slow intensity shading of a scanner's receive coils, taken out before detection.

A bias field multiplies every intensity by a smooth factor that differs across the head
(often ±30 % and more at high field). The model normalises each sequence over the whole
brain, so a brighter side reads as abnormal tissue everywhere, and the threshold must rise
above it. N4 (Tustison et al. 2010, as implemented in ITK and shipped with SimpleITK) fits a
smooth multiplicative field inside the brain; the detector divides it out before
normalising and multiplies it back into the healthy translation, so that the translation
stays in the input's intensities. BraTS images were N4-corrected when they were made.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Dict, Sequence

import numpy as np
import SimpleITK as sitk

from .imageio import Geometry

# N4 is fitted on a copy shrunk to about this voxel size (mm): the field is smooth, and the
# fit then costs about the same on any grid (a few seconds per sequence on one CPU core).
FIT_SPACING_MM = 6.0
# Iterations at each of the three B-spline mesh levels (ITK's default is four levels of 50).
ITERATIONS_PER_LEVEL = (50, 50, 50)
# Fewer brain voxels than this (a few slices of a small field of view) cannot constrain a field.
MIN_FITTED_VOXELS = 1000
# Brain voxels at or below zero that a magnitude image can have (background inside the mask).
MAX_NOT_POSITIVE = 0.1
# The fitted field may not scale the image beyond this factor (either way) anywhere in the
# brain; a larger one means N4 fitted something other than shading (e.g. a huge lesion).
MAX_FIELD_FACTOR = 4.0


@dataclass
class BiasCorrection:
    """The corrected channels and the multiplicative fields that were divided out.

    Attributes:
        corrected: (C, k, j, i) input intensities divided by their field.
        fields: (C, k, j, i) the field per channel (1 where nothing was changed).
        seconds: time spent fitting.
    """

    corrected: np.ndarray
    fields: np.ndarray
    seconds: float

    def describe(self) -> str:
        spread = [f"{np.percentile(f[f != 1], 1):.2f}-{np.percentile(f[f != 1], 99):.2f}" if (f != 1).any() else "1"
                  for f in self.fields]
        return f"bias field (N4) in {self.seconds:.1f} s, factors {', '.join(spread)}"


def _shrink_factors(spacing: Sequence[float], size: Sequence[int]) -> list:
    return [int(max(1, min(round(FIT_SPACING_MM / s), n // 4))) for s, n in zip(spacing, size)]


def n4_field(channel: np.ndarray, mask: np.ndarray, geometry: Geometry, name: str) -> np.ndarray:
    """N4's multiplicative bias field of one (k, j, i) channel inside ``mask``, on the full grid.

    The field is a ratio of intensities, so it needs a magnitude image: a sequence with many
    brain voxels at or below zero (a z-scored or subtracted image) is refused. The field is 1
    outside the mask.
    """
    fitted = mask & (channel > 0)
    not_positive = 1.0 - fitted.sum() / max(int(mask.sum()), 1)
    if not_positive > MAX_NOT_POSITIVE:
        raise ValueError(f"bias correction of {name}: {100 * not_positive:.0f} % of the brain has intensities at or below 0 "
                         "(a z-scored or subtracted image?); N4 needs the scanner's magnitude image: give that, "
                         "or choose bias correction 'none'")
    if fitted.sum() < MIN_FITTED_VOXELS:
        raise ValueError(f"bias correction of {name}: the brain has only {int(fitted.sum()):,} voxels, too few to fit a "
                         f"bias field (at least {MIN_FITTED_VOXELS:,}); choose bias correction 'none'")
    grid = geometry.as_3d()
    image = grid.applied_to(sitk.GetImageFromArray(np.where(fitted, channel, 0).astype(np.float32)))
    mask_image = sitk.GetImageFromArray(fitted.astype(np.uint8))
    mask_image.CopyInformation(image)
    factors = _shrink_factors(grid.spacing, image.GetSize())
    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    corrector.SetMaximumNumberOfIterations(list(ITERATIONS_PER_LEVEL))
    corrector.Execute(sitk.Shrink(image, factors), sitk.Shrink(mask_image, factors))
    # The fitted B-spline field is evaluated on the full grid (not the shrunk copy).
    log_field = sitk.GetArrayFromImage(corrector.GetLogBiasFieldAsImage(image))
    field = np.exp(log_field).astype(np.float32)
    # N4 leaves the field's overall scale free; keep the brain's median intensity where it was.
    field /= np.float32(np.median(field[mask]))
    inside = field[mask]
    extreme = float(max(inside.max(), 1.0 / inside.min()))
    if not np.isfinite(extreme) or extreme > MAX_FIELD_FACTOR:
        raise ValueError(f"bias correction of {name}: N4 fitted a field that scales parts of the brain by {extreme:.1f} times; "
                         "this is not coil shading (check the image, or choose bias correction 'none')")
    field[~mask] = 1.0
    return field


# The fields of the last volume corrected, so that the previews of one study fit N4 once.
_last_fields: Dict[bytes, np.ndarray] = {}


def _volume_key(arrays: np.ndarray, brain: np.ndarray, geometry: Geometry) -> bytes:
    digest = hashlib.blake2b(digest_size=16)
    for part in (np.ascontiguousarray(arrays), np.ascontiguousarray(brain)):
        digest.update(repr((part.shape, part.dtype.str)).encode())
        digest.update(memoryview(part).cast("B"))
    digest.update(repr(geometry.as_3d()).encode())
    return digest.digest()


def correct_bias(arrays: np.ndarray, brain: np.ndarray, geometry: Geometry, channel_names: Sequence[str]) -> BiasCorrection:
    """Divides each channel of a (C, k, j, i) volume by its N4 field fitted inside ``brain``.

    The same volume and brain a second time (a preview after a preview) reuse the fields.
    """
    started = time.perf_counter()
    brain = np.asarray(brain, dtype=bool)
    key = _volume_key(arrays, brain, geometry)
    kept = _last_fields.get(key)
    if kept is None:
        # Kept in half precision (a 4-sequence 1 mm head: 71 MB instead of 143); a field is smooth and
        # near 1, so that is 0.05 % at most, and every run uses the same rounded field.
        kept = np.stack([n4_field(channel, brain, geometry, name) for channel, name in zip(arrays, channel_names)]).astype(np.float16)
        _last_fields.clear()
        _last_fields[key] = kept
    fields = kept.astype(np.float32)
    return BiasCorrection(arrays / fields, fields, time.perf_counter() - started)
