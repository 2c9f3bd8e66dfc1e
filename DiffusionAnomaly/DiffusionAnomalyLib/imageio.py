"""Reading and writing volumes (NIfTI, NRRD, anything SimpleITK reads) with their geometry."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk

from .files import staged_files

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

    @classmethod
    def default(cls, dimension: int) -> "Geometry":
        """Unit spacing, zero origin, identity direction in 2D or 3D."""
        return cls((1.0,) * dimension, (0.0,) * dimension, tuple(float(r == c) for r in range(dimension) for c in range(dimension)))

    @property
    def dimension(self) -> int:
        return len(self.spacing)

    def as_3d(self) -> "Geometry":
        """A 2D slice's grid as a one-slice 3D grid (the third axis perpendicular to the slice)."""
        if self.dimension == 3:
            return self
        direction = np.eye(3)
        direction[:2, :2] = np.asarray(self.direction, dtype=float).reshape(2, 2)
        return Geometry(tuple(self.spacing) + (1.0,), tuple(self.origin) + (0.0,), tuple(float(v) for v in direction.ravel()))

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


IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")


def image_suffix(path: Union[str, Path]) -> str:
    """The image extension of ``path`` (``.nii.gz`` counts as one), or ``""`` if it has none we write."""
    name = Path(path).name.lower()
    return next((suffix for suffix in IMAGE_SUFFIXES if name.endswith(suffix)), "")


def _raw_nifti_has_nan(path: Path) -> bool:
    """NaN in a float NIfTI file's own data: SimpleITK's reader turns NaN voxels into zeros."""
    import nibabel

    image = nibabel.load(str(path))
    if not np.issubdtype(image.get_data_dtype(), np.floating):
        return False
    return bool(np.isnan(np.asanyarray(image.dataobj)).any())


def read_dicom_series(folder: Path) -> sitk.Image:
    """The one DICOM series in ``folder`` as a volume (GDCM sorts the slices by position)."""
    reader = sitk.ImageSeriesReader()
    series = list(reader.GetGDCMSeriesIDs(str(folder)))
    if not series:
        raise ValueError(f"{folder} holds no DICOM series: give a folder with the DICOM files of one series, or a NIfTI/NRRD file")
    if len(series) > 1:
        described = [f"{dicom_description(folder, uid) or 'no description'} ({uid})" for uid in series]
        raise ValueError(f"{folder} holds {len(series)} DICOM series: {'; '.join(described)}; give a folder with one series")
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder), series[0]))
    try:
        return reader.Execute()
    except RuntimeError as error:
        raise ValueError(f"cannot read the DICOM series in {folder}: its files are damaged or not image slices") from error


def dicom_description(folder: Path, series: Optional[str] = None) -> str:
    """The Series Description (0008,103E) of a series in ``folder`` (its only one by default), or ``""``."""
    reader = sitk.ImageSeriesReader()
    series = series or next(iter(reader.GetGDCMSeriesIDs(str(folder))), None)
    if series is None:
        return ""
    header = sitk.ImageFileReader()
    header.SetFileName(reader.GetGDCMSeriesFileNames(str(folder), series)[0])
    header.ReadImageInformation()
    return header.GetMetaData("0008|103e").strip() if header.HasMetaDataKey("0008|103e") else ""


def read_image(path: Union[str, Path]) -> sitk.Image:
    """Reads one volume (a file, or a folder holding one DICOM series), naming the input when it cannot.

    NaN or infinite voxels are refused for every format (SimpleITK reads NaN in NIfTI as 0,
    so the file's own data is checked as well).
    """
    path = Path(path)
    if path.is_dir():
        return read_dicom_series(path)
    if not path.is_file():
        raise FileNotFoundError(f"input image {path} does not exist")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise ValueError(f"cannot read {path.name} as an image: a NIfTI (.nii, .nii.gz) or NRRD (.nrrd) volume is needed") from error
    array = sitk.GetArrayViewFromImage(image)
    nan_in_file = path.name.lower().endswith((".nii", ".nii.gz")) and _raw_nifti_has_nan(path)
    if nan_in_file or (np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all()):
        raise ValueError(f"{path.name} contains NaN or infinite voxels; fix or mask them before detection")
    return image


def array_to_image(array: np.ndarray, geometry: Geometry) -> sitk.Image:
    return geometry.applied_to(sitk.GetImageFromArray(array))


def check_output_paths(outputs: Sequence[Union[str, Path]], inputs: Sequence[Union[str, Path]] = ()) -> None:
    """Refuses, before any work, output paths that cannot be written or would destroy data.

    Each output must have an image extension, sit in an existing writable folder, not be a
    folder itself, and differ from every input (also through links) and from every other output.
    """
    seen = {}
    for output in (Path(p) for p in outputs):
        if not image_suffix(output):
            raise ValueError(f"output {output} has no image extension: use one of {', '.join(IMAGE_SUFFIXES)}")
        parent = output.parent
        if not parent.exists():
            raise ValueError(f"the folder of output {output} does not exist: create {parent} first")
        if not parent.is_dir():
            raise ValueError(f"output {output} cannot be written: {parent} is a file, not a folder")
        if not _can_create_files_in(parent):
            raise ValueError(f"output {output} cannot be written: {parent} does not let this user create files")
        if output.is_dir():
            raise ValueError(f"output {output} is an existing folder; give a file name")
        for source in (Path(p) for p in inputs):
            if _same_file(output, source):
                raise ValueError(f"output {output} is the input {source}: the product never overwrites its inputs; choose another output path")
        key = os.path.normcase(os.path.abspath(output))
        clash = seen.get(key) or next((other for other in seen.values() if _same_file(output, other)), None)
        if clash is not None:
            raise ValueError(f"two outputs would be written to {output}; give each output its own path")
        seen[key] = output


def _can_create_files_in(folder: Path) -> bool:
    """Tries it: permissions alone do not tell (read-only mounts, ACLs, the superuser)."""
    try:
        handle, probe = tempfile.mkstemp(dir=folder, prefix=".diffusion-anomaly-probe-")
    except OSError:
        return False
    os.close(handle)
    os.remove(probe)
    return True


def _same_file(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return os.path.normcase(os.path.realpath(a)) == os.path.normcase(os.path.realpath(b))


def write_image(array: np.ndarray, geometry: Geometry, path: Union[str, Path]) -> Path:
    """Writes one image atomically; the format follows the file extension."""
    return write_images([(array, geometry, path)])[0]


def write_images(items: Sequence[Tuple[np.ndarray, Geometry, Union[str, Path]]]) -> List[Path]:
    """Writes several images so that either all of them appear or none does (see :func:`staged_files`)."""
    paths = [Path(path) for _, _, path in items]
    with staged_files() as stage:
        for (array, geometry, _), path in zip(items, paths):
            sitk.WriteImage(array_to_image(array, geometry), str(stage(path, image_suffix(path) or path.suffix)), useCompression=True)
    return paths


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

