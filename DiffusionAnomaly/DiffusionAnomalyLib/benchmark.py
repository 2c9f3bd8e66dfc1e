"""Timing the translation of a whole volume: the product's defaults against the paper's setting.

The paper's setting is every DDIM step to L = 500 (500 network passes per direction),
one slice at a time, in fp32. Both run in the same process on the same device.
"""

from __future__ import annotations

import threading
import time
from typing import Dict, Optional, Sequence

import numpy as np
import torch

from .detector import AnomalyDetector, resolve_precision
from .imageio import Geometry
from .preprocessing import Orientation
from .settings import DetectionSettings

PAPER_SETTING = DetectionSettings(noise_level=0.5, steps=500, batch_size=1, precision="fp32")


def phantom_volume(channels: int, shape: Sequence[int] = (155, 240, 240), seed: int = 0) -> np.ndarray:
    """(C, k, j, i) channels of a head-sized ellipsoid with smooth texture on the BraTS grid.

    Run time depends on the number of slices with foreground and the model, not on the
    anatomy, so this stands in for a study when none is given.
    """
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    inside = (z / 0.9) ** 2 + (y / 0.8) ** 2 + (x / 0.65) ** 2 < 1
    texture = rng.normal(size=(channels,) + tuple(s // 8 for s in shape))
    smooth = torch.nn.functional.interpolate(torch.from_numpy(texture)[None].float(), size=tuple(shape), mode="trilinear")[0].numpy()
    return np.where(inside, 100 + 20 * smooth, 0).astype(np.float32)


class PeakMemory:
    """Peak resident memory (CPU) or peak allocated GPU memory during a ``with`` block, in MiB."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_mib = 0.0
        self._stop = threading.Event()

    @staticmethod
    def _rss_mib() -> float:
        with open("/proc/self/status", encoding="utf-8") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
        return 0.0

    def _poll(self) -> None:
        while not self._stop.wait(0.02):
            self.peak_mib = max(self.peak_mib, self._rss_mib())

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak_mib = self._rss_mib()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mib = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self._stop.set()
            self._thread.join()


def _timed(detector: AnomalyDetector, arrays, geometry, slices: Optional[Sequence[int]], settings: DetectionSettings) -> Dict[str, float]:
    with PeakMemory(detector.device) as memory:
        started = time.perf_counter()
        result = detector.detect(list(arrays), geometry, settings, axial_slices=slices)
        if detector.device.type == "cuda":
            torch.cuda.synchronize(detector.device)
        seconds = time.perf_counter() - started
    return {
        "slices": result.slices_processed,
        "seconds": round(seconds, 2),
        "seconds_per_slice": round(seconds / max(result.slices_processed, 1), 3),
        "bias_correction_seconds": round(result.bias_seconds, 2),
        "peak_memory_mib": round(memory.peak_mib, 1),
    }


def run_benchmark(
    detector: AnomalyDetector,
    arrays: Optional[np.ndarray] = None,
    geometry: Optional[Geometry] = None,
    paper_slices: Optional[int] = 2,
) -> Dict[str, object]:
    """Times the default settings on the whole volume and the paper's setting on
    ``paper_slices`` central slices (``None``: the whole volume, which takes long on a CPU).
    """
    if arrays is None:
        arrays = phantom_volume(len(detector.card.channels))
    geometry = geometry or Geometry.default(3)
    defaults = detector.card.defaults
    default_settings = defaults.replace(precision=resolve_precision("auto", detector.device))
    default_run = _timed(detector, arrays, geometry, None, default_settings)
    volume_slices = default_run["slices"]
    chosen = None
    if paper_slices is not None:
        axial_count = Orientation.from_direction(geometry.direction).to_canonical(arrays[0]).shape[0]
        centre = axial_count // 2
        chosen = list(range(centre - paper_slices // 2, centre - paper_slices // 2 + paper_slices))
    paper_settings = PAPER_SETTING.replace(guidance_scale=defaults.guidance_scale).resolve(detector.card)
    paper_run = _timed(detector, arrays, geometry, chosen, paper_settings)
    paper_volume_seconds = paper_run["seconds_per_slice"] * volume_slices
    return {
        "device": torch.cuda.get_device_name(detector.device) if detector.device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads",
        "volume_shape": list(arrays.shape[1:]),
        "slices_with_foreground": volume_slices,
        "default": {**default_settings.to_dict(), **default_run},
        "paper": {**paper_settings.to_dict(), **paper_run, "volume_seconds": round(paper_volume_seconds, 1), "volume_seconds_from": f"{paper_run['slices']} timed slices x {volume_slices}" if chosen else "full run"},
        "speedup_per_volume": round(paper_volume_seconds / max(default_run["seconds"], 1e-9), 1),
    }


def format_benchmark(report: Dict[str, object]) -> str:
    default, paper = report["default"], report["paper"]  # type: ignore[index]
    return "\n".join(
        [
            f"device: {report['device']}; volume {report['volume_shape']}, {report['slices_with_foreground']} slices with foreground",
            f"default  (L={default['noise_level']}, {default['steps']} steps, batch {default['batch_size']}, {default['precision']}): "
            f"{default['seconds_per_slice']:.3f} s/slice, {default['seconds']:.1f} s/volume"
            + (f" ({default['bias_correction_seconds']:.1f} s of it bias correction, on the CPU)" if default["bias_correction_seconds"] else "")
            + f", peak memory {default['peak_memory_mib']:.0f} MiB",
            f"paper    (L=0.5, every step, batch 1, fp32): {paper['seconds_per_slice']:.3f} s/slice over {paper['slices']} slice(s), "
            f"{paper['volume_seconds']:.1f} s/volume ({paper['volume_seconds_from']}), peak memory {paper['peak_memory_mib']:.0f} MiB",
            f"speed-up per volume: {report['speedup_per_volume']:.1f}x",
        ]
    )
