"""``diffusion-anomaly demo``: the bundled model on the bundled sample study, with a figure."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import SimpleITK as sitk

from .detector import AnomalyDetector, DetectionResult
from .evaluation import dice_score, ranking_scores
from .imageio import read_image, write_image
from .preprocessing import Orientation
from .resources import default_model, sample_channels, sample_mask
from .settings import DetectionSettings


def _display_slices(truth: np.ndarray, count: int) -> List[int]:
    """Axial slices through the lesion: the largest cross-section and two either side."""
    areas = truth.reshape(truth.shape[0], -1).sum(axis=1)
    if not areas.any():
        return [truth.shape[0] // 2]
    lesion_slices = np.flatnonzero(areas)
    picks = np.linspace(lesion_slices[0], lesion_slices[-1], count + 2)[1:-1].round().astype(int)
    return sorted(set(int(i) for i in picks) | {int(np.argmax(areas))})[:count]


def _window(image: np.ndarray, brain: np.ndarray) -> np.ndarray:
    low, high = np.percentile(image[brain], [0.5, 99.5]) if brain.any() else (0.0, 1.0)
    return np.clip((image - low) / max(high - low, 1e-6), 0, 1)


def save_figure(flair: np.ndarray, healthy: np.ndarray, result: DetectionResult, truth: np.ndarray, direction: Sequence[float], path: Path, count: int = 3) -> Path:
    """Rows of axial slices: FLAIR, its healthy translation, the map over FLAIR, outlines.

    Slices are shown in radiological convention (patient's right on the image's left).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    orientation = Orientation.from_direction(direction)
    flair_c, healthy_c, map_c, mask_c, truth_c, brain_c = (
        orientation.to_canonical(a) for a in (flair, healthy, result.anomaly_map, result.mask, truth, result.foreground)
    )
    slices = _display_slices(truth_c, count)
    top = float(np.percentile(map_c[brain_c], 99.9)) if brain_c.any() else 1.0
    figure, axes = plt.subplots(len(slices), 4, figsize=(12, 3.1 * len(slices)), squeeze=False)
    titles = ("FLAIR input", "healthy translation", "anomaly map", "predicted (red) vs true (green)")
    for row, index in enumerate(slices):
        brain = brain_c[index]
        grey = _window(flair_c[index], brain)
        panels = (grey, _window(healthy_c[index], brain), grey, grey)
        for column, panel in enumerate(panels):
            axis = axes[row, column]
            axis.imshow(panel, cmap="gray", vmin=0, vmax=1)
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(titles[column])
        axes[row, 0].set_ylabel(f"axial slice {index}")
        overlay = np.ma.masked_less_equal(map_c[index], 0.1 * top)
        shown = axes[row, 2].imshow(overlay, cmap="inferno", vmin=0, vmax=top, alpha=0.75)
        axes[row, 3].contour(truth_c[index].astype(float), levels=[0.5], colors="lime", linewidths=1.2)
        axes[row, 3].contour(mask_c[index].astype(float), levels=[0.5], colors="red", linewidths=1.2)
    figure.colorbar(shown, ax=axes.ravel().tolist(), fraction=0.02, pad=0.02, label="anomaly (normalised units)")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(figure)
    return path


def run_demo(out: Path, settings: Optional[DetectionSettings] = None, progress=None) -> Dict[str, object]:
    """Detects anomalies in the sample study with the default model; writes NIfTIs and a PNG."""
    started = time.perf_counter()
    settings = settings or DetectionSettings()
    detector = AnomalyDetector.from_bundle(default_model(), device=settings.device)
    images = [read_image(p) for p in sample_channels()]
    truth = sitk.GetArrayFromImage(read_image(sample_mask())) > 0
    result = detector.detect(images, settings=settings, progress=progress)
    out.mkdir(parents=True, exist_ok=True)
    written = {
        "map": write_image(result.anomaly_map, result.geometry, out / "anomaly_map.nii.gz"),
        "mask": write_image(result.mask, result.geometry, out / "anomaly_mask.nii.gz"),
    }
    for name, channel in zip(detector.card.channels, result.healthy):
        written[f"healthy_{name}"] = write_image(channel, result.geometry, out / f"healthy_{name}.nii.gz")
    flair_index = list(detector.card.channels).index("FLAIR") if "FLAIR" in detector.card.channels else 0
    flair = sitk.GetArrayFromImage(images[flair_index]).astype(np.float32)
    written["figure"] = save_figure(flair, result.healthy[flair_index], result, truth, result.geometry.direction, out / "demo.png")
    brain = result.foreground.astype(bool)
    scores = ranking_scores(result.anomaly_map[brain], truth[brain])
    return {
        "dice": dice_score(result.mask.astype(bool), truth),
        "auroc": scores["auroc"],
        "auprc": scores["auprc"],
        "detection_seconds": result.seconds,
        "total_seconds": time.perf_counter() - started,
        "slices": result.slices_processed,
        "device": detector.device.type,
        "files": {k: str(v) for k, v in written.items()},
    }
