"""Scoring anomaly maps against lesion masks, per subject and pooled over a cohort.

Voxel metrics are computed inside each subject's foreground (the brain): Dice of the
thresholded map against the whole lesion (mask > 0), pixel AUROC and AUPRC of the map,
and the false-positive area on healthy slices (slices without any lesion voxel). The
classifier is scored at the slice level (AUROC of p(diseased | x, t = 0)).
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.metrics import compute_dice
from sklearn.metrics import average_precision_score, roc_auc_score

from .data import Subject, read_subject, subject_slices
from .detector import AnomalyDetector
from .imageio import Geometry
from .preprocessing import Orientation

POOLED_VOXELS_PER_SUBJECT = 200_000


def _dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    value = compute_dice(torch.from_numpy(prediction[None, None]), torch.from_numpy(truth[None, None]), ignore_empty=True)
    return float(value.item())


def _ranking_scores(scores: np.ndarray, truth: np.ndarray) -> Dict[str, Optional[float]]:
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


def _slice_probabilities(detector: AnomalyDetector, images: torch.Tensor) -> np.ndarray:
    if detector.classifier is None:
        return np.full(len(images), np.nan)
    diseased = 1 - detector.card.healthy_class
    with torch.no_grad():
        x = images.to(detector.device)
        logits = detector.classifier(x, torch.zeros(len(x), dtype=torch.long, device=detector.device))
        return F.softmax(logits.float(), dim=-1)[:, diseased].cpu().numpy()


def evaluate_subjects(
    detector: AnomalyDetector,
    subjects: Sequence[Subject],
    *,
    seed: int = 0,
    progress: Optional[Callable[[int, int], None]] = None,
    **detect_options,
) -> Dict[str, object]:
    """Runs detection on each subject and scores it; ``detect_options`` go to :meth:`AnomalyDetector.detect`."""
    rng = np.random.default_rng(seed)
    rows: List[Dict[str, object]] = []
    pooled_scores, pooled_truth, slice_probs, slice_labels = [], [], [], []
    intersection = predicted = actual = 0
    for number, subject in enumerate(subjects, 1):
        arrays, reference, mask_array = read_subject(subject, detector.card.channels)
        geometry = Geometry.of(reference)
        result = detector.detect(list(arrays), geometry, **detect_options)
        truth = (mask_array > 0) if mask_array is not None else np.zeros(result.mask.shape, dtype=bool)
        foreground = result.foreground.astype(bool)
        prediction = result.mask.astype(bool)
        row: Dict[str, object] = {
            "subject": subject.name,
            "lesion_voxels": int(truth.sum()),
            "dice": _dice(prediction, truth) if truth.any() else None,
            **_ranking_scores(result.anomaly_map[foreground], truth[foreground]),
            "healthy_slice_fp_percent": _healthy_slice_false_positive_percent(prediction, truth, foreground, geometry.direction),
            "threshold": result.threshold,
            "seconds": round(result.seconds, 2),
        }
        rows.append(row)
        intersection += int((prediction & truth).sum())
        predicted += int(prediction.sum())
        actual += int(truth.sum())
        voxels = np.flatnonzero(foreground)
        if len(voxels) > POOLED_VOXELS_PER_SUBJECT:
            voxels = rng.choice(voxels, POOLED_VOXELS_PER_SUBJECT, replace=False)
        pooled_scores.append(result.anomaly_map.ravel()[voxels])
        pooled_truth.append(truth.ravel()[voxels])
        slices = subject_slices(subject, detector.card)
        slice_probs.append(_slice_probabilities(detector, slices.prepared.images))
        slice_labels.append(slices.labels)
        if progress is not None:
            progress(number, len(subjects))

    def mean(key: str) -> Optional[float]:
        values = [r[key] for r in rows if r[key] is not None]
        return float(np.mean(values)) if values else None

    probabilities, labels = np.concatenate(slice_probs), np.concatenate(slice_labels)
    slice_auroc = None
    if labels.any() and not labels.all() and not np.isnan(probabilities).any():
        slice_auroc = float(roc_auc_score(labels, probabilities))
    pooled = {
        "dice": (2.0 * intersection / (predicted + actual)) if (predicted + actual) else None,
        **_ranking_scores(np.concatenate(pooled_scores), np.concatenate(pooled_truth)),
        "healthy_slice_fp_percent": mean("healthy_slice_fp_percent"),
        "slice_auroc": slice_auroc,
    }
    healthy_rows = [r for r in rows if r["lesion_voxels"] == 0]
    return {
        "subjects": rows,
        "mean": {key: mean(key) for key in ("dice", "auroc", "auprc", "healthy_slice_fp_percent", "seconds")},
        "pooled": pooled,
        "healthy_subjects_fp_percent": (float(np.mean([r["healthy_slice_fp_percent"] for r in healthy_rows])) if healthy_rows else None),
        "counts": {"subjects": len(rows), "healthy_subjects": len(healthy_rows), "slices": int(len(labels)), "diseased_slices": int(labels.sum())},
        "settings": {k: v for k, v in detect_options.items() if not callable(v)},
    }


def format_report(report: Dict[str, object]) -> str:
    """A plain-text table of the per-subject rows and the pooled figures."""

    def cell(value, digits=3) -> str:
        return "-" if value is None else (f"{value:.{digits}f}" if isinstance(value, float) else str(value))

    lines = [f"{'subject':<28} {'lesion':>8} {'dice':>6} {'auroc':>6} {'auprc':>6} {'fp%':>6} {'sec':>6}"]
    for row in report["subjects"]:  # type: ignore[union-attr]
        lines.append(
            f"{row['subject']:<28} {row['lesion_voxels']:>8} {cell(row['dice']):>6} {cell(row['auroc']):>6} "
            f"{cell(row['auprc']):>6} {cell(row['healthy_slice_fp_percent'], 2):>6} {cell(row['seconds'], 1):>6}"
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
    lines.append(f"slice-level classifier AUROC: {cell(pooled['slice_auroc'])}")
    lines.append(f"false positives on healthy subjects: {cell(report['healthy_subjects_fp_percent'], 2)} % of brain voxels")
    return "\n".join(lines)
