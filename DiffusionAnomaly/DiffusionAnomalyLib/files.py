"""Writing files so that a failure never leaves a partial result or destroys an existing file."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator, List, Tuple


@contextlib.contextmanager
def staged_files() -> Iterator[Callable[[Path, str], Path]]:
    """Stages new files beside their targets; they replace the targets together at the end.

    ``stage(target, suffix)`` returns a temporary path in the target's folder (ending in
    ``suffix``, so that writers that go by the extension pick the right format). When the
    block ends normally every temporary file is renamed onto its target; when it raises,
    the temporary files are removed and no target is touched.
    """
    staged: List[Tuple[Path, Path]] = []

    def stage(target: Path, suffix: str = "") -> Path:
        target = Path(target)
        handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=suffix)
        os.close(handle)
        staged.append((Path(temporary), target))
        return Path(temporary)

    try:
        yield stage
        umask = os.umask(0)
        os.umask(umask)
        for temporary, target in staged:
            os.chmod(temporary, 0o666 & ~umask)  # mkstemp makes files private; outputs are ordinary files
            os.replace(temporary, target)
    finally:
        for temporary, _ in staged:
            if temporary.exists():
                temporary.unlink()
