"""Detection in a child Python process, as desktop Slicer needs it.

Why a process, and how it is managed, as Slicer's own sources decide it:

- Slicer's main loop keeps the GIL: PythonQt's thread support is off by default
  (MeVisLab/pythonqt ``src/PythonQt.h``, ``setEnableThreadSupport``: "turned off by default")
  and neither Slicer nor CTK turns it on. A Python thread in the application runs only while
  the main thread runs Python, so the networks run in a child process, and no thread of
  ours reads the child's output: the owner polls :meth:`ProcessJob.status` (a ``QTimer``).
- ``PythonSlicer`` is CTK's AppLauncher, which starts ``python-real`` as its own child
  (commontk/AppLauncher ``Base/ctkAppLauncher.cpp``, ``runProcess``: ``Process.start(...)``)
  and ties nothing to its own lifetime: killing the launcher leaves the detection running.
  The job gets its own process group (POSIX) or is killed with ``taskkill /T`` (Windows),
  so Cancel stops the whole tree; the child also watches the application's PID and stops
  when the application is gone.
- Slicer before 5.12 sets neither ``PYTHONUTF8`` nor ``PYTHONIOENCODING`` and decodes child
  output with the locale's code page (``slicer.util.launchConsoleProcess``). The child here
  writes UTF-8 into a log file, which is read with replacement characters, so no byte can
  stop the job from being followed.

Protocol, in a private temporary folder: ``request.json`` and ``channelN.npy`` in; the
child appends ``progress DONE TOTAL`` and ``error MESSAGE`` lines to ``output.log`` and
writes the result arrays and ``result.json``. The folder is removed when the job ends.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

import numpy as np

from .imageio import Geometry
from .jobs import DONE, FAILED, RUNNING, DetectionJob, DetectionRequest, cached_detector
from .settings import DetectionSettings

# Where ``python -m DiffusionAnomalyLib.process_job`` can import this package from.
PACKAGE_PARENT = str(Path(__file__).resolve().parents[1])
LOG_FILE = "output.log"
RESULT_ARRAYS = ("anomaly_map", "mask", "foreground", "brain_mask", "slice_probabilities")
PARENT_CHECK_SECONDS = 1.0
EXIT_PARENT_GONE = 3
_LOG_TAIL_LINES = 40


def write_request(request: DetectionRequest, folder: Path) -> Path:
    names = []
    for index, channel in enumerate(request.channels):
        name = f"channel{index}.npy"
        np.save(folder / name, np.asarray(channel, dtype=np.float32))
        names.append(name)
    if request.brain_mask is not None:
        np.save(folder / "brain_mask.npy", np.asarray(request.brain_mask, dtype=np.uint8))
    path = folder / "request.json"
    path.write_text(json.dumps({
        "model": str(request.model),
        "channels": names,
        "brain_mask": "brain_mask.npy" if request.brain_mask is not None else None,
        "geometry": asdict(request.geometry),
        "settings": request.settings.to_dict(),
        "axial_slices": request.axial_slices,
    }), encoding="utf-8")
    return path


def read_request(path: Path) -> DetectionRequest:
    spec = json.loads(Path(path).read_text(encoding="utf-8"))
    geometry = Geometry(**{k: tuple(v) for k, v in spec["geometry"].items()})
    channels = [np.load(Path(path).parent / name) for name in spec["channels"]]
    brain_mask = np.load(Path(path).parent / spec["brain_mask"]) if spec.get("brain_mask") else None
    return DetectionRequest(spec["model"], channels, geometry, DetectionSettings.from_dict(spec["settings"]), spec["axial_slices"], brain_mask)


def child_environment(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """This process's environment with the package importable and UTF-8 output in the child."""
    environment = dict(os.environ)
    environment.update(extra or {})
    paths = [PACKAGE_PARENT] + [p for p in environment.get("PYTHONPATH", "").split(os.pathsep) if p and p != PACKAGE_PARENT]
    environment["PYTHONPATH"] = os.pathsep.join(paths)
    environment["PYTHONUTF8"] = "1"
    environment["PYTHONIOENCODING"] = "utf-8"
    return environment


