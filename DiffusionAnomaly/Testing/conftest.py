"""Shared fixtures: closed-form diffusion models, tiny real MONAI bundles, small studies on disk."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from DiffusionAnomalyLib.bundle import save_bundle
from DiffusionAnomalyLib.config import ModelCard, NetworkConfig
from DiffusionAnomalyLib.settings import CARD_DEFAULTS, DetectionSettings
from DiffusionAnomalyLib.networks import build_classifier, build_unet
from DiffusionAnomalyLib.translation import alphas_cumprod
from DiffusionAnomalyLib.config import ScheduleConfig

torch.set_num_threads(2)


class AnalyticGaussians:
    """Exact models for pixels that are i.i.d. N(μ_h, σ_h²) when healthy, N(μ_d, σ_d²) when diseased.

    For Gaussian data the optimal noise predictor is closed-form: with x_t = √ᾱ x_0 + √(1−ᾱ) ε,
    x_t ~ N(√ᾱ μ_h, v_t) with v_t = ᾱ σ_h² + 1 − ᾱ, and E[ε | x_t] = √(1−ᾱ) (x_t − √ᾱ μ_h) / v_t.
    The Bayes classifier (equal priors) has logits Σ_pixels log N(x_t; √ᾱ μ_y, v_t,y).
    """

    def __init__(self, healthy_mean: float, healthy_std: float, diseased_mean: float, diseased_std: float) -> None:
        self.means = (healthy_mean, diseased_mean)
        self.stds = (healthy_std, diseased_std)
        self.alpha_bar = alphas_cumprod(ScheduleConfig())

    def _alpha(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.alpha_bar.to(x.device)[t].view(-1, 1, 1, 1)

    def _variance(self, alpha: torch.Tensor, label: int) -> torch.Tensor:
        return alpha * self.stds[label] ** 2 + 1 - alpha

    def eps(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha = self._alpha(x, t)
        return (1 - alpha).sqrt() * (x - alpha.sqrt() * self.means[0]) / self._variance(alpha, 0)

    def classifier(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha = self._alpha(x, t)
        logits = []
        for label in (0, 1):
            variance = self._variance(alpha, label)
            log_density = -((x - alpha.sqrt() * self.means[label]) ** 2) / (2 * variance) - 0.5 * torch.log(2 * math.pi * variance)
            logits.append(log_density.flatten(1).sum(dim=1))
        return torch.stack(logits, dim=1)


def tiny_card(channels: Sequence[str] = ("T1", "FLAIR"), image_size: int = 16, **defaults) -> ModelCard:
    """A real MONAI UNet/classifier pair small enough to run a volume in about a second."""
    return ModelCard(
        channels=tuple(channels),
        image_size=(image_size, image_size),
        unet=NetworkConfig(channels=(8, 16), attention_levels=(False, True), num_res_blocks=1, num_head_channels=8, norm_num_groups=8),
        classifier=NetworkConfig(channels=(8, 16), attention_levels=(False, False), num_res_blocks=1, num_head_channels=8, norm_num_groups=8),
        defaults=DetectionSettings(**{**CARD_DEFAULTS.to_dict(), "steps": 4, "guidance_scale": 1.0, "noise_level": 0.2, **defaults}),
        name="tiny-test",
    )


@pytest.fixture
def tiny_bundle(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    card = tiny_card()
    return save_bundle(tmp_path / "tiny-model", card, build_unet(card), build_classifier(card))


def brain_phantom(shape=(12, 20, 18), lesion_centre=None, lesion_radius=3.0, seed=0, channels=2) -> tuple:
    """An ellipsoidal 'brain' with textured tissue and, optionally, a bright spherical lesion.

    Returns the channel arrays (C, k, j, i) and the lesion mask (k, j, i).
    """
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*(np.arange(n, dtype=float) for n in shape), indexing="ij")
    centre = [(n - 1) / 2 for n in shape]
    radii = [n * 0.42 for n in shape]
    brain = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii)) < 1
    lesion = np.zeros(shape, dtype=bool)
    if lesion_centre is not None:
        lesion = (sum((g - c) ** 2 for g, c in zip(grids, lesion_centre)) < lesion_radius**2) & brain
    arrays = []
    for channel in range(channels):
        tissue = 100.0 + 10.0 * channel + rng.normal(0, 3.0, shape)
        arrays.append(np.where(brain, np.where(lesion, 180.0 + 10.0 * channel, tissue), 0.0).astype(np.float32))
    return np.stack(arrays), lesion


def write_image(array: np.ndarray, path: Path, spacing=(1.0, 1.0, 1.0), direction=None) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    if direction is not None:
        image.SetDirection(direction)
    sitk.WriteImage(image, str(path))
    return path


def write_brats_study(root: Path, name: str, arrays: np.ndarray, lesion: np.ndarray, suffixes=("t1", "flair")) -> Path:
    """One subject folder in the BraTS layout: <name>/<name>_<suffix>.nii.gz and <name>_seg.nii.gz."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    for suffix, array in zip(suffixes, arrays):
        write_image(array, folder / f"{name}_{suffix}.nii.gz")
    write_image(lesion.astype(np.uint8) * 2, folder / f"{name}_seg.nii.gz")
    return folder


def oblique_direction(angles=(0.3, -0.2, 0.25)) -> tuple:
    transform = sitk.Euler3DTransform()
    transform.SetRotation(*angles)
    return tuple(transform.GetMatrix())


@pytest.fixture
def scene():
    """A real MRML scene (slicer-core) set up as the desktop application sets up its own, with three slice views."""
    slicer = pytest.importorskip("slicer", reason="the scene logic needs slicer-core (pip install -e '.[test]')")
    from DiffusionAnomalyScene.logic import prepare_scene

    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    prepare_scene(scene)
    for _ in range(3):  # the red, green and yellow views' layers
        scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
    return scene
