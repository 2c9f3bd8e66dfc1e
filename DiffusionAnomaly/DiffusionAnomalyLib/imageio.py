"""Reading and writing volumes (NIfTI, NRRD, anything SimpleITK reads) with their geometry."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk

GEOMETRY_TOLERANCE = 1e-4


@dataclass(frozen=True)
class Geometry:
    """Voxel grid of a volume in SimpleITK conventions (LPS, index order i, j, k).

    Arrays that go with it are in numpy order (k, j, i), as ``sitk.GetArrayFromImage`` gives.
    """

    spacing: Tuple[float, ...] = (1.0, 1.0, 1.0)
    origin: Tuple[float, ...] = (0.0, 0.0, 0.0)
    direction: Tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    @classmethod
    def of(cls, image: sitk.Image) -> "Geometry":
        return cls(tuple(image.GetSpacing()), tuple(image.GetOrigin()), tuple(image.GetDirection()))

    def applied_to(self, image: sitk.Image) -> sitk.Image:
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def bounds(self, shape: Sequence[int]) -> Tuple[np.ndarray, np.ndarray]:
        """Lower and upper physical (LPS) corners of the box that a (k, j, i) array of ``shape`` covers."""
        size = np.array(list(reversed(tuple(shape))), dtype=float)
        corners = np.array([[c[0], c[1], c[2]] for c in np.ndindex(2, 2, 2)], dtype=float) * (size - 1)
        matrix = np.asarray(self.direction, dtype=float).reshape(3, 3) * np.asarray(self.spacing, dtype=float)
        points = corners @ matrix.T + np.asarray(self.origin, dtype=float)
        return points.min(axis=0), points.max(axis=0)

    def overlap(self, shape: Sequence[int], other: "Geometry", other_shape: Sequence[int]) -> float:
        """Fraction of this grid's bounding box that the other grid's bounding box covers."""
        low, high = self.bounds(shape)
        other_low, other_high = other.bounds(other_shape)
        extent = np.maximum(high - low, 1e-6)
        shared = np.clip(np.minimum(high, other_high) - np.maximum(low, other_low), 0.0, None)
        shared = np.where(high - low < 1e-6, (other_low <= low) & (low <= other_high), shared / extent)
        return float(np.prod(shared))

    def differences(self, other: "Geometry") -> list:
        """Names of the grid properties that differ beyond a small tolerance."""
        return [
            name
            for name in ("spacing", "origin", "direction")
            if not np.allclose(getattr(self, name), getattr(other, name), atol=GEOMETRY_TOLERANCE, rtol=GEOMETRY_TOLERANCE)
        ]


def read_image(path: Union[str, Path]) -> sitk.Image:
    """Reads one volume, with a message that names the file when it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input image {path} does not exist")
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise ValueError(f"cannot read {path} as an image (NIfTI .nii/.nii.gz or NRRD .nrrd expected): {error}") from error


def array_to_image(array: np.ndarray, geometry: Geometry) -> sitk.Image:
    return geometry.applied_to(sitk.GetImageFromArray(array))


def write_image(array: np.ndarray, geometry: Geometry, path: Union[str, Path]) -> Path:
    """Writes an array with the given geometry; the format follows the file extension."""
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(array_to_image(array, geometry), str(path), useCompression=True)
    return path


def check_same_grid(images: Sequence[sitk.Image], names: Sequence[str]) -> None:
    """Refuses channels that are not on one voxel grid, naming the first mismatch."""
    reference = images[0]
    for name, image in zip(names[1:], images[1:]):
        if image.GetSize() != reference.GetSize():
            raise ValueError(
                f"channel {name} has size {image.GetSize()} but {names[0]} has {reference.GetSize()}: "
                "all channels must share one voxel grid; resample them onto the first channel"
            )
        differing = Geometry.of(reference).differences(Geometry.of(image))
        if differing:
            raise ValueError(
                f"channel {name} differs from {names[0]} in {', '.join(differing)}: all channels must share "
                "one voxel grid; resample them onto the first channel"
            )


def resample_onto(array: np.ndarray, geometry: Geometry, reference: Geometry, reference_shape: Sequence[int]) -> np.ndarray:
    """Linearly resamples a (k, j, i) array onto another voxel grid (zero outside its extent)."""
    moving = array_to_image(np.asarray(array, dtype=np.float32), geometry)
    target = reference.applied_to(sitk.Image([int(n) for n in reversed(tuple(reference_shape))], sitk.sitkFloat32))
    resampled = sitk.Resample(moving, target, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(resampled)

