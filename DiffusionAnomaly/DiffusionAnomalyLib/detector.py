"""Whole-volume anomaly detection: volumes in, anomaly map / mask / healthy translation out.

The detector finds the brain, takes out each channel's bias field when asked (:mod:`.bias`),
reorients the channels to axial slices, normalises them over the brain, runs :func:`translate` on all slices with foreground in batches, and maps the
results back onto the input's voxel grid.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Union

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from scipy import ndimage

from monai.networks.layers import GaussianFilter

from .bundle import ModelBundle, load_bundle
from .config import ModelCard
from .imageio import Geometry, check_same_grid
from .networks import noise_predictor, time_classifier
from .bias import correct_bias
from .brain import find_brain
from .preprocessing import BACKGROUND, IntensityScale, denormalise, foreground_mask, prepare_volume
from .settings import DetectionSettings
from .thresholds import HEALTHY_PROBABILITY, ScanThreshold, calibrated_threshold, threshold_map
from .translation import TimeModel, ddim_timesteps, translate

ChannelInput = Union[np.ndarray, sitk.Image]
# The second pass redraws the first segmentation widened by this share of the model's image
# width (2 pixels at 64², about 6 mm of a brain): enough for the rim that the threshold cuts.
REDRAW_MARGIN_FRACTION = 1 / 32
# Only regions of at least this area within their axial slice are redrawn (3 cm², the middle
# section of a 4 ml sphere): a smaller region is a small lesion, mostly healed at the first
# noise level, or a speck of noise, and redrawing it deeper flags its healthy rim (model card).
REDRAW_MIN_AREA_MM2 = 300.0


def _large_regions(mask: np.ndarray, min_pixels: float) -> np.ndarray:
    """The connected regions of each (N, H, W) mask slice with at least ``min_pixels`` pixels."""
    if min_pixels <= 1:
        return mask.astype(bool)
    within_slice = np.zeros((3, 3, 3), dtype=bool)
    within_slice[1] = ndimage.generate_binary_structure(2, 1)
    labels, _ = ndimage.label(mask, within_slice)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return sizes[labels] >= min_pixels


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks the GPU when PyTorch sees one."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but PyTorch sees no GPU; use --device cpu or auto")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    return torch.device(device)


def _cpu_has_fast_bf16() -> bool:
    cpu = torch.cpu
    checks = (getattr(cpu, "_is_amx_tile_supported", None), getattr(cpu, "_is_avx512_bf16_supported", None))
    return any(check() for check in checks if check is not None)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 autocast on GPUs that support it (fp16 otherwise) and on CPUs with
    bf16 instructions (AMX or AVX512-BF16, where it halves the time); fp32 elsewhere."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if _cpu_has_fast_bf16() else "fp32"


@dataclass
class DetectionResult:
    """Outputs on the input's voxel grid (numpy order (k, j, i); 2D inputs stay 2D).

    Attributes:
        anomaly_map: Σ over channels of |x − x̂| in normalised units (each channel's
            foreground percentile range is 1), zero outside the foreground.
        mask: ``anomaly_map > threshold`` (uint8).
        healthy: the healthy translation per channel, in the input's intensity units.
        foreground: the voxels the map was computed on (the brain in the translated
            slices), for re-thresholding.
        threshold: the threshold value that produced ``mask``.
        calibrated_threshold: the threshold read off this scan's healthy-looking brain
            (``thresholds.calibrated_threshold``), whatever threshold was asked for, to cut
            ``anomaly_map`` again.
        settings: the resolved settings that produced this result.
        brain_mask: the brain of the whole volume the detection used (uint8).
        brain_source: how that brain was found ("skull-stripped input", "extracted by deepbet ...").
        bias_correction: what bias-field correction did ("none", or N4's time and field range).
        bias_seconds: the part of ``seconds`` spent fitting bias fields (0 without correction).
        slices_redrawn: how many of the slices the second, deeper pass redrew (``redraw_noise_level``).
        slice_probabilities: per canonical axial slice (inferior to superior), the
            classifier's p(diseased | x, t = 0); NaN for slices not analysed or without a classifier.
        intensity_scale: per channel, the scanner intensities that became 0 and 1 (the map's
            unit is that range; after bias correction, when there was one), to compare images in the map's units.
    """

    anomaly_map: np.ndarray
    mask: np.ndarray
    healthy: List[np.ndarray]
    foreground: np.ndarray
    threshold: float
    calibrated_threshold: ScanThreshold
    settings: DetectionSettings
    brain_mask: np.ndarray
    brain_source: str
    bias_correction: str
    slice_probabilities: np.ndarray
    intensity_scale: IntensityScale
    geometry: Geometry
    slices_processed: int
    seconds: float
    slices_redrawn: int = 0
    bias_seconds: float = 0.0


@dataclass
class _CheckedInput:
    arrays: np.ndarray  # (C, k, j, i) float32
    geometry: Geometry
    was_2d: bool


class AnomalyDetector:
    """Detects anomalies in a multi-channel volume with a trained pair of networks.

    Args:
        card: the model card (channel order, image size, normalisation, defaults).
        eps_model: ε_θ(x_t, t) on the device.
        classifier: C(x_t, t) on the device, or ``None`` (then only guidance 0 works).
        device: where the networks live.
    """

    def __init__(self, card: ModelCard, eps_model: TimeModel, classifier: Optional[TimeModel], device: Union[str, torch.device] = "cpu") -> None:
        self.card = card
        self.eps_model = eps_model
        self.classifier = classifier
        self.device = torch.device(device)

    @classmethod
    def from_bundle(cls, bundle: Union[str, Path, ModelBundle], device: str = "auto") -> "AnomalyDetector":
        target = resolve_device(device)
        if not isinstance(bundle, ModelBundle):
            bundle = load_bundle(bundle, device=target)
        else:
            bundle.to(target)
        card = bundle.card
        eps_model = noise_predictor(bundle.unet, card.healthy_class if card.class_conditional else None)
        classifier = time_classifier(bundle.classifier) if bundle.classifier is not None else None
        return cls(card, eps_model, classifier, target)

    # -- input checks -----------------------------------------------------------------

    def _check_inputs(self, channels: Sequence[ChannelInput], geometry: Optional[Geometry]) -> _CheckedInput:
        names = list(self.card.channels)
        if len(channels) != len(names):
            raise ValueError(
                f"this model expects {len(names)} channel(s) in the order {', '.join(names)}; got {len(channels)}"
            )
        images = [c for c in channels if isinstance(c, sitk.Image)]
        if images and len(images) != len(channels):
            raise ValueError("give all channels either as SimpleITK images or as numpy arrays, not a mix")
        if images:
            for name, image in zip(names, images):
                if image.GetNumberOfComponentsPerPixel() != 1:
                    raise ValueError(f"channel {name} has {image.GetNumberOfComponentsPerPixel()} components per voxel; give one scalar volume per channel")
                if image.GetDimension() not in (2, 3):
                    raise ValueError(f"channel {name} is a {image.GetDimension()}D image; give one 3D volume (or 2D slice) per channel")
            check_same_grid(images, names)
            geometry = Geometry.of(images[0])
            arrays = [sitk.GetArrayFromImage(image) for image in images]
        else:
            arrays = [np.asarray(c) for c in channels]
            for name, array in zip(names, arrays):
                if array.ndim not in (2, 3):
                    raise ValueError(f"channel {name} is a {array.ndim}D array; give one 3D volume (or 2D slice) per channel")
                if array.shape != arrays[0].shape:
                    raise ValueError(f"channel {name} has shape {array.shape} but {names[0]} has {arrays[0].shape}: all channels must share one voxel grid")
            geometry = geometry or Geometry.default(arrays[0].ndim)
            if geometry.dimension != arrays[0].ndim:
                raise ValueError(f"the channels are {arrays[0].ndim}D arrays but their geometry is {geometry.dimension}D")
        was_2d = arrays[0].ndim == 2
        if was_2d:
            arrays = [a[np.newaxis] for a in arrays]
        for name, array in zip(names, arrays):
            if array.size == 0:
                raise ValueError(f"channel {name} is empty (no voxels)")
            if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
                raise ValueError(f"channel {name} has voxel type {array.dtype}; a real-valued scalar image is needed")
            if not np.isfinite(array).all():
                raise ValueError(f"channel {name} contains NaN or infinite values; fix or mask them before detection")
        return _CheckedInput(np.stack(arrays).astype(np.float32), geometry, was_2d)

    # -- detection --------------------------------------------------------------------

    def detect(
        self,
        channels: Sequence[ChannelInput],
        geometry: Optional[Geometry] = None,
        settings: Optional[DetectionSettings] = None,
        *,
        brain_mask: Optional[np.ndarray] = None,
        axial_slices: Optional[Sequence[int]] = None,
        progress: Optional[Callable[[int, int], None]] = None,
        cancel: Optional[Callable[[], bool]] = None,
    ) -> DetectionResult:
        """Runs the guided translation on every axial slice of the brain.

        Args:
            channels: one volume per model channel, in the card's order: SimpleITK images,
                or numpy arrays (k, j, i) whose grid is ``geometry``. A 2D image is one slice.
            settings: what to change from the card's defaults (see :class:`DetectionSettings`).
            brain_mask: the brain as a (k, j, i) mask on the channels' grid, instead of
                finding it as ``settings.brain_mask`` says.
            axial_slices: restrict the work to these canonical axial slice indices
                (inferior to superior), e.g. to preview one slice; others get a zero map.
            progress: ``progress(done, total)`` over all network steps of all batches.
            cancel: polled between steps; when it returns true, :class:`TranslationCancelled`
                is raised and nothing is returned.
        """
        started = time.perf_counter()
        settings = (settings or DetectionSettings()).resolve(self.card)
        volume = self._check_inputs(channels, geometry)
        given = None if brain_mask is None else np.asarray(brain_mask).reshape(volume.arrays.shape[1:])
        # Brain extraction needs a volume: a single 2D slice is analysed over its non-zero pixels.
        mode = "none" if volume.was_2d and given is None else settings.brain_mask
        brain = find_brain(volume.arrays, volume.geometry.as_3d(), self.card.channels, mode, given)
        arrays, bias = volume.arrays, None
        # A bias field is fitted over a volume; a single 2D slice is analysed as given.
        if settings.bias_correction == "n4" and not volume.was_2d:
            region = brain.mask if brain is not None else foreground_mask(arrays, self.card.normalisation)
            bias = correct_bias(arrays, region, volume.geometry, self.card.channels)
            arrays = bias.corrected
        prepared = prepare_volume(
            arrays,
            volume.geometry.as_3d().direction,
            self.card.channels,
            self.card.image_size,
            self.card.normalisation,
            axial_slices=axial_slices,
            foreground=None if brain is None else brain.mask,
        )
        model_input, indices, frame = prepared.images, prepared.indices, prepared.frame
        canonical, foreground, orientation = prepared.canonical, prepared.foreground, prepared.orientation
        # The map is taken at the model's resolution: the translation cannot restore detail
        # finer than that, and comparing at full resolution would light up every edge. With
        # several noise levels the maps are averaged; the healthy translation is the deepest one's.
        levels = [settings.noise_level * (i + 1) / settings.map_levels for i in range(settings.map_levels)]
        costs = [len(model_input) * self._steps_per_slice(settings.replace(noise_level=level)) for level in levels]
        # A redraw no deeper than the first translation would only undo its healing. Until the
        # first pass shows what to redraw, progress counts every slice, so it never runs backwards.
        redraw_settings = None
        if settings.redraw_noise_level > settings.noise_level:
            redraw_settings = settings.replace(
                noise_level=settings.redraw_noise_level,
                steps=max(settings.steps, round(settings.steps * settings.redraw_noise_level / settings.noise_level)))
        redraw_cost = 0 if redraw_settings is None else self._steps_per_slice(redraw_settings)
        first_total = sum(costs) + len(model_input) * redraw_cost

        def progress_after(before: int, total: int) -> Callable[[int, int], None]:
            def report(done: int, _total: int) -> None:
                if progress is not None:
                    progress(before + done, total)
            return report

        raw_map = torch.zeros((len(model_input), 1) + tuple(model_input.shape[2:]))
        for index, level in enumerate(levels):
            translated = self._translate_in_batches(
                model_input, settings.replace(noise_level=level), progress_after(sum(costs[:index]), first_total), cancel)
            raw_map += (model_input - translated).abs().sum(dim=1, keepdim=True) / (2.0 * len(levels))

        plane = canonical.shape[2:]
        # Only the translated slices count, e.g. for Otsu's threshold of a one-slice preview.
        analysed = np.zeros_like(foreground)
        analysed[indices] = foreground[indices]
        probabilities = np.full(canonical.shape[1], np.nan, dtype=np.float32)
        probabilities[indices] = self.slice_probabilities(model_input)
        healthy_slices = probabilities < HEALTHY_PROBABILITY if self.classifier is not None else None

        def segment(small_map: torch.Tensor):
            if settings.map_smoothing > 0 and len(small_map):
                small_map = GaussianFilter(spatial_dims=2, sigma=settings.map_smoothing)(small_map)
            anomaly = np.zeros(canonical.shape[1:], dtype=np.float32)
            if indices:
                anomaly[indices] = frame.from_model(small_map, plane, fill=0.0)[:, 0]
            anomaly = np.clip(anomaly, 0.0, None) * analysed
            calibrated = calibrated_threshold(anomaly, analysed, healthy_slices, self.card.calibration)
            mask, threshold_value = threshold_map(anomaly, analysed, settings.threshold, settings.min_component_voxels, calibrated)
            return anomaly, calibrated, mask, threshold_value

        anomaly, calibrated, mask, threshold_value = segment(raw_map)
        redrawn_slices = 0
        to_redraw = None if redraw_settings is None else _large_regions(
            mask[indices], REDRAW_MIN_AREA_MM2 / orientation.axial_pixel_area(volume.geometry.as_3d().spacing))
        if to_redraw is not None and to_redraw.any():
            region = self._redraw_region(frame.to_model(to_redraw[:, None].astype(np.float32)))
            chosen = torch.nonzero(region.flatten(1).amax(dim=1) > 0).flatten()
            done = sum(costs)
            total = done + len(chosen) * redraw_cost
            weight = region[chosen]
            redrawn = self._translate_in_batches(model_input[chosen], redraw_settings, progress_after(done, total), cancel, weight)
            # The redrawn region replaces the first translation there, and its map the first map.
            translated[chosen] = weight * redrawn + (1 - weight) * translated[chosen]
            redrawn_map = (model_input[chosen] - redrawn).abs().sum(dim=1, keepdim=True) / 2.0
            raw_map[chosen] = weight * redrawn_map + (1 - weight) * raw_map[chosen]
            anomaly, calibrated, mask, threshold_value = segment(raw_map)
            redrawn_slices = len(chosen)
        elif redraw_settings is not None and progress is not None:
            progress(first_total, first_total)

        healthy_model = prepared.normalised.copy()
        if indices:
            healthy_model[:, indices] = np.moveaxis(frame.from_model(translated, plane, fill=BACKGROUND), 0, 1)
        healthy_scanner, as_given = denormalise(healthy_model, prepared.scale), canonical
        if bias is not None:
            # Back into the input's intensities: the shading the correction took out is put back.
            healthy_scanner *= orientation.to_canonical(bias.fields)
            as_given = orientation.to_canonical(volume.arrays)
        healthy = np.where(analysed, healthy_scanner, as_given)

        def back(array: np.ndarray) -> np.ndarray:
            out = np.ascontiguousarray(orientation.from_canonical(array))
            return out[..., 0, :, :] if volume.was_2d else out

        return DetectionResult(
            anomaly_map=back(anomaly),
            mask=back(mask),
            healthy=[back(channel).astype(np.float32) for channel in healthy],
            foreground=back(analysed),
            threshold=threshold_value,
            calibrated_threshold=calibrated.reoriented(back),
            settings=settings,
            brain_mask=back(foreground).astype(np.uint8),
            brain_source=brain.source if brain is not None else "non-zero voxels (skull-stripped input)",
            bias_correction=bias.describe() if bias is not None else "none",
            slice_probabilities=probabilities,
            intensity_scale=prepared.scale,
            geometry=volume.geometry,
            slices_processed=len(indices),
            slices_redrawn=redrawn_slices,
            seconds=time.perf_counter() - started,
            bias_seconds=bias.seconds if bias is not None else 0.0,
        )

    def slice_probabilities(self, images: torch.Tensor) -> np.ndarray:
        """p(diseased | x, t = 0) of (N, C, h, w) model images; NaN without a classifier."""
        if self.classifier is None or len(images) == 0:
            return np.full(len(images), np.nan, dtype=np.float32)
        diseased = 1 - self.card.healthy_class
        timestep = torch.zeros(len(images), dtype=torch.long, device=self.device)
        with torch.no_grad():
            logits = torch.cat([self.classifier(batch.to(self.device), timestep[: len(batch)]).float().cpu()
                                for batch in images.split(self.card.defaults.batch_size)])
        return torch.softmax(logits, dim=-1)[:, diseased].numpy().astype(np.float32)

    def _steps_per_slice(self, settings: DetectionSettings) -> int:
        decodings = 2 if settings.map_reference == "reconstruction" else 1
        return (1 + decodings) * (len(ddim_timesteps(settings.noise_level, settings.steps, self.card.schedule.num_train_timesteps)) - 1)

    def _redraw_region(self, segmented: torch.Tensor) -> torch.Tensor:
        """Where the second pass may redraw: the first segmentation in model pixels, widened by a
        margin (the map of a large lesion is a blurred bump whose threshold cuts its rim) and
        given a soft edge so that the redrawn region blends into the first translation."""
        margin = max(1, round(self.card.image_size[0] * REDRAW_MARGIN_FRACTION))
        # The voxel mask resampled (antialiased) to the model's grid: a pixel a quarter covered counts.
        hard = F.max_pool2d((segmented > 0.25).float(), 2 * margin + 1, stride=1, padding=margin)
        return torch.maximum(hard, GaussianFilter(spatial_dims=2, sigma=1.0)(hard).clamp(0.0, 1.0))

    def _translate_in_batches(self, images: torch.Tensor, settings: DetectionSettings, progress, cancel,
                              redraw: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The healthy images of (N, C, h, w) images, translated in batches, halving the batch on GPU
        out-of-memory; ``redraw`` (N, 1, h, w): where each image may change (see :func:`translate`).

        With ``map_reference`` "reconstruction" the healthy image is x − (x̃ − x̂): the input less
        what guidance changed, so the map |x − healthy| is |x̃ − x̂| in either case."""
        precision = resolve_precision(settings.precision, self.device)
        steps_per_slice = self._steps_per_slice(settings)
        against_reconstruction = settings.map_reference == "reconstruction"
        total = len(images) * steps_per_slice
        batch_size = settings.batch_size
        outputs: List[torch.Tensor] = []
        start = 0
        while start < len(images):
            batch = images[start : start + batch_size].to(self.device)

            def batch_progress(done: int, _: int) -> None:
                if progress is not None:
                    progress((start * steps_per_slice) + done * len(batch), total)

            try:
                result = translate(
                    batch,
                    self.eps_model,
                    self.classifier,
                    noise_level=settings.noise_level,
                    steps=settings.steps,
                    guidance_scale=settings.guidance_scale,
                    guidance_schedule=settings.guidance_schedule,
                    healthy_class=self.card.healthy_class,
                    schedule=self.card.schedule,
                    precision=precision,
                    redraw=None if redraw is None else redraw[start : start + batch_size].to(self.device),
                    progress=batch_progress,
                    cancel=cancel,
                    return_reconstruction=against_reconstruction,
                )
                if against_reconstruction:
                    healthy, reconstruction = result
                    result = batch - (reconstruction - healthy)
            except torch.cuda.OutOfMemoryError:
                if batch_size == 1:
                    raise
                batch_size = max(1, batch_size // 2)
                torch.cuda.empty_cache()
                continue
            outputs.append(result.cpu())
            start += len(batch)
        return torch.cat(outputs) if outputs else images.clone()
