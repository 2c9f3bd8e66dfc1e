"""Training and evaluation data: subjects from a BraTS-layout folder or a CSV, cut into slices.

A slice is labelled diseased (1) when its mask has a voxel of the model's lesion region (any
voxel > 0 for the whole lesion), healthy (0) when it has no lesion voxel at all: image-level
labels are all the method needs for training. A slice holding only other parts of a lesion
(oedema without core, for a ``core`` model) is neither and is left out of training.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk
import torch
from torch.utils.data import Dataset

from .config import LESION_REGIONS, ModelCard, check_lesion_region
from .imageio import check_same_grid, read_image
from .preprocessing import PreparedVolume, prepare_volume

# Channel name → file-name suffixes, the BraTS 2018–2021 names first, then BraTS 2023's.
BRATS_SUFFIXES: Dict[str, Tuple[str, ...]] = {
    "T1": ("t1", "t1n"),
    "T1ce": ("t1ce", "t1c"),
    "T2": ("t2", "t2w"),
    "FLAIR": ("flair", "t2f"),
}
MASK_SUFFIXES = ("seg",)
BRATS_CHANNELS = ("T1", "T1ce", "T2", "FLAIR")
HEALTHY, DISEASED = 0, 1
OTHER_LESION = -1  # a slice with lesion voxels outside the model's region: not used for training


def lesion_region(mask: np.ndarray, region: str = "whole") -> np.ndarray:
    """The voxels of a BraTS label map that belong to ``region`` (see ``LESION_REGIONS``)."""
    check_lesion_region(region)
    labels = LESION_REGIONS[region]
    return mask > 0 if labels is None else np.isin(mask, labels)


@dataclass
class Subject:
    """One study: a file per channel (in the model's order) and an optional lesion mask.

    ``healthy``: the same channels before the lesion was put in, where a synthetic dataset
    has them (``*_healthy_<sequence>``), for measuring how well a translation heals.
    ``brain_mask``: the true brain (``*_brainmask``) of a skull-on synthetic study.
    """

    name: str
    channels: List[Path]
    mask: Optional[Path] = None
    healthy: Optional[List[Path]] = None
    brain_mask: Optional[Path] = None


# Files of a subject folder that are not acquisitions of the subject.
_NOT_AN_ACQUISITION = re.compile(r"[_-](healthy)[_-]", re.IGNORECASE)


def _find_by_suffix(folder: Path, suffixes: Sequence[str], prefix: str = "") -> Optional[Path]:
    """The file ``*[_-]<prefix><suffix>.<image extension>``; without a prefix, derived files are left out."""
    pattern = re.compile(r".*[_-]%s(%s)\.(nii\.gz|nii|nrrd|mha|mhd)$" % (re.escape(prefix), "|".join(re.escape(s) for s in suffixes)), re.IGNORECASE)
    matches = sorted(p for p in folder.iterdir() if p.is_file() and pattern.match(p.name) and (prefix or not _NOT_AN_ACQUISITION.search(p.name)))
    return matches[0] if matches else None


def find_brats_subjects(root: Union[str, Path], channels: Sequence[str] = BRATS_CHANNELS) -> List[Subject]:
    """Subjects of a BraTS-layout folder: one sub-folder per subject with ``*_t1``, ``*_t1ce``,
    ``*_t2``, ``*_flair`` and ``*_seg`` files (BraTS 2023's ``-t1n``/``-t1c``/``-t2w``/``-t2f``/``-seg`` too)."""
    root = Path(root)
    unknown = [c for c in channels if c not in BRATS_SUFFIXES]
    if unknown:
        raise ValueError(f"unknown BraTS channel(s) {unknown}; choose from {', '.join(BRATS_SUFFIXES)}")
    subjects = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = [_find_by_suffix(folder, BRATS_SUFFIXES[c]) for c in channels]
        missing = [c for c, f in zip(channels, files) if f is None]
        if len(missing) == len(channels):
            continue  # not a subject folder
        if missing:
            raise ValueError(f"subject {folder.name} has no file for channel(s) {', '.join(missing)} in {folder}")
        healthy = [_find_by_suffix(folder, BRATS_SUFFIXES[c], prefix="healthy_") for c in channels]
        subjects.append(Subject(folder.name, files, _find_by_suffix(folder, MASK_SUFFIXES),  # type: ignore[arg-type]
                                healthy if all(healthy) else None, _find_by_suffix(folder, ("brainmask",))))
    if not subjects:
        raise ValueError(f"no BraTS-layout subject folders in {root} (expected e.g. {root}/<subject>/<subject>_flair.nii.gz)")
    return subjects


def read_subject_csv(path: Union[str, Path], channels: Optional[Sequence[str]] = None) -> Tuple[List[str], List[Subject]]:
    """Subjects listed in a CSV with a ``subject`` column, one column per channel and an
    optional ``mask`` column; relative paths are taken from the CSV's folder.

    Returns the channel names (the CSV's column order, or ``channels`` if given) and the subjects.
    """
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as stream:
        rows = list(csv.DictReader(stream))
    if not rows:
        raise ValueError(f"{path} lists no subjects")
    columns = list(rows[0].keys())
    if "subject" not in columns:
        raise ValueError(f"{path} needs a 'subject' column; it has {columns}")
    available = [c for c in columns if c not in ("subject", "mask")]
    names = list(channels) if channels else available
    missing = [c for c in names if c not in available]
    if missing:
        raise ValueError(f"{path} has no column for channel(s) {missing}; its channel columns are {available}")

    def resolve(value: str) -> Path:
        p = Path(value)
        return p if p.is_absolute() else path.parent / p

    subjects = [
        Subject(row["subject"], [resolve(row[c]) for c in names], resolve(row["mask"]) if row.get("mask") else None)
        for row in rows
    ]
    return names, subjects


def load_subjects(data: Union[str, Path], channels: Sequence[str]) -> List[Subject]:
    """Subjects from a BraTS folder or a CSV file, channels in the given order."""
    data = Path(data)
    if data.is_dir():
        return find_brats_subjects(data, channels)
    if data.suffix.lower() == ".csv":
        return read_subject_csv(data, channels)[1]
    raise ValueError(f"{data} is neither a BraTS-layout folder nor a .csv subject list")


def read_subject(subject: Subject, channel_names: Sequence[str]) -> Tuple[np.ndarray, sitk.Image, Optional[np.ndarray]]:
    """The channels stacked as (C, k, j, i) float32, the first image (for its grid) and the mask array."""
    images = [read_image(p) for p in subject.channels]
    check_same_grid(images, [f"{subject.name}/{n}" for n in channel_names])
    arrays = np.stack([sitk.GetArrayFromImage(i) for i in images]).astype(np.float32)
    mask = None
    if subject.mask is not None:
        mask_image = read_image(subject.mask)
        check_same_grid([images[0], mask_image], [f"{subject.name}/{channel_names[0]}", f"{subject.name}/mask"])
        mask = sitk.GetArrayFromImage(mask_image)
    return arrays, images[0], mask


@dataclass
class SubjectSlices:
    prepared: PreparedVolume
    labels: np.ndarray  # per prepared slice: HEALTHY, DISEASED or OTHER_LESION


def labelled_slices(
    arrays: np.ndarray, direction: Sequence[float], mask: Optional[np.ndarray], card: ModelCard, min_foreground_fraction: float = 0.0
) -> SubjectSlices:
    """Model-size slices of a (C, k, j, i) volume and their image-level labels (healthy without a mask)."""
    prepared = prepare_volume(arrays, direction, card.channels, card.image_size, card.normalisation, min_foreground_fraction)
    labels = np.full(len(prepared.indices), HEALTHY, dtype=np.int64)
    if mask is not None:

        def in_slice(voxels: np.ndarray) -> np.ndarray:
            return prepared.orientation.to_canonical(voxels)[prepared.indices].reshape(len(prepared.indices), -1).any(axis=1)

        labels[in_slice(mask > 0)] = OTHER_LESION
        labels[in_slice(lesion_region(mask, card.lesion_region))] = DISEASED
    return SubjectSlices(prepared, labels)


def subject_slices(subject: Subject, card: ModelCard, min_foreground_fraction: float = 0.0) -> SubjectSlices:
    """A subject's model-size slices and their image-level labels, read from its files."""
    arrays, reference, mask = read_subject(subject, card.channels)
    return labelled_slices(arrays, reference.GetDirection(), mask, card, min_foreground_fraction)


class SliceDataset(Dataset):
    """All training slices in memory (float16 to halve the footprint) with their labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images = images
        self.labels = labels

    @classmethod
    def from_subjects(
        cls,
        subjects: Sequence[Subject],
        card: ModelCard,
        min_foreground_fraction: float = 0.05,
        progress: Optional[Callable[[int, int], None]] = None,
    ) -> "SliceDataset":
        images, labels = [], []
        for number, subject in enumerate(subjects, 1):
            slices = subject_slices(subject, card, min_foreground_fraction)
            used = torch.from_numpy(slices.labels != OTHER_LESION)
            images.append(slices.prepared.images.to(torch.float16)[used])
            labels.append(torch.from_numpy(slices.labels)[used])
            if progress is not None:
                progress(number, len(subjects))
        return cls(torch.cat(images), torch.cat(labels))

    def subset(self, label: int) -> "SliceDataset":
        keep = self.labels == label
        return SliceDataset(self.images[keep], self.labels[keep])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.images[index].float(), self.labels[index]
