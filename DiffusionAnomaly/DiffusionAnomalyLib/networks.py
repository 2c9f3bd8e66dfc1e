"""The two networks of the method, built from MONAI's generative building blocks.

- the noise predictor ε_θ(x_t, t): :class:`monai.networks.nets.DiffusionModelUNet`;
- the classifier C(x_t, t) that tells healthy from diseased on *noisy* inputs: the encoder
  half of that UNet with its time embedding, :class:`DiffusionModelEncoder`, as in the
  reference implementation of Wolleb et al.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from monai.networks.nets import DiffusionModelUNet
from monai.networks.nets.diffusion_model_unet import DiffusionModelEncoder

from .config import ModelCard, NetworkConfig

NUM_CLASSES = 2


def _common_kwargs(card: ModelCard, net: NetworkConfig) -> dict:
    return dict(
        spatial_dims=2,
        in_channels=len(card.channels),
        channels=tuple(net.channels),
        attention_levels=tuple(net.attention_levels),
        num_res_blocks=net.num_res_blocks,
        num_head_channels=net.num_head_channels,
        norm_num_groups=net.norm_num_groups,
        use_flash_attention=True,
    )


def build_unet(card: ModelCard) -> DiffusionModelUNet:
    """The noise predictor; class-conditional when the card says it was trained on both classes."""
    return DiffusionModelUNet(
        out_channels=len(card.channels),
        num_class_embeds=NUM_CLASSES if card.class_conditional else None,
        **_common_kwargs(card, card.unet),
    )


def build_classifier(card: ModelCard) -> DiffusionModelEncoder:
    """The time-conditioned healthy/diseased classifier (its last layer fixes the image size)."""
    if card.classifier is None:
        raise ValueError("the model card has no classifier configuration")
    return DiffusionModelEncoder(
        out_channels=NUM_CLASSES,
        input_shape=tuple(card.image_size),
        **_common_kwargs(card, card.classifier),
    )


def noise_predictor(unet: DiffusionModelUNet, class_label: Optional[int]) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Adapts the UNet to the ``eps_model(x_t, t)`` callable that :func:`translate` expects.

    A class-conditional UNet is always asked for the given class (the healthy one when
    translating), so encoding and decoding follow the same deterministic trajectory.
    """

    def eps_model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        labels = None if class_label is None else torch.full_like(t, class_label)
        return unet(x_t, timesteps=t, class_labels=labels)

    return eps_model


def time_classifier(classifier: DiffusionModelEncoder) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Adapts the encoder to the ``classifier(x_t, t) -> logits`` callable of :func:`translate`."""

    def classify(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return classifier(x_t, timesteps=t)

    return classify