def start_process(arguments: Sequence[str], log_path: Path, environment: Dict[str, str]) -> subprocess.Popen:
    """Starts ``arguments`` in a process group of its own, its output going to ``log_path``."""
    options: Dict[str, object] = {}
    if os.name == "nt":
        options["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW
    else:
        options["start_new_session"] = True
    with open(log_path, "wb") as log:
        return subprocess.Popen(list(arguments), env=environment, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, **options)


def kill_process_tree(process: subprocess.Popen) -> None:
    """Kills a process started by :func:`start_process` and every process it started."""
    if os.name == "nt":
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(process.pid)], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, creationflags=subprocess.CREATE_NO_WINDOW)
    else:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # the group outlives its leader, so this works after the launcher died too
        except (ProcessLookupError, PermissionError):
            pass
    if process.poll() is None:
        process.kill()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


class ProcessJob(DetectionJob):
    """Runs a request in a child process; :meth:`cancel` stops the whole process tree.

    Args:
        request: what to detect.
        python: the interpreter to run, as a path or a command prefix (in Slicer,
            ``PythonSlicer``); default this one.
        environment: extra environment variables for the child.
    """

    def __init__(self, request: DetectionRequest, python: Union[str, Sequence[str], None] = None,
                 environment: Optional[Dict[str, str]] = None) -> None:
        super().__init__()
        self._folder = Path(tempfile.mkdtemp(prefix="diffusion-anomaly-"))
        self._read_offset = 0
        self._partial_line = ""
        self._output: List[str] = []
        self._collect_lock = threading.Lock()
        try:
            write_request(request, self._folder)
            command = [python] if isinstance(python, str) else list(python or [sys.executable])
            arguments = command + ["-m", "DiffusionAnomalyLib.process_job", str(self._folder), "--parent-pid", str(os.getpid())]
            self._process = start_process(arguments, self._folder / LOG_FILE, child_environment(environment))
        except Exception:
            shutil.rmtree(self._folder, ignore_errors=True)
            raise

    @property
    def pid(self) -> int:
        return self._process.pid

    def status(self):
        self._collect()
        return super().status()

    def wait(self, timeout: Optional[float] = None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.status().state == RUNNING and (deadline is None or time.monotonic() < deadline):
            time.sleep(0.05)
        return self.status()

    def cancel(self) -> None:
        super().cancel()
        with self._collect_lock:
            kill_process_tree(self._process)
            shutil.rmtree(self._folder, ignore_errors=True)

    def _collect(self) -> None:
        """Reads what the child wrote since the last call; finishes the job once the child has exited."""
        with self._collect_lock:
            if super().status().state != RUNNING:
                return
            code = self._process.poll()  # before reading, so that no line written before the exit is missed
            self._read_new_lines()
            if code is None:
                return
            try:
                if code == 0:
                    self._finish(DONE, self._load_result())
                else:
                    self._finish(FAILED, message=self._failure_message(code))
            except Exception as error:
                self._finish(FAILED, message=f"cannot read the detection's result: {error}")
            finally:
                shutil.rmtree(self._folder, ignore_errors=True)

    def _read_new_lines(self) -> None:
        try:
            with open(self._folder / LOG_FILE, "rb") as log:
                log.seek(self._read_offset)
                data = log.read()
        except OSError:
            return
        self._read_offset += len(data)
        text = self._partial_line + data.decode("utf-8", errors="replace")
        lines = text.split("\n")
        self._partial_line = lines.pop()
        for line in (line.rstrip("\r") for line in lines):
            if line.startswith("progress "):
                try:
                    done, total = (int(v) for v in line.split()[1:3])
                except ValueError:
                    continue
                self._progress(done, total)
            elif line:
                self._output = (self._output + [line])[-_LOG_TAIL_LINES:]

    def _failure_message(self, code: int) -> str:
        lines = self._output + ([self._partial_line] if self._partial_line else [])
        errors = [line[len("error "):] for line in lines if line.startswith("error ")]
        if errors:
            return errors[-1]
        tail = "\n".join(lines[-10:])
        return f"the detection process stopped with exit code {code}" + (f":\n{tail}" if tail else "")

    def _load_result(self):
        from .detector import DetectionResult
        from .preprocessing import IntensityScale
        from .thresholds import ScanThreshold

        summary = json.loads((self._folder / "result.json").read_text(encoding="utf-8"))
        arrays = {name: np.load(self._folder / f"{name}.npy") for name in RESULT_ARRAYS}
        healthy = [np.load(self._folder / name) for name in summary.pop("healthy")]
        geometry = Geometry(**{k: tuple(v) for k, v in summary.pop("geometry").items()})
        settings = DetectionSettings.from_dict(summary.pop("settings"))
        scale = IntensityScale(**{k: tuple(v) for k, v in summary.pop("intensity_scale").items()})
        summary["calibrated_threshold"] = ScanThreshold.from_text(summary["calibrated_threshold"])
        return DetectionResult(intensity_scale=scale, healthy=healthy, geometry=geometry, settings=settings, **arrays, **summary)


def process_alive(pid: int) -> Callable[[], bool]:
    """A check of whether process ``pid`` still runs (made once, so a reused PID on Windows cannot fool it)."""
    if os.name == "nt":
        import ctypes

        synchronize, wait_object_0 = 0x00100000, 0
        kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
        handle = kernel32.OpenProcess(synchronize, False, pid)
        if not handle:
            return lambda: False
        return lambda: kernel32.WaitForSingleObject(handle, 0) != wait_object_0

    def alive() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    return alive


def stop_when_gone(pid: int, interval: float = PARENT_CHECK_SECONDS) -> None:
    """Ends this process (at once, from a watcher thread) when process ``pid`` has exited."""
    alive = process_alive(pid)

    def watch() -> None:
        while alive():
            time.sleep(interval)
        os._exit(EXIT_PARENT_GONE)

    threading.Thread(target=watch, name="diffusion-anomaly-parent-watch", daemon=True).start()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m DiffusionAnomalyLib.process_job FOLDER [--parent-pid PID]``: runs FOLDER/request.json into FOLDER."""
    parser = argparse.ArgumentParser(prog="python -m DiffusionAnomalyLib.process_job")
    parser.add_argument("folder", type=Path)
    parser.add_argument("--parent-pid", type=int, help="stop when this process has exited")
    args = parser.parse_args(argv)
    if args.parent_pid:
        stop_when_gone(args.parent_pid)
    folder = args.folder
    try:
        request = read_request(folder / "request.json")
        detector = cached_detector(request.model, request.settings.device)

        def report(done: int, total: int) -> None:
            print(f"progress {done} {total}", flush=True)

        result = detector.detect(request.channels, request.geometry, request.settings, brain_mask=request.brain_mask,
                                 axial_slices=request.axial_slices, progress=report)
        for name in RESULT_ARRAYS:
            np.save(folder / f"{name}.npy", getattr(result, name))
        healthy = []
        for index, channel in enumerate(result.healthy):
            healthy.append(f"healthy{index}.npy")
            np.save(folder / healthy[-1], channel)
        (folder / "result.json").write_text(json.dumps({
            "threshold": result.threshold,
            "calibrated_threshold": result.calibrated_threshold.to_text(),
            "intensity_scale": asdict(result.intensity_scale),
            "brain_source": result.brain_source,
            "bias_correction": result.bias_correction,
            "slices_processed": result.slices_processed,
            "slices_redrawn": result.slices_redrawn,
            "seconds": result.seconds,
            "bias_seconds": result.bias_seconds,
            "settings": result.settings.to_dict(),
            "geometry": asdict(result.geometry),
            "healthy": healthy,
        }), encoding="utf-8")
    except Exception as error:
        print(f"error {' '.join(str(error).split()) or type(error).__name__}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
