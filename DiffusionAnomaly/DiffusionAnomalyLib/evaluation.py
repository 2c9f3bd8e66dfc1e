"""Scoring anomaly maps against lesion masks, per subject and pooled over a cohort.

Voxel metrics are computed inside each subject's foreground (the brain): Dice of the
thresholded map against the lesion (the whole tumour, mask > 0, or one of its BraTS
regions), pixel AUROC and AUPRC of the map, and the false-positive area on healthy slices
(slices without any lesion voxel). Where the data has each subject's image from before the
lesion (synthetic data), the healing of the translation is measured too (``healing.py``),
and every figure is broken down by lesion size. The classifier is scored at the slice
level: AUROC of p(diseased | x_t, t) at several noise levels t, since its gradient at every
t of the decoding does the healing.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from monai.metrics import compute_dice
from sklearn.metrics import average_precision_score, roc_auc_score

from .config import check_lesion_region
from .data import DISEASED, HEALTHY, Subject, labelled_slices, lesion_region, read_subject
from .detector import AnomalyDetector
from .thresholds import HEALTHY_PROBABILITY, CalibrationSample, threshold_map
from .imageio import Geometry
from .preprocessing import Orientation
from .healing import by_size, healing_scores, size_group
from .settings import DetectionSettings, Threshold
from .translation import alphas_cumprod

POOLED_VOXELS_PER_SUBJECT = 200_000
CLASSIFIER_TIMESTEPS = (0, 100, 250, 500, 750)


def dice_score(prediction: np.ndarray, truth: np.ndarray) -> float:
    value = compute_dice(torch.from_numpy(prediction[None, None]), torch.from_numpy(truth[None, None]), ignore_empty=True)
    return float(value.item())


def ranking_scores(scores: np.ndarray, truth: np.ndarray) -> Dict[str, Optional[float]]:
    if truth.all() or not truth.any():
        return {"auroc": None, "auprc": None}
    return {"auroc": float(roc_auc_score(truth, scores)), "auprc": float(average_precision_score(truth, scores))}


def _healthy_slice_false_positive_percent(mask: np.ndarray, truth: np.ndarray, foreground: np.ndarray, direction) -> Optional[float]:
    """Flagged voxels as a percentage of the foreground of the axial slices without lesion."""
    orientation = Orientation.from_direction(direction)
    mask_c, truth_c, fg_c = (orientation.to_canonical(a) for a in (mask, truth, foreground))
    healthy_slices = ~truth_c.reshape(truth_c.shape[0], -1).any(axis=1)
    brain = fg_c[healthy_slices].sum()
    if brain == 0:
        return None
    return float(100.0 * (mask_c[healthy_slices] & fg_c[healthy_slices]).sum() / brain)


def _slice_probabilities(detector: AnomalyDetector, images: torch.Tensor, timestep: int, generator: torch.Generator) -> np.ndarray:
    """p(diseased | x_t, t) of clean slices noised to ``timestep`` (x_t = √ᾱ_t x + √(1−ᾱ_t) ε)."""
    if detector.classifier is None:
        return np.full(len(images), np.nan)
    diseased = 1 - detector.card.healthy_class
    alpha = alphas_cumprod(detector.card.schedule)[timestep]
    noise = torch.randn(images.shape, generator=generator)
    noisy = alpha.sqrt() * images + (1 - alpha).sqrt() * noise if timestep > 0 else images
    with torch.no_grad():
        probabilities = []
        for batch in noisy.split(64):
            t = torch.full((len(batch),), timestep, dtype=torch.long, device=detector.device)
            logits = detector.classifier(batch.to(detector.device), t)
            probabilities.append(F.softmax(logits.float(), dim=-1)[:, diseased].cpu().numpy())
        return np.concatenate(probabilities) if probabilities else np.zeros(0)


def _evaluated_voxels(shape, direction, slice_step: int) -> Tuple[np.ndarray, List[int]]:
    """Voxels of every ``slice_step``-th canonical axial slice, on the input grid, and those slice indices."""
    orientation = Orientation.from_direction(direction)
    canonical = np.zeros(orientation.to_canonical(np.zeros(shape, dtype=bool)).shape, dtype=bool)
    chosen = list(range(0, canonical.shape[0], slice_step))
    canonical[chosen] = True
    return orientation.from_canonical(canonical), chosen


def _detect_subject(detector: AnomalyDetector, subject: Subject, settings: DetectionSettings, slice_step: int):
    """Reads a subject and detects on every ``slice_step``-th axial slice; also returns the voxels scored."""
    arrays, reference, mask_array = read_subject(subject, detector.card.channels)
    geometry = Geometry.of(reference)
    evaluated, chosen = _evaluated_voxels(arrays.shape[1:], geometry.direction, slice_step)
    result = detector.detect(list(arrays), geometry, settings, axial_slices=chosen if slice_step > 1 else None)
    return arrays, geometry, mask_array, result, evaluated, chosen


def _healing(subject: Subject, arrays: np.ndarray, result, truth: np.ndarray, analysed: np.ndarray, healthy_subject: bool,
             channel_names) -> Dict[str, Optional[float]]:
    """Healing measures where the true healthy image is known (a healthy subject is its own)."""
    if subject.healthy is not None:
        healthy_truth = read_subject(Subject(subject.name, subject.healthy), channel_names)[0]
    elif healthy_subject:
        healthy_truth = arrays
    else:
        return {}
    return healing_scores(list(arrays), list(healthy_truth), result.healthy, result.intensity_scale, truth, analysed)


class _ThresholdTally:
    """Dice and healthy-subject false positives of one threshold, accumulated over subjects."""

    def __init__(self) -> None:
        self.intersection = self.predicted = self.actual = 0
        self.dice: List[float] = []
        self.healthy_fp: List[float] = []

    def add(self, prediction: np.ndarray, truth: np.ndarray, foreground: np.ndarray, healthy_subject: bool) -> None:
        self.intersection += int((prediction & truth).sum())
        self.predicted += int(prediction.sum())
        self.actual += int(truth.sum())
        if healthy_subject:
            if foreground.any():
                self.healthy_fp.append(100.0 * float((prediction & foreground).sum()) / float(foreground.sum()))
        elif truth.any():
            self.dice.append(dice_score(prediction, truth))

    def summary(self) -> Dict[str, Optional[float]]:
        total = self.predicted + self.actual
        return {
            "pooled_dice": (2.0 * self.intersection / total) if total else None,
            "mean_dice": float(np.mean(self.dice)) if self.dice else None,
            "healthy_subjects_fp_percent": float(np.mean(self.healthy_fp)) if self.healthy_fp else None,
        }


def evaluate_subjects(
    detector: AnomalyDetector,
    subjects: Sequence[Subject],
    *,
    slice_step: int = 1,
    extra_thresholds: Sequence[Threshold] = (),
    settings: Optional[DetectionSettings] = None,
    reconstruction_baseline: bool = False,
    region: str = "whole",
    seed: int = 0,
    progress: Optional[Callable[[int, int], None]] = None,
) -> Dict[str, object]:
    """Runs detection on each subject and scores it.

    Args:
        slice_step: score every n-th axial slice only (1: all), for quick sweeps; only
            those slices are translated and counted.
        extra_thresholds: more thresholds (``"calibrated"``, ``"otsu"`` or values) whose Dice and
            false positives are reported from the same maps, without recomputing them.
        settings: the detection settings (the card's defaults where ``None``).
        reconstruction_baseline: also translate without guidance (a plain DDIM reconstruction),
            whose error on healthy tissue is what the healing translation should stay near.
        region: the part of the tumour scored as the lesion (``LESION_REGIONS``); a subject
            is healthy only without any lesion label, and its size group is that of the whole lesion.
    """
    check_lesion_region(region)  # before any work
    settings = (settings or DetectionSettings()).resolve(detector.card)
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    rows: List[Dict[str, object]] = []
    pooled_scores, pooled_truth, slice_labels = [], [], []
    slice_probs: Dict[int, List[np.ndarray]] = {t: [] for t in CLASSIFIER_TIMESTEPS}
    tally = _ThresholdTally()
    extra = {str(t): _ThresholdTally() for t in extra_thresholds}
    for number, subject in enumerate(subjects, 1):
        arrays, geometry, mask_array, result, evaluated, chosen = _detect_subject(detector, subject, settings, slice_step)
        lesion = (mask_array > 0) if mask_array is not None else np.zeros(result.mask.shape, dtype=bool)
        healthy_subject = not lesion.any()
        truth = (lesion_region(mask_array, region) if mask_array is not None else lesion) & evaluated
        foreground = result.foreground.astype(bool) & evaluated
        prediction = result.mask.astype(bool) & evaluated
        lesion_ml = float(lesion.sum()) * float(np.prod(geometry.as_3d().spacing)) / 1000.0
        row: Dict[str, object] = {
            "subject": subject.name,
            "healthy": healthy_subject,
            "lesion_ml": round(lesion_ml, 2),
            "size_group": None if healthy_subject else size_group(lesion_ml),
            "lesion_voxels": int(truth.sum()),
            "dice": dice_score(prediction, truth) if truth.any() else None,
            **ranking_scores(result.anomaly_map[foreground], truth[foreground]),
            "healthy_slice_fp_percent": _healthy_slice_false_positive_percent(prediction, lesion & evaluated, foreground, geometry.direction),
            "threshold": result.threshold,
            "calibrated_threshold": result.calibrated_threshold.summary(),
            "seconds": round(result.seconds, 2),
            **_healing(subject, arrays, result, truth, foreground, healthy_subject, detector.card.channels),
        }
        if reconstruction_baseline:
            # The plain reconstruction itself: against a reconstruction, an unguided translation is the input.
            unguided = settings.replace(guidance_scale=0.0, redraw_noise_level=0.0, map_reference="input")
            plain = detector.detect(list(arrays), geometry, unguided, axial_slices=chosen if slice_step > 1 else None)
            baseline = _healing(subject, arrays, plain, truth, foreground, healthy_subject, detector.card.channels)
            row.update({f"reconstruction_{key}": value for key, value in baseline.items()})
        rows.append(row)
        tally.add(prediction, truth, foreground, healthy_subject)
        for threshold in extra_thresholds:
            mask, _ = threshold_map(result.anomaly_map, result.foreground.astype(bool), threshold, settings.min_component_voxels,
                                    result.calibrated_threshold)
            extra[str(threshold)].add(mask.astype(bool) & evaluated, truth, foreground, healthy_subject)
        voxels = np.flatnonzero(foreground)
        if len(voxels) > POOLED_VOXELS_PER_SUBJECT:
            voxels = rng.choice(voxels, POOLED_VOXELS_PER_SUBJECT, replace=False)
        pooled_scores.append(result.anomaly_map.ravel()[voxels])
        pooled_truth.append(truth.ravel()[voxels])
        slices = labelled_slices(arrays, geometry.direction, mask_array, detector.card)
        for t in CLASSIFIER_TIMESTEPS:
            slice_probs[t].append(_slice_probabilities(detector, slices.prepared.images, t, generator))
        slice_labels.append(slices.labels)
        if progress is not None:
            progress(number, len(subjects))

    def mean(key: str) -> Optional[float]:
        values = [r[key] for r in rows if r.get(key) is not None]
        return float(np.mean(values)) if values else None

    labels = np.concatenate(slice_labels)
    # Slices holding only another part of the lesion (oedema for a core model) are neither class.
    scored = (labels == HEALTHY) | (labels == DISEASED)
    classifier_auroc = {}
    for t, probabilities in slice_probs.items():
        values = np.concatenate(probabilities)[scored]
        usable = len(np.unique(labels[scored])) == 2 and not np.isnan(values).any()
        classifier_auroc[str(t)] = float(roc_auc_score(labels[scored], values)) if usable else None
    pooled = {
        "dice": tally.summary()["pooled_dice"],
        **ranking_scores(np.concatenate(pooled_scores), np.concatenate(pooled_truth)),
        "healthy_slice_fp_percent": mean("healthy_slice_fp_percent"),
        "slice_auroc": classifier_auroc[str(CLASSIFIER_TIMESTEPS[0])],
    }
    healthy_rows = [r for r in rows if r["healthy"]]
    healing_keys = ["lesion_error", "healthy_error", "contrast_removed"]
    if reconstruction_baseline:
        healing_keys += [f"reconstruction_{key}" for key in ("lesion_error", "healthy_error", "contrast_removed")]
    return {
        "subjects": rows,
        "mean": {key: mean(key) for key in ("dice", "auroc", "auprc", "healthy_slice_fp_percent", "seconds", *healing_keys)},
        "pooled": pooled,
        "by_lesion_size": by_size(rows, ["dice", "auroc", "auprc", *healing_keys]),
        "classifier_auroc_by_t": classifier_auroc,
        "healthy_subjects_fp_percent": tally.summary()["healthy_subjects_fp_percent"],
        "thresholds": {name: t.summary() for name, t in extra.items()},
        "counts": {"subjects": len(rows), "healthy_subjects": len(healthy_rows), "slices": int(len(labels)), "diseased_slices": int((labels == DISEASED).sum())},
        "settings": {"slice_step": slice_step, "region": region, **settings.to_dict()},
    }


def format_report(report: Dict[str, object]) -> str:
    """A plain-text table of the per-subject rows and the pooled figures."""

    def cell(value, digits=3) -> str:
        return "-" if value is None else (f"{value:.{digits}f}" if isinstance(value, float) else str(value))

    lines = [f"{'subject':<28} {'ml':>6} {'dice':>6} {'auroc':>6} {'auprc':>6} {'fp%':>6} {'removed':>7} {'sec':>6}"]
    for row in report["subjects"]:  # type: ignore[union-attr]
        lines.append(
            f"{row['subject']:<28} {cell(row['lesion_ml'], 1):>6} {cell(row['dice']):>6} {cell(row['auroc']):>6} "
            f"{cell(row['auprc']):>6} {cell(row['healthy_slice_fp_percent'], 2):>6} {cell(row.get('contrast_removed'), 2):>7} {cell(row['seconds'], 1):>6}"
        )
    pooled, mean = report["pooled"], report["mean"]
    lines.append(
        f"{'mean':<28} {'':>8} {cell(mean['dice']):>6} {cell(mean['auroc']):>6} {cell(mean['auprc']):>6} "
        f"{cell(mean['healthy_slice_fp_percent'], 2):>6} {cell(mean['seconds'], 1):>6}"
    )
    lines.append(
        f"{'pooled':<28} {'':>8} {cell(pooled['dice']):>6} {cell(pooled['auroc']):>6} {cell(pooled['auprc']):>6} "
        f"{cell(pooled['healthy_slice_fp_percent'], 2):>6}"
    )
    lines.append("slice-level classifier AUROC by noise level t: " + ", ".join(
        f"t={t}: {cell(value)}" for t, value in report["classifier_auroc_by_t"].items()))  # type: ignore[union-attr]
    lines.append(
        f"healing (map units): error in the lesion {cell(mean.get('lesion_error'))}, in healthy tissue {cell(mean.get('healthy_error'))}"
        + (f" (plain reconstruction: {cell(mean.get('reconstruction_healthy_error'))})" if mean.get("reconstruction_healthy_error") is not None else "")
        + f"; lesion contrast removed {cell(mean.get('contrast_removed'), 2)}"
    )
    for name, group in report["by_lesion_size"].items():  # type: ignore[union-attr]
        lines.append(f"  {name:>6} lesions ({group['subjects']}): Dice {cell(group['dice'])}, AUROC {cell(group['auroc'])}, "
                     f"contrast removed {cell(group.get('contrast_removed'), 2)}, lesion error {cell(group.get('lesion_error'))}")
    lines.append(f"false positives on healthy subjects: {cell(report['healthy_subjects_fp_percent'], 2)} % of brain voxels")
    for name, scores in report["thresholds"].items():  # type: ignore[union-attr]
        lines.append(
            f"threshold {name:>8}: pooled Dice {cell(scores['pooled_dice'])}, mean Dice {cell(scores['mean_dice'])}, "
            f"healthy-subject false positives {cell(scores['healthy_subjects_fp_percent'], 2)} %"
        )
    return "\n".join(lines)


def calibration_samples(
    detector: AnomalyDetector,
    subjects: Sequence[Subject],
    *,
    slice_step: int = 1,
    settings: Optional[DetectionSettings] = None,
    region: str = "whole",
    progress: Optional[Callable[[int, int], None]] = None,
) -> List[CalibrationSample]:
    """Each subject's map at ``settings``, in the canonical orientation, for :func:`.thresholds.choose_calibration`."""
    check_lesion_region(region)
    settings = (settings or DetectionSettings()).resolve(detector.card)
    samples = []
    for number, subject in enumerate(subjects, 1):
        arrays, geometry, mask_array, result, evaluated, _ = _detect_subject(detector, subject, settings, slice_step)
        canonical = Orientation.from_direction(geometry.direction).to_canonical
        truth = lesion_region(mask_array, region) if mask_array is not None else np.zeros(arrays.shape[1:], dtype=bool)
        samples.append(CalibrationSample(
            anomaly_map=np.ascontiguousarray(canonical(result.anomaly_map)).astype(np.float16),
            analysed=np.ascontiguousarray(canonical(result.foreground.astype(bool) & evaluated)),
            lesion=np.ascontiguousarray(canonical(truth & evaluated)),
            healthy_subject=mask_array is None or not (mask_array > 0).any(),
            healthy_slices=result.slice_probabilities < HEALTHY_PROBABILITY if detector.classifier is not None else None,
        ))
        if progress is not None:
            progress(number, len(subjects))
    return samples
