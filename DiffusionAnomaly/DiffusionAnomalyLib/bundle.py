"""Model bundles: a folder with ``card.json`` and ``weights.safetensors``.

The weights are safetensors (a model file cannot run code when loaded, unlike a pickle)
and the card records their SHA-256, checked on every load, so a truncated download or a
modified file is refused with a message instead of producing silently wrong maps.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .cards import CARD_FILE, FORMAT, FORMAT_VERSION, WEIGHTS_FILE, BundleError, bundle_dir, load_card, read_card, sha256_of
from .config import ModelCard
from .files import staged_files
from .networks import build_classifier, build_unet

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
    # Weights and card are replaced together, so a bundle never holds weights its card does not describe.
    with staged_files() as stage:
        weights = stage(folder / WEIGHTS_FILE)
        save_file(tensors, str(weights), metadata={"format": "pt"})
        document = {"format": FORMAT, "format_version": FORMAT_VERSION, **card.to_dict()}
        document["weights"] = {"file": WEIGHTS_FILE, "sha256": sha256_of(weights)}
        stage(folder / CARD_FILE).write_text(json.dumps(document, indent=2) + "\n")
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
