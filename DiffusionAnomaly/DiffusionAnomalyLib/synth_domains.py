"""Acquisition domains of the synthetic data: how "scanners" differ, and clinical voxel grids.

A domain fixes the ranges the generator draws acquisition effects from (contrast, gamma,
noise, bias field, blur), the voxel grid studies are written on (isotropic research grids,
or thick clinical slices, possibly tilted) and whether the head is kept around the brain.
``standard`` is what models are trained and tuned on; the others are shifted domains for
testing that what was tuned there holds elsewhere.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import numpy as np
import SimpleITK as sitk

# Mean signal of each pure tissue per sequence, relative to white matter on T1.
# T1: WM > GM > CSF; T2 inverts grey/white and makes CSF brightest; FLAIR keeps the
# T2 grey/white order but suppresses CSF.
TISSUE_INTENSITY = {
    "t1": {"wm": 1.00, "gm": 0.62, "csf": 0.22},
    "t1ce": {"wm": 1.00, "gm": 0.66, "csf": 0.22},
    "t2": {"wm": 0.42, "gm": 0.62, "csf": 1.50},
    "flair": {"wm": 0.55, "gm": 0.78, "csf": 0.12},
}
# The head around the brain: fat is bright on T1 and T2, bone dark everywhere, soft tissue
# (skin, muscle) in between; fat is not suppressed in these sequences.
HEAD_INTENSITY = {
    "t1": {"fat": 1.30, "soft": 0.55, "bone": 0.07},
    "t1ce": {"fat": 1.30, "soft": 0.65, "bone": 0.07},
    "t2": {"fat": 0.95, "soft": 0.40, "bone": 0.08},
    "flair": {"fat": 1.00, "soft": 0.50, "bone": 0.06},
}
# Another vendor, field strength and sequence tuning: less grey/white contrast on T1, a
# brighter grey matter on T2, incompletely suppressed CSF on FLAIR.
SHIFTED_TISSUE_INTENSITY = {
    "t1": {"wm": 1.00, "gm": 0.74, "csf": 0.30},
    "t1ce": {"wm": 1.00, "gm": 0.77, "csf": 0.30},
    "t2": {"wm": 0.50, "gm": 0.75, "csf": 1.30},
    "flair": {"wm": 0.60, "gm": 0.82, "csf": 0.30},
}


@dataclass(frozen=True)
class Domain:
    """Where the generator draws a study's acquisition from.

    Args:
        tissue_intensity: mean signal per sequence and tissue.
        contrast_jitter: per-subject relative spread of those means.
        gamma: range of the intensity gamma.
        noise: range of the Rician noise level, relative to the brightest tissue.
        bias: range of the bias field's strength (log scale).
        blur_probability: how often one axis is blurred as in thick 2D acquisitions.
        spacing_mm: isotropic voxel size the anatomy is generated at.
        slice_mm, in_plane_mm: a clinical grid to write the study on (axial slices of this
            thickness, with this in-plane spacing), or ``None`` for the generation grid.
        tilt_degrees: rotation of that grid about the left-right axis (oblique slices).
        skull: keep the head around the brain (the anatomy must have one).
    """

    name: str
    tissue_intensity: Dict[str, Dict[str, float]] = field(default_factory=lambda: TISSUE_INTENSITY)
    contrast_jitter: float = 0.05
    gamma: Tuple[float, float] = (0.85, 1.15)
    noise: Tuple[float, float] = (0.01, 0.04)
    bias: Tuple[float, float] = (0.05, 0.2)
    blur_probability: float = 0.3
    spacing_mm: float = 1.5
    slice_mm: Optional[float] = None
    in_plane_mm: Optional[float] = None
    tilt_degrees: float = 0.0
    skull: bool = False

    def replace(self, **changes) -> "Domain":
        return dataclasses.replace(self, **changes)


STANDARD = Domain("standard")
DOMAINS: Dict[str, Domain] = {
    "standard": STANDARD,
    "contrast": STANDARD.replace(name="contrast", tissue_intensity=SHIFTED_TISSUE_INTENSITY),
    "gamma": STANDARD.replace(name="gamma", gamma=(0.6, 0.7)),
    "noise": STANDARD.replace(name="noise", noise=(0.06, 0.09)),
    "bias": STANDARD.replace(name="bias", bias=(0.35, 0.5)),
    "lowres": STANDARD.replace(name="lowres", spacing_mm=3.0),
    "thick": STANDARD.replace(name="thick", slice_mm=6.0, in_plane_mm=0.9),
    "oblique": STANDARD.replace(name="oblique", slice_mm=5.0, in_plane_mm=0.9, tilt_degrees=20.0),
    "skull": STANDARD.replace(name="skull", skull=True),
}


def domain(name: str) -> Domain:
    if name not in DOMAINS:
        raise ValueError(f"unknown domain {name!r}; choose from {', '.join(DOMAINS)}")
    return DOMAINS[name]


@dataclass(frozen=True)
class ClinicalGrid:
    """Axial slices of ``slice_mm`` with ``in_plane_mm`` pixels, tilted about the left-right axis."""

    origin: Tuple[float, float, float]
    spacing: Tuple[float, float, float]
    direction: Tuple[float, ...]
    size: Tuple[int, int, int]  # SimpleITK order (i, j, k)

    @classmethod
    def covering(cls, low: np.ndarray, high: np.ndarray, slice_mm: float, in_plane_mm: float, tilt_degrees: float) -> "ClinicalGrid":
        """The smallest such grid covering the LPS box from ``low`` to ``high``."""
        angle = math.radians(tilt_degrees)
        direction = np.array([[1.0, 0.0, 0.0], [0.0, math.cos(angle), -math.sin(angle)], [0.0, math.sin(angle), math.cos(angle)]])
        corners = np.array([[x, y, z] for x in (low[0], high[0]) for y in (low[1], high[1]) for z in (low[2], high[2])])
        local = corners @ direction  # coordinates along the grid's axes
        spacing = np.array([in_plane_mm, in_plane_mm, slice_mm])
        size = np.ceil((local.max(axis=0) - local.min(axis=0)) / spacing).astype(int) + 1
        origin = direction @ local.min(axis=0)
        return cls(tuple(origin), tuple(spacing), tuple(direction.ravel()), tuple(int(n) for n in size))

    def resample(self, image: sitk.Image, interpolator=sitk.sitkLinear, slice_profile: bool = True) -> sitk.Image:
        """``image`` on this grid; with ``slice_profile`` each slice averages its thickness (a Gaussian profile)."""
        if slice_profile:
            from scipy import ndimage

            sigma_mm = self.spacing[2] / 2.355  # the slice's full width at half maximum is its thickness
            normal = np.asarray(self.direction).reshape(3, 3)[:, 2]
            # Blur along the image axis closest to the slice normal (exact for untilted grids).
            axis = int(np.argmax(np.abs(np.asarray(image.GetDirection()).reshape(3, 3).T @ normal)))
            sigmas = [0.0, 0.0, 0.0]
            sigmas[2 - axis] = sigma_mm / image.GetSpacing()[axis]  # numpy order (k, j, i)
            blurred = sitk.GetImageFromArray(ndimage.gaussian_filter(sitk.GetArrayFromImage(image), sigmas))
            blurred.CopyInformation(image)
            image = blurred
        reference = sitk.Image(list(self.size), image.GetPixelID())
        reference.SetOrigin(self.origin)
        reference.SetSpacing(self.spacing)
        reference.SetDirection(self.direction)
        return sitk.Resample(image, reference, sitk.Transform(), interpolator, 0.0, image.GetPixelID())
