"""Model bundles: a folder with ``card.json`` and the weights in safetensors files.

The weights are safetensors (a model file cannot run code when loaded, unlike a pickle)
and the card records their SHA-256, checked on every load, so a truncated download or a
modified file is refused with a message instead of producing silently wrong maps. They
may be stored in fp16 (half the size; loaded into fp32 networks) and split into files of a
limited size (``weights-1-of-3.safetensors``, ...), e.g. to move them through a channel
that limits file sizes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

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


PART = "::part"
# Room left in each file for safetensors' header (a JSON entry per tensor).
_HEADER_BYTES_PER_TENSOR = 160


def _pieces(name: str, tensor: torch.Tensor, max_bytes: Optional[int]) -> List[Tuple[str, torch.Tensor]]:
    """A tensor larger than ``max_bytes`` cut along its first axis into parts ``name::partN``."""
    nbytes = tensor.numel() * tensor.element_size()
    if max_bytes is None or nbytes <= max_bytes or tensor.dim() == 0:
        return [(name, tensor)]
    rows = max(1, int(max_bytes // max(nbytes // tensor.shape[0], 1)))
    return [(f"{name}{PART}{i}", part.contiguous()) for i, part in enumerate(tensor.split(rows))]


def _shards(tensors: Dict[str, torch.Tensor], max_file_bytes: Optional[int]) -> List[Dict[str, torch.Tensor]]:
    """Tensors packed, in order, into groups whose files stay under ``max_file_bytes``."""
    budget = None if max_file_bytes is None else max(max_file_bytes - 8 * _HEADER_BYTES_PER_TENSOR, 1)
    groups: List[Dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        for piece_name, piece in _pieces(name, tensor, budget):
            nbytes = piece.numel() * piece.element_size() + _HEADER_BYTES_PER_TENSOR
            if budget is not None and groups[-1] and size + nbytes > budget:
                groups.append({})
                size = 0
            groups[-1][piece_name] = piece
            size += nbytes
    return groups


def _joined(tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Tensors stored in parts put back together."""
    parts: Dict[str, List[Tuple[int, torch.Tensor]]] = {}
    whole = {}
    for name, tensor in tensors.items():
        if PART in name:
            base, index = name.rsplit(PART, 1)
            parts.setdefault(base, []).append((int(index), tensor))
        else:
            whole[name] = tensor
    for base, pieces in parts.items():
        whole[base] = torch.cat([tensor for _, tensor in sorted(pieces, key=lambda item: item[0])])
    return whole


def save_bundle(path: Union[str, Path], card: ModelCard, unet: torch.nn.Module, classifier: Optional[torch.nn.Module] = None,
                dtype: torch.dtype = torch.float32, max_file_bytes: Optional[int] = None) -> Path:
    """Writes (or replaces) a bundle; returns its folder.

    Args:
        dtype: storage type of the floating-point weights (``torch.float16`` halves the files).
        max_file_bytes: split the weights into files of at most about this size (``None``: one file).
    """
    card.validate()
    if classifier is not None and card.classifier is None:
        raise ValueError("a classifier was given but the card has no classifier configuration")
    folder = bundle_dir(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: Dict[str, torch.Tensor] = {}
    for prefix, network in (("unet", unet), ("classifier", classifier)):
        if network is not None:
            for key, value in network.state_dict().items():
                value = value.detach().to("cpu", copy=True)
                tensors[f"{prefix}.{key}"] = (value.to(dtype) if value.is_floating_point() else value).contiguous()
    shards = _shards(tensors, max_file_bytes)
    names = [WEIGHTS_FILE] if len(shards) == 1 else [f"weights-{i}-of-{len(shards)}.safetensors" for i in range(1, len(shards) + 1)]
    stale = [p for p in folder.glob("weights*.safetensors") if p.name not in names]
    # Weights and card are replaced together, so a bundle never holds weights its card does not describe.
    with staged_files() as stage:
        files = []
        for name, shard in zip(names, shards):
            staged = stage(folder / name)
            save_file(shard, str(staged), metadata={"format": "pt"})
            files.append({"file": name, "sha256": sha256_of(staged)})
        document = {"format": FORMAT, "format_version": FORMAT_VERSION, **card.to_dict()}
        document["weights"] = files[0] if len(files) == 1 else {"files": files}
        document["weights"]["dtype"] = str(dtype).replace("torch.", "")
        stage(folder / CARD_FILE).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    for path_ in stale:
        path_.unlink()
    return folder


def _weight_files(folder: Path, document: dict) -> List[Tuple[Path, Optional[str]]]:
    """The weight files a card names, with their recorded SHA-256 (one file, or a list of shards)."""
    info = document.get("weights") or {}
    entries = info.get("files") or [info]
    return [(folder / str(entry.get("file", WEIGHTS_FILE)), entry.get("sha256")) for entry in entries]


def load_bundle(path: Union[str, Path], device: Union[str, torch.device] = "cpu") -> ModelBundle:
    """Loads and verifies a bundle; networks are returned in eval mode on ``device``."""
    folder = bundle_dir(path)
    document = read_card(folder)
    card = load_card(folder)
    tensors: Dict[str, torch.Tensor] = {}
    for weights, expected in _weight_files(folder, document):
        if not weights.is_file():
            raise BundleError(f"the model weights {weights} are missing; copy the whole bundle folder")
        if not expected:
            raise BundleError(f"{folder / CARD_FILE} records no SHA-256 for its weights; refusing unverified weights")
        actual = sha256_of(weights)
        if actual != expected:
            raise BundleError(
                f"the weights {weights} do not match the SHA-256 in {CARD_FILE} (expected {expected[:12]}…, got "
                f"{actual[:12]}…): the file is truncated or was modified; download or export the model again"
            )
        try:
            tensors.update(load_file(str(weights)))
        except (SafetensorError, OSError) as error:
            raise BundleError(f"cannot read {weights}: {error}") from error

    tensors = _joined(tensors)

    def restore(prefix: str, network: torch.nn.Module) -> torch.nn.Module:
        state = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
        try:
            network.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise BundleError(f"the {prefix} weights in {folder} do not fit the architecture in {CARD_FILE}: {error}") from error
        return network.eval().to(device)

    unet = restore("unet", build_unet(card))
    classifier = restore("classifier", build_classifier(card)) if card.classifier is not None else None
    return ModelBundle(card=card, unet=unet, classifier=classifier, path=folder)
