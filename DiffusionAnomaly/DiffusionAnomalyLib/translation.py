"""Classifier-guided DDIM translation of an image to its healthy counterpart.

This is the method of Wolleb et al., "Diffusion Models for Medical Anomaly Detection"
(MICCAI 2022), written to be read beside the paper. With ᾱ_t the cumulative product of
(1 − β_t) of the training schedule and a grid of timesteps 0 = t_0 < t_1 < ... < t_N = L:

1. deterministic DDIM encoding (η = 0, no guidance), for i = 0 .. N−1::

       x̂_0       = (x_{t_i} − √(1−ᾱ_{t_i}) · ε_θ(x_{t_i}, t_i)) / √ᾱ_{t_i}
       x_{t_i+1} = √ᾱ_{t_i+1} · x̂_0 + √(1−ᾱ_{t_i+1}) · ε_θ(x_{t_i}, t_i)

2. DDIM decoding with classifier guidance toward the healthy class, for i = N .. 1::

       ε̂         = ε_θ(x_{t_i}, t_i) − s(t_i) · √(1−ᾱ_{t_i}) · ∇_x log p_C(y = healthy | x_{t_i}, t_i)
       x̂_0       = (x_{t_i} − √(1−ᾱ_{t_i}) · ε̂) / √ᾱ_{t_i}
       x_{t_i−1} = √ᾱ_{t_i−1} · x̂_0 + √(1−ᾱ_{t_i−1}) · ε̂

Decoding starts exactly where encoding stopped (same grid, same t_N), x̂_0 is never clipped
(clipping breaks the inversion), and the classifier gradient is taken on a live graph.
The paper's guidance is constant, s(t) = s; ``guidance_schedule="linear"`` uses
s(t) = s · t / L instead: full strength where the image is noisiest and structure can still
change, fading to nothing at t = 0 so that fine healthy detail is not pushed around.

3. Optionally, a region m ∈ [0, 1] that the decoding may redraw (a suspected lesion): after
   every decoding step the rest follows the input's own encoding trajectory::

       x_{t_i−1} ← m · x_{t_i−1} + (1 − m) · x^enc_{t_i−1}

   as RePaint (Lugmayr et al., CVPR 2022) keeps the known part of an image; here the known
   part is the deterministic encoding of step 1, which the network itself would decode back to
   the input, so the redrawn region is generated in the context of the patient's own anatomy.
   A deeper L then removes more of a large lesion without redrawing the healthy brain around it.

4. Optionally (``return_reconstruction``), the same encoding x_{t_N} is decoded a second time
   with s = 0: the plain DDIM reconstruction x̃_0. Healthy tissue of an anatomy the network
   reproduces badly comes back with the same error in x̂_0 and x̃_0, so x̃_0 − x̂_0 is what the
   guidance alone changed (see ``map_reference`` in :mod:`.settings`).
"""

from __future__ import annotations

import contextlib
from typing import Callable, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from monai.networks.schedulers import DDIMScheduler

from .config import ScheduleConfig
from .settings import GUIDANCE_SCHEDULES

TimeModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class TranslationCancelled(RuntimeError):
    """Raised when the ``cancel`` callback asks to stop; no partial result is returned."""


def alphas_cumprod(schedule: ScheduleConfig) -> torch.Tensor:
    """ᾱ_t for t = 0 .. T−1 of the training schedule (MONAI's implementation of the betas)."""
    scheduler = DDIMScheduler(
        num_train_timesteps=schedule.num_train_timesteps,
        schedule=schedule.beta_schedule,
        beta_start=schedule.beta_start,
        beta_end=schedule.beta_end,
    )
    return scheduler.alphas_cumprod.to(torch.float32)


