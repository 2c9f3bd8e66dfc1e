"""Detection as a job that a front end can poll, cancel or wait for.

Three ways to run one, with the same interface (:class:`DetectionJob`):

- :class:`~.process_job.ProcessJob` runs it in a separate Python process, so that a GUI's
  own thread never runs the networks and Cancel stops the work at once;
- :class:`ThreadJob` runs it on a thread of this process and keeps loaded models between
  runs, which suits a server whose event loop leaves the thread time to run;
- :class:`InlineJob` runs it to the end in the calling thread (a one-slice preview under a
  wait cursor, with the model kept loaded).

None touches the caller's data: a job only produces a result, which the caller applies.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from .imageio import Geometry
from .settings import DetectionSettings

RUNNING, DONE, FAILED, CANCELLED = "running", "done", "failed", "cancelled"


@dataclass
class DetectionRequest:
    """Everything one detection needs, in engine terms (arrays and settings).

    Attributes:
        model: the model bundle folder.
        channels: one (k, j, i) array per model channel, on ``geometry``'s grid.
        geometry: the channels' voxel grid.
        settings: the detection settings (those left ``None`` come from the model card).
        axial_slices: only these canonical axial slices (a preview), or all.
        brain_mask: the user's brain mask on the channels' grid, or ``None`` (found as the settings say).
    """

    model: str
    channels: List[np.ndarray]
    geometry: Geometry
    settings: DetectionSettings = field(default_factory=DetectionSettings)
    axial_slices: Optional[List[int]] = None
    brain_mask: Optional[np.ndarray] = None


@dataclass
class JobStatus:
    """A snapshot of a job: ``state`` is running, done, failed or cancelled."""

    state: str
    done: int = 0
    total: int = 0
    elapsed: float = 0.0
    message: str = ""

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 0.0

    @property
    def remaining(self) -> Optional[float]:
        """Seconds left at the rate so far, once there is a rate to go by."""
        if self.state != RUNNING or not self.done or not self.total:
            return None
        return self.elapsed * (self.total - self.done) / self.done


class DetectionJob:
    """A detection under way: poll :meth:`status`, :meth:`cancel` it, or :meth:`wait` for it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state = RUNNING
        self._done = 0
        self._total = 0
        self._message = ""
        self._result = None
        self._started = time.perf_counter()
        self._finished_at: Optional[float] = None
        self._finished = threading.Event()

    # Called from the worker side.
    def _progress(self, done: int, total: int) -> None:
        with self._lock:
            self._done, self._total = done, total

    def _finish(self, state: str, result=None, message: str = "") -> None:
        with self._lock:
            if self._state != RUNNING:
                return
            self._state, self._result, self._message = state, result, message
            self._finished_at = time.perf_counter()
        self._finished.set()

    # Called by the owner.
    def status(self) -> JobStatus:
        with self._lock:
            end = self._finished_at if self._finished_at is not None else time.perf_counter()
            return JobStatus(self._state, self._done, self._total, end - self._started, self._message)

    def cancel(self) -> None:
        self._finish(CANCELLED, message="cancelled")

    def wait(self, timeout: Optional[float] = None) -> JobStatus:
        """Blocks until the job ends (or ``timeout`` seconds pass) and returns its status."""
        self._finished.wait(timeout)
        return self.status()

    def result(self):
        """The :class:`DetectionResult` of a finished job; raises if it failed or was cancelled."""
        status = self.status()
        if status.state != DONE:
            raise RuntimeError(f"detection {status.state}: {status.message}" if status.message else f"detection {status.state}")
        return self._result


# -- on a thread ---------------------------------------------------------------------------

_detectors: Dict[Tuple[str, str], object] = {}
_detectors_lock = threading.Lock()


def cached_detector(model: str, device: str = "auto"):
    """One loaded :class:`AnomalyDetector` per model folder and device, reused across jobs."""
    from .detector import AnomalyDetector

    key = (str(Path(model).resolve()), device)
    with _detectors_lock:
        if key not in _detectors:
            _detectors[key] = AnomalyDetector.from_bundle(model, device=device)
        return _detectors[key]


class _LocalJob(DetectionJob):
    """Runs a request in this process with a cached detector."""

    def _run(self, request: DetectionRequest) -> None:
        from .translation import TranslationCancelled

        try:
            detector = cached_detector(request.model, request.settings.device)
            result = detector.detect(
                request.channels,
                request.geometry,
                request.settings,
                brain_mask=request.brain_mask,
                axial_slices=request.axial_slices,
                progress=self._progress,
                cancel=self._finished.is_set,
            )
        except TranslationCancelled:
            self._finish(CANCELLED, message="cancelled")
        except Exception as error:  # reported through the status, not lost on the thread
            self._finish(FAILED, message=str(error) or type(error).__name__)
        else:
            self._finish(DONE, result)


class ThreadJob(_LocalJob):
    """Runs a request on a daemon thread of this process.

    Not for desktop Slicer: its main loop holds the GIL, so a Python thread there runs only
    while the main thread runs Python (see :class:`~.process_job.ProcessJob`).
    """

    def __init__(self, request: DetectionRequest) -> None:
        super().__init__()
        self._thread = threading.Thread(target=self._run, args=(request,), name="diffusion-anomaly-detection", daemon=True)
        self._thread.start()


class InlineJob(_LocalJob):
    """Runs a request to the end in the calling thread; it has finished when the constructor returns."""

    def __init__(self, request: DetectionRequest) -> None:
        super().__init__()
        self._run(request)
