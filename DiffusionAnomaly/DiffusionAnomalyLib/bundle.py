"""Model bundles: a folder with ``card.json`` and ``weights.safetensors``.

The weights are safetensors (a model file cannot run code when loaded, unlike a pickle)
and the card records their SHA-256, checked on every load, so a truncated download or a
modified file is refused with a message instead of producing silently wrong maps.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import ModelCard
from .networks import build_classifier, build_unet

CARD_FILE = "card.json"
WEIGHTS_FILE = "weights.safetensors"
FORMAT = "diffusion-anomaly-model"
FORMAT_VERSION = 1


class BundleError(ValueError):
    """A model bundle is missing, damaged, tampered with or does not fit its card."""


@dataclass
class ModelBundle:
    """The card and the networks of a model; ``classifier`` is ``None`` until one is trained."""

    card: ModelCard
    unet: torch.nn.Module
    classifier: Optional[torch.nn.Module]
    path: Optional[Path] = None

    def to(self, device: Union[str, torch.device]) -> "ModelBundle":
        self.unet.to(device)
        if self.classifier is not None:
            self.classifier.to(device)
        return self


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


def _write_atomically(target: Path, write) -> None:
    """Writes through a temporary file in the same folder, so a crash never leaves half a file."""
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    os.close(handle)
    try:
        write(Path(temporary))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp makes the file private; a bundle is meant to be shared
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def save_bundle(path: Union[str, Path], card: ModelCard, unet: torch.nn.Module, classifier: Optional[torch.nn.Module] = None) -> Path:
    """Writes (or replaces) a bundle; returns its folder."""
    card.validate()
    if classifier is not None and card.classifier is None:
        raise ValueError("a classifier was given but the card has no classifier configuration")
    folder = bundle_dir(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: Dict[str, torch.Tensor] = {}
    for prefix, network in (("unet", unet), ("classifier", classifier)):
        if network is not None:
            for key, value in network.state_dict().items():
                tensors[f"{prefix}.{key}"] = value.detach().to("cpu", copy=True).contiguous()
    weights = folder / WEIGHTS_FILE
    _write_atomically(weights, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    document = {"format": FORMAT, "format_version": FORMAT_VERSION, **card.to_dict()}
    document["weights"] = {"file": WEIGHTS_FILE, "sha256": sha256_of(weights)}
    _write_atomically(folder / CARD_FILE, lambda tmp: tmp.write_text(json.dumps(document, indent=2) + "\n"))
    return folder


def read_card(path: Union[str, Path]) -> dict:
    """The raw card document of a bundle, with clear errors for a missing or broken card."""
    folder = bundle_dir(path)
    card_path = folder / CARD_FILE
    if not card_path.is_file():
        raise BundleError(f"no model bundle at {folder}: expected a folder with {CARD_FILE} and {WEIGHTS_FILE}")
    try:
        document = json.loads(card_path.read_text())
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
    _write_atomically(folder / CARD_FILE, lambda tmp: tmp.write_text(json.dumps(updated, indent=2) + "\n"))
    return folder


def load_bundle(path: Union[str, Path], device: Union[str, torch.device] = "cpu") -> ModelBundle:
    """Loads and verifies a bundle; networks are returned in eval mode on ``device``."""
    folder = bundle_dir(path)
    document = read_card(folder)
    card = load_card(folder)
    weights_info = document.get("weights") or {}
    weights = folder / str(weights_info.get("file", WEIGHTS_FILE))
    if not weights.is_file():
        raise BundleError(f"the model weights {weights} are missing; copy the whole bundle folder")
    expected = weights_info.get("sha256")
    if not expected:
        raise BundleError(f"{folder / CARD_FILE} records no SHA-256 for its weights; refusing unverified weights")
    actual = sha256_of(weights)
    if actual != expected:
        raise BundleError(
            f"the weights {weights} do not match the SHA-256 in {CARD_FILE} (expected {expected[:12]}…, got "
            f"{actual[:12]}…): the file is truncated or was modified; download or export the model again"
        )
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as error:
        raise BundleError(f"cannot read {weights}: {error}") from error

    def restore(prefix: str, network: torch.nn.Module) -> torch.nn.Module:
        state = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
        try:
            network.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise BundleError(f"the {prefix} weights in {weights} do not fit the architecture in {CARD_FILE}: {error}") from error
        return network.eval().to(device)

    unet = restore("unet", build_unet(card))
    classifier = restore("classifier", build_classifier(card)) if card.classifier is not None else None
    return ModelBundle(card=card, unet=unet, classifier=classifier, path=folder)
