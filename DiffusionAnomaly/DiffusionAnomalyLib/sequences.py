"""Which MRI sequence a volume is, from its name, and which model fits the sequences a study has.

Standard library only: the Slicer panel asks this before PyTorch is installed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

# How file, volume and series names usually spell each sequence (BraTS 2023 names too),
# tried in this order so that "t1ce" is not taken for "t1" nor "t2-flair" for "t2".
SEQUENCE_PATTERNS = {
    "FLAIR": r"flair|t2f(?![a-z])",
    "T1ce": r"t1[-_ ]?(ce|c|gd|post|contrast)|ce[-_ ]?t1|t1[-_ ]?\+?c\b|mprage[-_ ]?(gd|post)|post[-_ ]?(gd|contrast)",
    "T1": r"t1(?![-_ ]?(ce|c\b|gd|post|contrast|\+))|t1n(?![a-z])|mprage",
    "T2": r"t2(?![-_ ]?flair|f(?![a-z]))|t2w",
}


def guess_sequence(name: str) -> Optional[str]:
    """The sequence a name says (``FLAIR``, ``T1ce``, ``T1``, ``T2``), or ``None``."""
    lowered = name.lower()
    return next((sequence for sequence, pattern in SEQUENCE_PATTERNS.items() if re.search(pattern, lowered)), None)


def sequence_pattern(channel: str) -> str:
    """The name pattern of a model channel (its own name, literally, for channels not listed above)."""
    known = {name.lower(): pattern for name, pattern in SEQUENCE_PATTERNS.items()}
    return known.get(channel.lower(), re.escape(channel.lower()))


def volume_label(path: Path) -> str:
    """A file's name without its image extension (a folder's name as it is)."""
    name = Path(path).name
    return re.sub(r"(\.nii\.gz|\.nii|\.nrrd|\.nhdr|\.mha|\.mhd)$", "", name, flags=re.IGNORECASE)


def choose_model(sequences: Sequence[Optional[str]], models: Dict[str, Tuple[str, ...]]) -> Tuple[str, List[int]]:
    """The model whose channels the study has, the one with most channels (then its name's order).

    Args:
        sequences: the study's volumes' sequences (``None`` where unknown), in the order given.
        models: model name → its channel names.

    Returns the model's name and, for each of its channels, the index of the volume to use.
    Raises ``ValueError`` naming the sequences found and what each model needs.
    """
    have = {str(s).lower(): index for index, s in reversed(list(enumerate(sequences))) if s}
    fitting = [(name, channels) for name, channels in models.items() if all(c.lower() in have for c in channels)]
    if not fitting:
        needs = "; ".join(f"{name}: {', '.join(channels)}" for name, channels in models.items())
        found = ", ".join(s for s in sequences if s) or "none recognised from the names"
        raise ValueError(f"no model fits the sequences given ({found}); the models need {needs}. "
                         "Name the sequences (e.g. --sequences FLAIR) or choose a model")
    name, channels = max(fitting, key=lambda item: (len(item[1]), -list(models).index(item[0])))
    return name, [have[c.lower()] for c in channels]
