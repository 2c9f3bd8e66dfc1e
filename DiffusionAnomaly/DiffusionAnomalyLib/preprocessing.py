"""From a patient-space volume to the network's 2D slices and back.

Training and detection share these functions so that a model sees slices exactly as it
was trained on them: reoriented so that slices are axial in patient space, normalised over
the volume's foreground, cropped to the brain's in-plane bounding box, padded to a square
and resized to the model's image size.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
import SimpleITK as sitk

from .config import NormalisationConfig

BACKGROUND = -1.0
CROP_MARGIN_VOXELS = 2


@dataclass(frozen=True)
class Orientation:
    """How a SimpleITK-ordered array (k, j, i) maps onto the canonical axial array.

    The canonical array has axes (superior, posterior, left): one axial slice per first
    index, anterior at the top, the patient's right on the image's left (radiological).
    """

    transpose: Tuple[int, int, int]
    flip: Tuple[bool, bool, bool]

    @classmethod
    def from_direction(cls, direction: Sequence[float]) -> "Orientation":
        """Picks the index axis best aligned with each patient axis, whatever the obliquity.

        ``direction`` is SimpleITK's row-major 3×3 matrix whose column i is the LPS
        direction of index axis i.
        """
        matrix = np.asarray(direction, dtype=float).reshape(3, 3)
        best = max(itertools.permutations(range(3)), key=lambda p: sum(abs(matrix[axis, p[axis]]) for axis in range(3)))
        # canonical axis c holds patient axis 2 - c (S, P, L); array axis of index axis i is 2 - i.
        transpose = tuple(2 - best[2 - c] for c in range(3))
        flip = tuple(bool(matrix[2 - c, best[2 - c]] < 0) for c in range(3))
        return cls(transpose=transpose, flip=flip)  # type: ignore[arg-type]

    def to_canonical(self, array: np.ndarray) -> np.ndarray:
        """Reorients the last three axes of ``array``; leading axes (channels) are kept."""
        lead = array.ndim - 3
        out = np.transpose(array, tuple(range(lead)) + tuple(lead + a for a in self.transpose))
        flips = tuple(lead + c for c in range(3) if self.flip[c])
        return np.flip(out, flips) if flips else out

    def axial_index(self, voxel: Sequence[int], shape: Sequence[int]) -> int:
        """The canonical axial slice that holds voxel ``(k, j, i)`` of an array of ``shape``."""
        axis = self.transpose[0]
        index = int(voxel[axis])
        return int(shape[axis]) - 1 - index if self.flip[0] else index

    def axial_pixel_area(self, spacing: Sequence[float]) -> float:
        """The area (spacing units², e.g. mm²) of one pixel of a canonical axial slice; ``spacing``
        is SimpleITK's (i, j, k) order."""
        # Array axis a (k, j, i) is index axis 2 - a.
        return float(spacing[2 - self.transpose[1]] * spacing[2 - self.transpose[2]])

    def from_canonical(self, array: np.ndarray) -> np.ndarray:
        lead = array.ndim - 3
        flips = tuple(lead + c for c in range(3) if self.flip[c])
        out = np.flip(array, flips) if flips else array
        inverse = tuple(int(a) for a in np.argsort(self.transpose))
        return np.transpose(out, tuple(range(lead)) + tuple(lead + a for a in inverse))


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of a set of values (SimpleITK's implementation); ``inf`` if they are all equal."""
    values = np.asarray(values, dtype=np.float32).ravel()
    if values.size == 0 or np.ptp(values) == 0:
        return float("inf")
    otsu = sitk.OtsuThresholdImageFilter()
    otsu.SetNumberOfHistogramBins(bins)
    otsu.Execute(sitk.GetImageFromArray(values[np.newaxis, :]))
    return float(otsu.GetThreshold())


def foreground_mask(channels: np.ndarray, config: NormalisationConfig) -> np.ndarray:
    """Voxels that belong to the imaged object, for (C, ...) channel-stacked intensities."""
    if config.foreground == "nonzero":
        return np.any(channels != 0, axis=0)
    if config.foreground == "otsu":
        return channels[0] > otsu_threshold(channels[0])
    raise ValueError(f"unknown foreground rule {config.foreground!r}: use 'nonzero' or 'otsu'")


@dataclass(frozen=True)
class IntensityScale:
    """Per-channel affine map from scanner intensities to [0, 1] (before the [-1, 1] shift)."""

    low: Tuple[float, ...]
    high: Tuple[float, ...]


def fit_intensity_scale(channels: np.ndarray, foreground: np.ndarray, config: NormalisationConfig, names: Sequence[str]) -> IntensityScale:
    """Percentiles of each channel over the whole volume's foreground."""
    lows, highs = [], []
    for name, channel in zip(names, channels):
        values = channel[foreground]
        low, high = np.percentile(values, [config.lower_percentile, config.upper_percentile])
        if not high > low:
            raise ValueError(
                f"channel {name} is constant over the foreground ({low:g}): it holds no image; "
                "check that the right file was given for this channel"
            )
        lows.append(float(low))
        highs.append(float(high))
    return IntensityScale(tuple(lows), tuple(highs))


def normalise(channels: np.ndarray, foreground: np.ndarray, scale: IntensityScale, config: NormalisationConfig) -> np.ndarray:
    """Scanner intensities (C, ...) → network range [-1, 1]; background set to -1."""
    low = np.asarray(scale.low, dtype=np.float32).reshape((-1,) + (1,) * (channels.ndim - 1))
    high = np.asarray(scale.high, dtype=np.float32).reshape(low.shape)
    unit = np.clip((channels.astype(np.float32) - low) / (high - low), 0.0, config.clip_max)
    out = 2.0 * unit - 1.0
    out[:, ~foreground] = BACKGROUND
    return out


def denormalise(model_values: np.ndarray, scale: IntensityScale) -> np.ndarray:
    """Network range → scanner intensities (C, ...), the inverse of :func:`normalise` inside the clip."""
    low = np.asarray(scale.low, dtype=np.float32).reshape((-1,) + (1,) * (model_values.ndim - 1))
    high = np.asarray(scale.high, dtype=np.float32).reshape(low.shape)
    return (model_values + 1.0) / 2.0 * (high - low) + low


@dataclass(frozen=True)
class SliceFrame:
    """Where the model's square image sits in a canonical slice: a crop, then a pad to a square."""

    rows: Tuple[int, int]
    cols: Tuple[int, int]
    pad: Tuple[int, int, int, int]  # left, right, top, bottom: F.pad order for the last two axes
    image_size: Tuple[int, int]

    @classmethod
    def around(cls, foreground: np.ndarray, image_size: Tuple[int, int]) -> "SliceFrame":
        """The in-plane bounding box of the whole volume's foreground (S, P, L), squared up.

        One box for all slices keeps the object's scale the same from slice to slice and
        makes the model independent of the field of view.
        """
        plane = foreground.any(axis=0)
        rows = np.flatnonzero(plane.any(axis=1))
        cols = np.flatnonzero(plane.any(axis=0))
        r0 = max(int(rows[0]) - CROP_MARGIN_VOXELS, 0)
        r1 = min(int(rows[-1]) + 1 + CROP_MARGIN_VOXELS, plane.shape[0])
        c0 = max(int(cols[0]) - CROP_MARGIN_VOXELS, 0)
        c1 = min(int(cols[-1]) + 1 + CROP_MARGIN_VOXELS, plane.shape[1])
        height, width = r1 - r0, c1 - c0
        side = max(height, width)
        top, left = (side - height) // 2, (side - width) // 2
        pad = (left, side - width - left, top, side - height - top)
        return cls(rows=(r0, r1), cols=(c0, c1), pad=pad, image_size=tuple(image_size))  # type: ignore[arg-type]

    def to_model(self, slices: np.ndarray) -> torch.Tensor:
        """(N, C, H, W) canonical slices → (N, C, h, w) model images."""
        crop = torch.from_numpy(np.ascontiguousarray(slices[..., self.rows[0] : self.rows[1], self.cols[0] : self.cols[1]]))
        square = F.pad(crop.float(), self.pad, value=BACKGROUND)
        return F.interpolate(square, size=self.image_size, mode="bilinear", align_corners=False, antialias=True)

    def from_model(self, images: torch.Tensor, plane_shape: Tuple[int, int], fill: float) -> np.ndarray:
        """(N, C, h, w) model-size images → (N, C, H, W) canonical slices, ``fill`` outside the box."""
        side = self.rows[1] - self.rows[0] + self.pad[2] + self.pad[3]
        square = F.interpolate(images.float(), size=(side, side), mode="bilinear", align_corners=False)
        left, _, top, _ = self.pad
        crop = square[..., top : top + self.rows[1] - self.rows[0], left : left + self.cols[1] - self.cols[0]]
        out = np.full(tuple(images.shape[:2]) + tuple(plane_shape), fill, dtype=np.float32)
        out[..., self.rows[0] : self.rows[1], self.cols[0] : self.cols[1]] = crop.cpu().numpy()
        return out


def slices_with_foreground(foreground: np.ndarray, min_fraction: float = 0.0) -> List[int]:
    """Indices of canonical axial slices with foreground (at least ``min_fraction`` of the slice)."""
    counts = foreground.reshape(foreground.shape[0], -1).sum(axis=1)
    needed = max(1, int(np.ceil(min_fraction * foreground[0].size)))
    return [int(i) for i in np.flatnonzero(counts >= needed)]


@dataclass
class PreparedVolume:
    """A multi-channel volume in the canonical frame, normalised, with its model-size slices.

    Attributes:
        orientation: maps the input array to the canonical (S, P, L) frame and back.
        canonical: reoriented scanner intensities (C, S, P, L).
        foreground: (S, P, L) voxels of the imaged object.
        normalised: ``canonical`` in the network range (C, S, P, L).
        scale: the per-channel intensity scale that was used.
        frame: crop/pad/resize between canonical slices and model images.
        indices: canonical axial slices that were turned into model images.
        images: (N, C, h, w) model images of those slices.
    """

    orientation: Orientation
    canonical: np.ndarray
    foreground: np.ndarray
    normalised: np.ndarray
    scale: IntensityScale
    frame: SliceFrame
    indices: List[int]
    images: torch.Tensor


def prepare_volume(
    arrays: np.ndarray,
    direction: Sequence[float],
    channel_names: Sequence[str],
    image_size: Tuple[int, int],
    config: NormalisationConfig,
    min_foreground_fraction: float = 0.0,
    axial_slices: Optional[Sequence[int]] = None,
    foreground: Optional[np.ndarray] = None,
) -> PreparedVolume:
    """Everything the networks need from a (C, k, j, i) volume, the same for training and detection.

    ``foreground``: the brain as a (k, j, i) mask (e.g. from brain extraction); by default the
    card's rule (the non-zero voxels of skull-stripped data).
    """
    orientation = Orientation.from_direction(direction)
    canonical = np.ascontiguousarray(orientation.to_canonical(arrays))
    if foreground is None:
        foreground = foreground_mask(canonical, config)
    else:
        foreground = np.ascontiguousarray(orientation.to_canonical(np.asarray(foreground, dtype=bool)))
    if not foreground.any():
        raise ValueError("the volume has no foreground (it is empty or all zero): nothing to analyse")
    scale = fit_intensity_scale(canonical, foreground, config, channel_names)
    normalised = normalise(canonical, foreground, scale, config)
    frame = SliceFrame.around(foreground, image_size)
    indices = slices_with_foreground(foreground, min_foreground_fraction)
    if axial_slices is not None:
        wanted = {int(i) for i in axial_slices}
        indices = [i for i in indices if i in wanted]
    images = frame.to_model(np.moveaxis(normalised[:, indices], 0, 1))
    return PreparedVolume(orientation, canonical, foreground, normalised, scale, frame, indices, images)