def ddim_timesteps(noise_level: float, steps: int, num_train_timesteps: int = 1000) -> List[int]:
    """The shared grid 0 = t_0 < ... < t_N = L of the encoding and the decoding.

    ``noise_level`` is L as a fraction of the training steps (0.5 → L = 500); ``steps`` is
    N, the number of network evaluations per direction (never more than L).
    """
    if not 0.0 < noise_level <= 1.0:
        raise ValueError(f"noise_level must be in (0, 1], got {noise_level}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    last = min(max(int(round(noise_level * num_train_timesteps)), 1), num_train_timesteps - 1)
    n = min(steps, last)
    grid = torch.linspace(0, last, n + 1).round().long().tolist()
    return grid


def healthy_log_prob_gradient(
    classifier: TimeModel, x_t: torch.Tensor, t: torch.Tensor, target_class: int
) -> torch.Tensor:
    """∇_{x_t} log p_C(y = target_class | x_t, t), one gradient per sample of the batch.

    Summing the per-sample log-probabilities gives each sample its own gradient because
    samples do not interact in the classifier (GroupNorm, no batch statistics).
    """
    with torch.enable_grad():
        x_in = x_t.detach().requires_grad_(True)
        log_probs = F.log_softmax(classifier(x_in, t).float(), dim=-1)
        selected = log_probs[:, target_class].sum()
        (gradient,) = torch.autograd.grad(selected, x_in)
    return gradient


def _ddim_move(x_t: torch.Tensor, eps: torch.Tensor, alpha_from: torch.Tensor, alpha_to: torch.Tensor) -> torch.Tensor:
    """One deterministic DDIM update from ᾱ_from to ᾱ_to (up or down the noise scale)."""
    x0_pred = (x_t - (1 - alpha_from).sqrt() * eps) / alpha_from.sqrt()
    return alpha_to.sqrt() * x0_pred + (1 - alpha_to).sqrt() * eps


def translate(
    x0: torch.Tensor,
    eps_model: TimeModel,
    classifier: Optional[TimeModel],
    *,
    noise_level: float,
    steps: int,
    guidance_scale: float,
    guidance_schedule: str = "constant",
    healthy_class: int = 0,
    num_train_timesteps: int = 1000,
    schedule: Optional[ScheduleConfig] = None,
    precision: str = "fp32",
    redraw: Optional[torch.Tensor] = None,
    progress: Optional[Callable[[int, int], None]] = None,
    cancel: Optional[Callable[[], bool]] = None,
    return_reconstruction: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Translates a batch of images to the healthy class; returns x̂_0 of the same shape.

    With ``return_reconstruction`` (as ``torch.unique``'s ``return_inverse``), returns the pair
    (x̂_0, x̃_0): x̃_0 is the plain reconstruction decoded without guidance from the same
    encoding (step 4 above).

    Args:
        x0: images (B, C, H, W) in the networks' intensity range.
        eps_model: ε_θ(x_t, t) → predicted noise, ``t`` a long tensor of shape (B,).
        classifier: C(x_t, t) → logits (B, 2); may be ``None`` when ``guidance_scale`` is 0.
        noise_level: encoding depth L as a fraction of the training steps.
        steps: DDIM evaluations per direction (strided DDIM; L of them is the paper's setting).
        guidance_scale: s; 0 gives the plain DDIM reconstruction.
        guidance_schedule: ``constant`` (the paper's) or ``linear`` (s · t / L, see above).
        healthy_class: classifier output index of the healthy class.
        num_train_timesteps: T of a default linear schedule (ignored when ``schedule`` is given).
        schedule: the training noise schedule.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` autocast for the network passes;
            the DDIM arithmetic itself always runs in fp32.
        redraw: optional (B, 1, H, W) weights in [0, 1]: where the decoding may change the
            image; elsewhere it follows the input's encoding (step 3 above). ``None``: everywhere.
        progress: called as ``progress(done, total)`` after each network evaluation step.
        cancel: polled before each step; returning true raises :class:`TranslationCancelled`.
        return_reconstruction: also decode without guidance (N more network evaluations).
    """
    if x0.ndim != 4:
        raise ValueError(f"x0 must be a batch (B, C, H, W), got shape {tuple(x0.shape)}")
    if guidance_scale < 0:
        raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
    if guidance_scale > 0 and classifier is None:
        raise ValueError("guidance needs a classifier; train one or set guidance_scale to 0")
    if guidance_schedule not in GUIDANCE_SCHEDULES:
        raise ValueError(f"guidance_schedule must be one of {', '.join(GUIDANCE_SCHEDULES)}, got {guidance_schedule!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    if redraw is not None and (redraw.ndim != 4 or redraw.shape[1] != 1 or redraw.shape[0] != x0.shape[0] or redraw.shape[2:] != x0.shape[2:]):
        raise ValueError(f"redraw must be (B, 1, H, W) for images {tuple(x0.shape)}, got shape {tuple(redraw.shape)}")
    schedule = schedule or ScheduleConfig(num_train_timesteps=num_train_timesteps)
    with torch.inference_mode(False):
        alpha_bar = alphas_cumprod(schedule).to(x0.device)
    grid = ddim_timesteps(noise_level, steps, schedule.num_train_timesteps)
    steps_per_pass = len(grid) - 1
    total = (3 if return_reconstruction else 2) * steps_per_pass
    autocast_dtype = PRECISIONS[precision]

    def autocast():
        if autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=x0.device.type, dtype=autocast_dtype)

    def timestep(t: int) -> torch.Tensor:
        return torch.full((x0.shape[0],), t, dtype=torch.long, device=x0.device)

    def predict_noise(x_t: torch.Tensor, t: int) -> torch.Tensor:
        with torch.no_grad(), autocast():
            return eps_model(x_t, timestep(t)).float()

    def step_done(done: int) -> None:
        if progress is not None:
            progress(done, total)

    def check_cancel() -> None:
        if cancel is not None and cancel():
            raise TranslationCancelled("anomaly detection was cancelled")

    # Guidance needs autograd even when the caller runs under torch.inference_mode().
    with torch.inference_mode(False):
        x = x0.detach().clone().float()
        encoding = {grid[0]: x}
        done = 0
        # 1. Deterministic DDIM encoding to the noise level L, without guidance.
        for t_now, t_next in zip(grid[:-1], grid[1:]):
            check_cancel()
            eps = predict_noise(x, t_now)
            x = _ddim_move(x, eps, alpha_bar[t_now], alpha_bar[t_next])
            if redraw is not None:
                encoding[t_next] = x
            done += 1
            step_done(done)

        encoded = x

        def decode(x: torch.Tensor, guidance: float, done: int) -> torch.Tensor:
            # 2. DDIM decoding from L back to 0, the noise corrected toward the healthy class.
            for t_now, t_prev in zip(reversed(grid[1:]), reversed(grid[:-1])):
                check_cancel()
                eps = predict_noise(x, t_now)
                scale = guidance * (t_now / grid[-1] if guidance_schedule == "linear" else 1.0)
                if scale > 0:
                    assert classifier is not None
                    with autocast():
                        gradient = healthy_log_prob_gradient(classifier, x, timestep(t_now), healthy_class)
                    eps = eps - scale * (1 - alpha_bar[t_now]).sqrt() * gradient.float()
                x = _ddim_move(x, eps, alpha_bar[t_now], alpha_bar[t_prev])
                # 3. Outside the region to redraw, the input's own trajectory.
                if redraw is not None:
                    x = redraw * x + (1 - redraw) * encoding[t_prev]
                done += 1
                step_done(done)
            return x

        healthy = decode(encoded, guidance_scale, done)
        if not return_reconstruction:
            return healthy
        # 4. The same encoding decoded without guidance.
        return healthy, decode(encoded, 0.0, 2 * steps_per_pass)
