"""Brain extraction: is a scan skull-stripped already, and if not, which of its voxels are brain.

Detection needs the brain: its intensities set the normalisation, only its slices are
translated, and nothing outside it may be flagged. Skull-stripped inputs (BraTS) carry it
as their non-zero voxels; a head as the scanner writes it goes through deepbet (Fisch et al.
2024, MIT licence), a 3D U-Net whose weights ship inside its wheel and which runs on the CPU
in seconds. It was trained on T1-weighted heads, so the most T1-like channel is given to it.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from .imageio import Geometry
from .settings import BRAIN_MASK_MODES

# A skull-stripped scan is mostly one constant background around at most this much tissue.
STRIPPED_MAX_ML = 2200.0
STRIPPED_MIN_BACKGROUND = 0.3
# What a brain extraction may find in a head MRI (a partial field of view gives less).
BRAIN_ML_RANGE = (150.0, 2600.0)
_T1_LIKE_ORDER = ("t1", "t1ce", "t1c", "t1gd")


@dataclass
class BrainMask:
    """The brain voxels of a scan on its own grid, and how they were found."""

    mask: np.ndarray  # bool, (k, j, i) on the input grid
    source: str  # "skull-stripped input", "deepbet (T1)", "given mask"
    seconds: float = 0.0

    def describe(self) -> str:
        volume = f"{self.mask.sum():,} voxels"
        timing = f" in {self.seconds:.1f} s" if self.seconds >= 0.05 else ""
        return f"brain: {self.source}{timing} ({volume})"


def voxel_ml(geometry: Geometry) -> float:
    return float(np.prod(geometry.as_3d().spacing)) / 1000.0


def looks_skull_stripped(arrays: np.ndarray, geometry: Geometry) -> bool:
    """A constant background around at most a brain's volume of tissue (BraTS-style inputs)."""
    first = arrays[0]
    background = first == first.min()
    tissue_ml = float((~background).sum()) * voxel_ml(geometry)
    return bool(background.mean() >= STRIPPED_MIN_BACKGROUND and tissue_ml <= STRIPPED_MAX_ML)


def _extraction_channel(channel_names: Sequence[str]) -> int:
    names = [name.lower() for name in channel_names]
    return next((names.index(name) for name in _T1_LIKE_ORDER if name in names), 0)


@functools.lru_cache(maxsize=1)
def _deepbet(use_gpu: bool):
    try:
        from deepbet import BrainExtraction
    except ImportError as error:
        raise ImportError(f"brain extraction needs deepbet (pip install deepbet), which is missing ({error}); "
                          "give skull-stripped images with brain mask 'none' or a brain mask file instead") from error
    return BrainExtraction(no_gpu=not use_gpu)


def extract_brain(arrays: np.ndarray, geometry: Geometry, channel_names: Sequence[str]) -> BrainMask:
    """deepbet's brain mask of the most T1-like channel of a (C, k, j, i) head scan."""
    import nibabel
    import torch

    started = time.perf_counter()
    index = _extraction_channel(channel_names)
    grid = geometry.as_3d()
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(grid.direction, dtype=float).reshape(3, 3) * np.asarray(grid.spacing, dtype=float)
    affine[:3, 3] = grid.origin
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine  # LPS (SimpleITK) to RAS (NIfTI)
    volume = np.ascontiguousarray(np.transpose(arrays[index], (2, 1, 0)), dtype=np.float32)
    try:
        _, mask_image, _ = _deepbet(torch.cuda.is_available()).run(nibabel.Nifti1Image(volume, affine))
    except (AssertionError, ValueError) as error:
        raise ValueError(f"brain extraction found no head in {channel_names[index]}: this does not look like a head MRI "
                         "(give a brain mask, or skull-stripped images with brain mask 'none')") from error
    mask = np.ascontiguousarray(np.transpose(np.asarray(mask_image.dataobj) > 0, (2, 1, 0)))
    found_ml = float(mask.sum()) * voxel_ml(geometry)
    low, high = BRAIN_ML_RANGE
    if not low <= found_ml <= high:
        raise ValueError(f"brain extraction found {found_ml:,.0f} ml of brain in {channel_names[index]} (a brain is about 1,000-1,700 ml): "
                         "this does not look like a head MRI; give a brain mask, or skull-stripped images with brain mask 'none'")
    return BrainMask(mask, f"extracted by deepbet from {channel_names[index]}", time.perf_counter() - started)


def find_brain(arrays: np.ndarray, geometry: Geometry, channel_names: Sequence[str], mode: str = "auto",
               given: Optional[np.ndarray] = None) -> Optional[BrainMask]:
    """The brain of a (C, k, j, i) scan: ``given`` if there is one, else as ``mode`` says.

    ``auto`` extracts the brain unless the scan is skull-stripped already; ``extract`` always
    does; ``none`` returns ``None`` (the model card's foreground rule, for skull-stripped data).
    """
    if given is not None:
        mask = np.asarray(given)
        if mask.shape != arrays.shape[1:]:
            raise ValueError(f"the brain mask has shape {mask.shape} but the images {arrays.shape[1:]}: "
                             "give a mask on the grid of the first input (resample it onto that image)")
        if not (mask > 0).any():
            raise ValueError("the brain mask is empty: it marks no voxel as brain")
        return BrainMask(mask > 0, "given mask")
    if mode not in BRAIN_MASK_MODES:
        raise ValueError(f"brain mask must be one of {', '.join(BRAIN_MASK_MODES)} or a mask, got {mode!r}")
    if mode == "none" or (mode == "auto" and looks_skull_stripped(arrays, geometry)):
        if mode == "none":
            return None
        return BrainMask(np.any(arrays != arrays.min(axis=(1, 2, 3), keepdims=True), axis=0), "skull-stripped input")
    return extract_brain(arrays, geometry, channel_names)
