"""Can detection run in this Python, and what is missing? (standard library only: asked before anything is installed).

The Slicer module asks this before offering to install packages, so that a user of an
unsupported Slicer, or with a package another extension installed in a version that does
not fit, gets one clear message instead of a failing background process.
"""

from __future__ import annotations

import importlib.metadata
import platform
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

# MONAI 1.6 (the networks and schedulers) needs Python >= 3.10 and PyTorch >= 2.8.
MIN_PYTHON = (3, 10)
TORCH_REQUIREMENT = "torch>=2.8"
SUPPORTED_SLICER = "3D Slicer 5.10 or newer"


def keep_output_readable_on_any_terminal() -> None:
    """Escapes what the terminal's encoding cannot show (an ASCII or cp1252 locale) instead of crashing on it."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


def _requirement_class():
    try:
        from packaging.requirements import Requirement
    except ImportError:  # every pip carries its own copy
        from pip._vendor.packaging.requirements import Requirement  # type: ignore[no-redef]
    return Requirement


def read_requirements(path: Union[str, Path]) -> List[str]:
    """The requirement lines of a requirements.txt (comments and options left out)."""
    lines = [line.split("#", 1)[0].strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    return [line for line in lines if line and not line.startswith("-")]


def unmet_requirements(requirements: Sequence[str]) -> List[Tuple[str, Optional[str]]]:
    """The requirements this Python does not meet, each with the version found (``None``: not installed)."""
    requirement_class = _requirement_class()
    unmet = []
    for text in requirements:
        requirement = requirement_class(text)
        try:
            found: Optional[str] = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            found = None
        if found is None or not requirement.specifier.contains(found, prereleases=True):
            unmet.append((text, found))
    return unmet


def describe_unmet(unmet: Sequence[Tuple[str, Optional[str]]]) -> str:
    return "; ".join(f"{text} (not installed)" if found is None else f"{text} (found {found})" for text, found in unmet)


def runtime_problem(python_version: Tuple[int, int] = sys.version_info[:2], system: str = platform.system(),
                    machine: str = platform.machine()) -> Optional[str]:
    """Why detection cannot run in this Python at all, or ``None``."""
    if tuple(python_version) < MIN_PYTHON:
        return (f"Diffusion Anomaly needs {SUPPORTED_SLICER} (Python {MIN_PYTHON[0]}.{MIN_PYTHON[1]} or newer); this one has "
                f"Python {python_version[0]}.{python_version[1]}, for which MONAI 1.6 and PyTorch 2.8 do not exist. Install a newer Slicer.")
    if system == "Darwin" and machine == "x86_64":
        return ("Diffusion Anomaly needs PyTorch 2.8 or newer, which has no build for Intel Macs (the last one is PyTorch 2.2). "
                "Use a Mac with Apple silicon, Linux or Windows, or the diffusion-anomaly-web server on another machine.")
    return None
