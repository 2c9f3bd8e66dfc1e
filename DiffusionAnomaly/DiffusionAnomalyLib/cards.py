"""Model cards: reading, checking and updating a bundle's ``card.json`` without PyTorch.

A front end can show a model's channels, defaults and scores, and check settings against
them, before PyTorch or MONAI are installed; :mod:`.bundle` adds the weights.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Union

from .config import ModelCard
from .files import staged_files

CARD_FILE = "card.json"
WEIGHTS_FILE = "weights.safetensors"
FORMAT = "diffusion-anomaly-model"
FORMAT_VERSION = 1


class BundleError(ValueError):
    """A model bundle is missing, damaged, tampered with or does not fit its card."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def bundle_dir(path: Union[str, Path]) -> Path:
    """Accepts the bundle folder or its ``card.json``."""
    path = Path(path)
    return path.parent if path.name == CARD_FILE else path


def read_card(path: Union[str, Path]) -> dict:
    """The raw card document of a bundle, with clear errors for a missing or broken card."""
    folder = bundle_dir(path)
    card_path = folder / CARD_FILE
    if not card_path.is_file():
        raise BundleError(f"no model bundle at {folder}: expected a folder with {CARD_FILE} and {WEIGHTS_FILE}")
    try:
        document = json.loads(card_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BundleError(f"{card_path} is not valid JSON ({error}); the bundle is damaged") from error
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise BundleError(f"{card_path} is not a DiffusionAnomaly model card (missing \"format\": \"{FORMAT}\")")
    if document.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"{card_path} has format version {document.get('format_version')}; this version of DiffusionAnomaly "
            f"reads version {FORMAT_VERSION}: update DiffusionAnomaly or re-export the model"
        )
    return document


def load_card(path: Union[str, Path]) -> ModelCard:
    document = read_card(path)
    fields = {k: v for k, v in document.items() if k not in ("format", "format_version", "weights")}
    try:
        return ModelCard.from_dict(fields)
    except (TypeError, ValueError) as error:
        raise BundleError(f"the model card in {bundle_dir(path)} is incompatible: {error}") from error


def update_card(path: Union[str, Path], card: ModelCard) -> Path:
    """Rewrites a bundle's card (defaults, metrics, description) without touching its weights.

    The architecture must stay the same: the weights were made for it.
    """
    folder = bundle_dir(path)
    document = read_card(folder)
    current = load_card(folder)
    for name in ("channels", "image_size", "unet", "classifier", "class_conditional", "healthy_class", "schedule", "normalisation"):
        if getattr(current, name) != getattr(card, name):
            raise ValueError(f"'{name}' describes the weights and cannot change without retraining")
    card.validate()
    updated = {"format": FORMAT, "format_version": FORMAT_VERSION, **card.to_dict(), "weights": document["weights"]}
    with staged_files() as stage:
        stage(folder / CARD_FILE).write_text(json.dumps(updated, indent=2) + "\n", encoding="utf-8")
    return folder
