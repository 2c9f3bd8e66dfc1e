"""Detection as a background job that a GUI can poll, cancel or wait for.

Two ways to run one, with the same interface (:class:`DetectionJob`):

- :class:`ProcessJob` runs the detection in a separate Python process (this module's
  ``main``), so that a GUI's own thread never runs the networks and Cancel can kill the
  work at once. Inputs and outputs travel as ``.npy`` files in a private temporary folder;
  progress comes back as lines on the process's standard output.
- :class:`ThreadJob` runs it on a thread of this process and keeps loaded models between
  runs, which suits a server that detects for several clients.

Neither touches the caller's data until the job has finished: a cancelled or failed job
leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .imageio import Geometry

RUNNING, DONE, FAILED, CANCELLED = "running", "done", "failed", "cancelled"
# Where ``python -m DiffusionAnomalyLib.jobs`` can import this package from.
PACKAGE_PARENT = str(Path(__file__).resolve().parents[1])


@dataclass
class DetectionRequest:
    """Everything one detection needs, in engine terms (arrays and settings).

    Attributes:
        model: the model bundle folder.
        channels: one (k, j, i) array per model channel, on ``geometry``'s grid.
        geometry: the channels' voxel grid.
        settings: detection settings passed to :meth:`AnomalyDetector.detect`
            (noise_level, guidance_scale, steps, threshold, batch_size, precision, ...);
            those left out come from the model card.
        device: ``auto``, ``cpu`` or ``cuda``.
        axial_slices: only these canonical axial slices (a preview), or all.
    """

    model: str
    channels: List[np.ndarray]
    geometry: Geometry
    settings: Dict[str, object] = field(default_factory=dict)
    device: str = "auto"
    axial_slices: Optional[List[int]] = None


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


class ThreadJob(DetectionJob):
    """Runs a request on a daemon thread of this process."""

    def __init__(self, request: DetectionRequest) -> None:
        super().__init__()
        self._thread = threading.Thread(target=self._run, args=(request,), name="diffusion-anomaly-detection", daemon=True)
        self._thread.start()

    def _run(self, request: DetectionRequest) -> None:
        from .translation import TranslationCancelled

        try:
            detector = cached_detector(request.model, request.device)
            result = detector.detect(
                request.channels,
                request.geometry,
                axial_slices=request.axial_slices,
                progress=self._progress,
                cancel=self._finished.is_set,
                **request.settings,
            )
        except TranslationCancelled:
            self._finish(CANCELLED, message="cancelled")
        except Exception as error:  # reported through the status, not lost on the thread
            self._finish(FAILED, message=str(error) or type(error).__name__)
        else:
            self._finish(DONE, result)


# -- in a separate process -----------------------------------------------------------------

Launcher = Callable[[List[str], Dict[str, str]], subprocess.Popen]


def launch_python(arguments: List[str], environment: Dict[str, str]) -> subprocess.Popen:
    """Starts ``arguments`` with the output captured line by line (as Slicer's launchConsoleProcess)."""
    env = dict(os.environ)
    env.update(environment)
    return subprocess.Popen(arguments, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True)


def _with_package_path(environment: Dict[str, str]) -> Dict[str, str]:
    existing = environment.get("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    paths = [PACKAGE_PARENT] + [p for p in existing.split(os.pathsep) if p and p != PACKAGE_PARENT]
    return {**environment, "PYTHONPATH": os.pathsep.join(paths)}


def write_request(request: DetectionRequest, folder: Path) -> Path:
    names = []
    for index, channel in enumerate(request.channels):
        name = f"channel{index}.npy"
        np.save(folder / name, np.asarray(channel, dtype=np.float32))
        names.append(name)
    path = folder / "request.json"
    path.write_text(json.dumps({
        "model": str(request.model),
        "channels": names,
        "geometry": asdict(request.geometry),
        "settings": request.settings,
        "device": request.device,
        "axial_slices": request.axial_slices,
    }))
    return path


def read_request(path: Path) -> DetectionRequest:
    spec = json.loads(Path(path).read_text())
    geometry = Geometry(**{k: tuple(v) for k, v in spec["geometry"].items()})
    channels = [np.load(Path(path).parent / name) for name in spec["channels"]]
    return DetectionRequest(spec["model"], channels, geometry, spec["settings"], spec["device"], spec["axial_slices"])


RESULT_ARRAYS = ("anomaly_map", "mask", "foreground")


class ProcessJob(DetectionJob):
    """Runs a request in a child Python process; :meth:`cancel` kills it.

    Args:
        request: what to detect.
        python: the interpreter to run (in Slicer, ``PythonSlicer``); default this one.
        launch: starts the process (e.g. ``slicer.util.launchConsoleProcess``); it must
            capture standard output as text.
        environment: extra environment variables for the process.
    """

    def __init__(self, request: DetectionRequest, python: Optional[str] = None, launch: Launcher = launch_python,
                 environment: Optional[Dict[str, str]] = None) -> None:
        super().__init__()
        self._folder = Path(tempfile.mkdtemp(prefix="diffusion-anomaly-"))
        self._output: List[str] = []
        try:
            write_request(request, self._folder)
            arguments = [python or sys.executable, "-m", "DiffusionAnomalyLib.jobs", str(self._folder)]
            self._process = launch(arguments, _with_package_path(environment or {}))
        except Exception:
            shutil.rmtree(self._folder, ignore_errors=True)
            raise
        self._reader = threading.Thread(target=self._read, name="diffusion-anomaly-output", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self._process.stdout:
            line = line.rstrip("\n")
            if line.startswith("progress "):
                done, total = line.split()[1:3]
                self._progress(int(done), int(total))
            elif line:
                self._output = (self._output + [line])[-40:]
        code = self._process.wait()
        try:
            if self.status().state != RUNNING:
                return
            if code == 0:
                self._finish(DONE, self._load_result())
            else:
                self._finish(FAILED, message=self._failure_message(code))
        except Exception as error:
            self._finish(FAILED, message=f"cannot read the detection's result: {error}")
        finally:
            shutil.rmtree(self._folder, ignore_errors=True)

    def _failure_message(self, code: int) -> str:
        errors = [line[len("error "):] for line in self._output if line.startswith("error ")]
        if errors:
            return errors[-1]
        tail = "\n".join(self._output[-10:])
        return f"the detection process stopped with exit code {code}" + (f":\n{tail}" if tail else "")

    def _load_result(self):
        from .detector import DetectionResult

        summary = json.loads((self._folder / "result.json").read_text())
        arrays = {name: np.load(self._folder / f"{name}.npy") for name in RESULT_ARRAYS}
        healthy = [np.load(self._folder / name) for name in summary.pop("healthy")]
        geometry = Geometry(**{k: tuple(v) for k, v in summary.pop("geometry").items()})
        return DetectionResult(healthy=healthy, geometry=geometry, **arrays, **summary)

    def cancel(self) -> None:
        super().cancel()
        if self._process.poll() is None:
            self._process.kill()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m DiffusionAnomalyLib.jobs FOLDER``: runs FOLDER/request.json into FOLDER."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if len(arguments) != 1:
        print("usage: python -m DiffusionAnomalyLib.jobs REQUEST_FOLDER", file=sys.stderr)
        return 2
    folder = Path(arguments[0])
    try:
        request = read_request(folder / "request.json")
        detector = cached_detector(request.model, request.device)

        def report(done: int, total: int) -> None:
            print(f"progress {done} {total}", flush=True)

        result = detector.detect(request.channels, request.geometry, axial_slices=request.axial_slices, progress=report, **request.settings)
        for name in RESULT_ARRAYS:
            np.save(folder / f"{name}.npy", getattr(result, name))
        healthy = []
        for index, channel in enumerate(result.healthy):
            healthy.append(f"healthy{index}.npy")
            np.save(folder / healthy[-1], channel)
        (folder / "result.json").write_text(json.dumps({
            "threshold": result.threshold,
            "slices_processed": result.slices_processed,
            "seconds": result.seconds,
            "geometry": asdict(result.geometry),
            "healthy": healthy,
        }))
    except Exception as error:
        print(f"error {' '.join(str(error).split()) or type(error).__name__}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
