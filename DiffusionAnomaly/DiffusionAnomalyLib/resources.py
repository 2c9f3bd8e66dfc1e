"""Where the files that ship with DiffusionAnomaly live: the default model and the sample study."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

RESOURCES = Path(__file__).resolve().parents[1] / "Resources"
MODELS = RESOURCES / "Models"
SAMPLE_DATA = RESOURCES / "SampleData"
DEFAULT_MODEL_NAME = "brain-mri-synth-64"
SAMPLE_SUBJECT = "synth-sample"
SAMPLE_CHANNEL_SUFFIXES = ("t1", "t1ce", "t2", "flair")


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(
            f"the {what} is missing at {path}; DiffusionAnomaly's resources ship in the source tree: "
            "install from a checkout with `pip install -e .`"
        )
    return path


def default_model() -> Path:
    """The bundled model's folder."""
    return _require(MODELS / DEFAULT_MODEL_NAME, "bundled default model")


def bundled_models() -> Dict[str, Path]:
    """Every model that ships with DiffusionAnomaly, by name (the default one first)."""
    folders = sorted((f for f in MODELS.iterdir() if (f / "card.json").is_file()), key=lambda f: (f.name != DEFAULT_MODEL_NAME, f.name))
    return {folder.name: folder for folder in folders}


def model_for_sequences(sequences: Sequence[Optional[str]]) -> Tuple[Path, List[int]]:
    """The bundled model that fits a study's sequences, and which volume feeds each of its channels."""
    from .cards import load_card
    from .sequences import choose_model

    models = bundled_models()
    name, order = choose_model(sequences, {name: load_card(folder).channels for name, folder in models.items()})
    return models[name], order


def sample_study() -> Path:
    """The bundled sample subject's folder (BraTS layout: <name>_<suffix>.nii.gz)."""
    return _require(SAMPLE_DATA / SAMPLE_SUBJECT, "bundled sample study")


def verify_sample() -> None:
    """Checks the sample files against ``SampleData/SHA256SUMS``."""
    sums = _require(SAMPLE_DATA / "SHA256SUMS", "sample checksum list")
    for line in sums.read_text(encoding="utf-8").splitlines():
        expected, name = line.split(maxsplit=1)
        path = _require(SAMPLE_DATA / name.strip(), f"sample file {name.strip()}")
        if hashlib.sha256(path.read_bytes()).hexdigest() != expected:
            raise ValueError(f"the sample file {path} does not match its SHA-256 in {sums}: it was modified or damaged; restore it from the repository")


def sample_channels() -> List[Path]:
    """The sample's T1, T1ce, T2 and FLAIR files, verified against their checksums."""
    verify_sample()
    folder = sample_study()
    return [folder / f"{SAMPLE_SUBJECT}_{suffix}.nii.gz" for suffix in SAMPLE_CHANNEL_SUFFIXES]


def sample_mask() -> Path:
    return _require(sample_study() / f"{SAMPLE_SUBJECT}_seg.nii.gz", "sample ground truth")
