"""Training the two networks: noise prediction on healthy slices, and the noisy-input classifier.

One loop serves both (:func:`run_training`); each network only supplies its loss. The loop
handles seeds, mixed precision, an EMA of the weights, checkpoints with resume, a progress
bar with the loss, and multi-GPU / multi-node runs under ``torchrun``
(DistributedDataParallel; gloo on CPUs, NCCL on GPUs).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional, Tuple

import monai
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from monai.networks.schedulers import DDPMScheduler
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler
from tqdm import tqdm

from .bundle import ModelBundle, load_bundle, save_bundle
from .cards import CARD_FILE, bundle_dir
from .config import ModelCard
from .data import DISEASED, HEALTHY, SliceDataset
from .detector import resolve_precision
from .networks import build_classifier, build_unet
from .translation import PRECISIONS

CHECKPOINT_FILE = "checkpoint.pt"


@dataclass
class TrainSettings:
    """How long and how to train.

    Args:
        max_steps: optimizer steps in total (a resumed run continues up to this number).
        batch_size: slices per step and per process.
        learning_rate: AdamW learning rate.
        ema_decay: decay of the exponential moving average of the weights (0 disables it).
        seed: seeds Python, NumPy and PyTorch (offset by the process rank).
        precision: ``auto`` (bf16/fp16 on GPUs, bf16 on CPUs with bf16 instructions), ``fp32``,
            ``bf16`` or ``fp16``.
        checkpoint_dir: where checkpoints go; ``resume`` continues from the latest there.
        checkpoint_every: steps between checkpoints.
        device: ``auto``, ``cpu`` or ``cuda``.
        show_progress: draw a progress bar (on the first process only).
        max_seconds: stop after this long (checkpointed, to be continued with ``resume``), e.g.
            to fit a machine that runs commands for a limited time; ``None``: run to ``max_steps``.
    """

    max_steps: int = 20000
    batch_size: int = 32
    learning_rate: float = 1e-4
    ema_decay: float = 0.999
    seed: int = 0
    precision: str = "auto"
    checkpoint_dir: Optional[Path] = None
    checkpoint_every: int = 1000
    resume: bool = False
    device: str = "auto"
    show_progress: bool = True
    max_seconds: Optional[float] = None
    extra: Dict[str, object] = field(default_factory=dict)


@dataclass
class Distributed:
    """This process's place in a ``torchrun`` job (a single process when not under torchrun)."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def setup(cls, device: str) -> "Distributed":
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
        if use_cuda and not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for but PyTorch sees no GPU")
        if world_size > 1 and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        rank = dist.get_rank() if world_size > 1 else 0
        if use_cuda:
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local_rank)
            target = torch.device("cuda", local_rank)
        else:
            target = torch.device("cpu")
        return cls(rank, world_size, target)

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def decided_by_first(self, flag: bool) -> bool:
        """The first process's ``flag``, on every process."""
        if self.world_size == 1:
            return flag
        tensor = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.broadcast(tensor, src=0)
        return bool(tensor.item())

    def mean(self, value: float) -> float:
        if self.world_size == 1:
            return value
        tensor = torch.tensor([value], device=self.device)
        dist.all_reduce(tensor)
        return tensor.item() / self.world_size


def _autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    return PRECISIONS[resolve_precision(precision, device)]


def _batches(loader: DataLoader, sampler) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    epoch = 0
    while True:
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


LossFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def run_training(
    network: torch.nn.Module,
    loss_fn: LossFn,
    dataset: SliceDataset,
    settings: TrainSettings,
    cluster: Distributed,
    name: str,
) -> Tuple[torch.nn.Module, Dict[str, object]]:
    """Trains ``network`` to minimise ``loss_fn(model, images, labels)``.

    Returns the weights to ship (the EMA when enabled) on the CPU and a provenance record.
    """
    if len(dataset) == 0:
        raise ValueError(f"no training slices for the {name}: check the data and the slice labels")
    seed_everything(settings.seed + cluster.rank)
    network.to(cluster.device)
    model = DistributedDataParallel(network) if cluster.world_size > 1 else network
    optimizer = torch.optim.AdamW(network.parameters(), lr=settings.learning_rate)
    ema = AveragedModel(network, multi_avg_fn=get_ema_multi_avg_fn(settings.ema_decay)) if settings.ema_decay > 0 else None
    autocast_dtype = _autocast_dtype(settings.precision, cluster.device)
    scaler = torch.amp.GradScaler(cluster.device.type, enabled=autocast_dtype == torch.float16)

    step = 0
    earlier_seconds = 0.0
    checkpoint = settings.checkpoint_dir / CHECKPOINT_FILE if settings.checkpoint_dir else None
    if settings.resume and checkpoint is not None and checkpoint.is_file():
        state = torch.load(checkpoint, map_location=cluster.device, weights_only=True)
        network.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        for group in optimizer.param_groups:  # the learning rate asked for now, not the checkpoint's
            group["lr"] = settings.learning_rate
        scaler.load_state_dict(state["scaler"])
        if ema is not None and "ema" in state:
            ema.load_state_dict(state["ema"])
        step = int(state["step"])
        earlier_seconds = float(state.get("seconds", 0.0))

    if cluster.world_size > 1:
        sampler = DistributedSampler(dataset, num_replicas=cluster.world_size, rank=cluster.rank, seed=settings.seed + step)
    else:
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(settings.seed + step))
    loader = DataLoader(dataset, batch_size=settings.batch_size, sampler=sampler, drop_last=len(dataset) >= settings.batch_size)
    batches = _batches(loader, sampler)

    def save_checkpoint() -> None:
        if checkpoint is None or not cluster.is_main:
            return
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        state = {"model": network.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "step": step,
                 "seconds": earlier_seconds + time.perf_counter() - started}
        if ema is not None:
            state["ema"] = ema.state_dict()
        temporary = checkpoint.with_suffix(".tmp")
        torch.save(state, temporary)
        os.replace(temporary, checkpoint)

    started = time.perf_counter()
    first_step = step
    bar = tqdm(total=settings.max_steps, initial=step, desc=f"training the {name}", disable=not (settings.show_progress and cluster.is_main), unit="step")
    running_loss = None
    network.train()
    out_of_time = False
    while step < settings.max_steps and not out_of_time:
        images, labels = next(batches)
        images, labels = images.to(cluster.device), labels.to(cluster.device)
        autocast = torch.autocast(cluster.device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
        with autocast:
            loss = loss_fn(model, images, labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if ema is not None:
            ema.update_parameters(network)
        step += 1
        running_loss = loss.item() if running_loss is None else 0.98 * running_loss + 0.02 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{running_loss:.4f}")
        # Every process stops at the same step: the first one decides and tells the others.
        out_of_time = settings.max_seconds is not None and cluster.decided_by_first(time.perf_counter() - started > settings.max_seconds)
        if step % settings.checkpoint_every == 0 or step == settings.max_steps or out_of_time:
            save_checkpoint()
    bar.close()
    seconds = time.perf_counter() - started
    final_loss = cluster.mean(running_loss if running_loss is not None else float("nan"))
    network.eval()
    trained = ema.module if ema is not None else network
    record = {
        "steps": step,
        "steps_this_run": step - first_step,
        "batch_size_per_process": settings.batch_size,
        "processes": cluster.world_size,
        "learning_rate": settings.learning_rate,
        "ema_decay": settings.ema_decay,
        "seed": settings.seed,
        "precision": str(autocast_dtype or torch.float32).replace("torch.", ""),
        "final_loss": round(final_loss, 6),
        "finished": step >= settings.max_steps,
        "wall_seconds_this_run": round(seconds, 1),
        "wall_seconds_total": round(earlier_seconds + seconds, 1),
        "hardware": torch.cuda.get_device_name(cluster.device) if cluster.device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "slices": len(dataset),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "versions": {"torch": torch.__version__, "monai": monai.__version__},
        **settings.extra,
    }
    return trained.to("cpu"), record


def _noisy(images: torch.Tensor, scheduler: DDPMScheduler) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε at a uniformly random t per sample."""
    noise = torch.randn_like(images)
    t = torch.randint(0, scheduler.num_train_timesteps, (images.shape[0],), device=images.device)
    return scheduler.add_noise(original_samples=images, noise=noise, timesteps=t), noise, t


def _scheduler(card: ModelCard) -> DDPMScheduler:
    schedule = card.schedule
    return DDPMScheduler(
        num_train_timesteps=schedule.num_train_timesteps,
        schedule=schedule.beta_schedule,
        beta_start=schedule.beta_start,
        beta_end=schedule.beta_end,
    )


def _existing_bundle(out: Path) -> Optional[ModelBundle]:
    return load_bundle(out) if (bundle_dir(out) / CARD_FILE).is_file() else None


def start_from(unet: torch.nn.Module, start: torch.nn.Module) -> None:
    """Copies the weights of another noise predictor of the same architecture into ``unet``.

    The one part ``unet`` may have in addition is a class embedding (training on all slices
    from a model trained on healthy ones): it starts at zero, so the first predictions are
    exactly the starting model's, whatever the class.
    """
    missing, unexpected = unet.load_state_dict(start.state_dict(), strict=False)
    if unexpected or any(not key.startswith("class_embedding.") for key in missing):
        raise ValueError(f"the starting model's noise predictor does not fit this one (missing {missing}, unexpected {unexpected})")
    if missing:
        with torch.no_grad():
            unet.class_embedding.weight.zero_()


def train_diffusion(dataset: SliceDataset, card: ModelCard, out: Path, settings: TrainSettings, start: Optional[ModelBundle] = None,
                    classifier_from: Optional[Path] = None) -> Optional[Path]:
    """Trains ε_θ on the healthy slices (or on all slices, class-conditionally) and writes the bundle.

    Args:
        start: a bundle whose noise predictor the training starts from (a checkpoint, when
            resuming, takes precedence).
        classifier_from: a bundle whose classifier goes into the new one (its card's classifier
            configuration must be ``card.classifier``); otherwise the bundle has no classifier.

    Returns the bundle folder on the main process and ``None`` on the others.
    """
    cluster = Distributed.setup(settings.device)
    kept = load_bundle(classifier_from) if cluster.is_main and classifier_from is not None else None
    training_set = dataset if card.class_conditional else dataset.subset(HEALTHY)
    scheduler = _scheduler(card)

    def loss_fn(model, images, labels):
        noisy, noise, t = _noisy(images, scheduler)
        class_labels = labels if card.class_conditional else None
        return F.mse_loss(model(noisy, timesteps=t, class_labels=class_labels).float(), noise)

    unet = build_unet(card)
    if start is not None:
        start_from(unet, start.unet)
    unet, record = run_training(unet, loss_fn, training_set, settings, cluster, "diffusion model")
    cluster.barrier()
    if not cluster.is_main:
        return None
    card.training["diffusion"] = {**record, "slices_used": "all, class-conditional" if card.class_conditional else "healthy only"}
    classifier = kept.classifier if kept is not None and kept.card.classifier == card.classifier else None
    if classifier is None:
        card.classifier = None
    return save_bundle(out, card, unet, classifier)


def train_classifier(dataset: SliceDataset, card: ModelCard, out: Path, settings: TrainSettings) -> Optional[Path]:
    """Trains C(x_t, t) on healthy and diseased slices at random t and adds it to the bundle at ``out``."""
    if not (bundle_dir(out) / CARD_FILE).is_file():
        raise ValueError(f"no diffusion model at {out}: run train-diffusion with --out {out} first")
    cluster = Distributed.setup(settings.device)
    existing = _existing_bundle(out) if cluster.is_main else None
    scheduler = _scheduler(card)
    counts = torch.bincount(dataset.labels, minlength=2).float()
    if (counts == 0).any():
        raise ValueError(
            f"the classifier needs healthy and diseased slices; the data has {int(counts[HEALTHY])} healthy and "
            f"{int(counts[DISEASED])} diseased (a slice is diseased when its mask has a voxel of the model's lesion region, "
            f"'{card.lesion_region}')"
        )
    # Balanced cross-entropy: diseased slices are usually the minority.
    class_weights = (counts.sum() / (2 * counts)).to(cluster.device)

    def loss_fn(model, images, labels):
        noisy, _, t = _noisy(images, scheduler)
        return F.cross_entropy(model(noisy, timesteps=t).float(), labels, weight=class_weights)

    classifier, record = run_training(build_classifier(card), loss_fn, dataset, settings, cluster, "classifier")
    cluster.barrier()
    if not cluster.is_main:
        return None
    assert existing is not None
    card.training["classifier"] = {**record, "healthy_slices": int(counts[HEALTHY]), "diseased_slices": int(counts[DISEASED])}
    return save_bundle(out, card, existing.unet, classifier)
