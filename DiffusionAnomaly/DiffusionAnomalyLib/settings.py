"""Detection settings: the one typed description of *how* to detect, from every front end to the detector.

The CLI, the Slicer panel, the web page and scripts fill a :class:`DetectionSettings`
(``None`` = "the model's default"); :meth:`DetectionSettings.resolve` fills the gaps from the
model card once and range-checks every value, so a nonsense value is refused where it
enters, with the allowed range in the message, before any work starts. The model card
stores its measured defaults as a fully resolved instance of the same class.

This module imports only the standard library: a front end can read and check settings
before PyTorch is installed.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple, Union

if TYPE_CHECKING:
    from .config import ModelCard

Threshold = Union[str, float]
# "calibrated": chosen on each scan from the map of its own healthy-looking brain (see
# thresholds.calibrated_threshold), so that it means the same on every scanner; "otsu":
# Otsu's split of the map (the paper's); a number: a fixed map value.
CALIBRATED, OTSU = "calibrated", "otsu"
THRESHOLD_MODES = (CALIBRATED, OTSU)
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# "auto": extract the brain unless the scan is skull-stripped already; "extract": always;
# "none": the scan is skull-stripped (its non-zero voxels are the brain).
BRAIN_MASK_MODES = ("auto", "extract", "none")
GUIDANCE_SCHEDULES = ("constant", "linear")
# "n4": divide out each sequence's bias field (coil shading) fitted inside the brain; "none": as given.
BIAS_CORRECTIONS = ("none", "n4")
# What the healthy translation is compared with. "input": the scan itself, |x − x̂| (the
# paper's map). "reconstruction": the same encoding decoded without guidance, |x̃ − x̂|: what
# the network cannot reproduce of an unfamiliar anatomy is in both and cancels, what guidance
# removed stays; it costs one more decoding.
MAP_REFERENCES = ("input", "reconstruction")

# Inclusive ranges of the numeric settings. Fewer than MIN_STEPS DDIM evaluations cannot
# invert the encoding: the map then shows the reconstruction error of the whole brain.
MIN_STEPS = 4
RANGES: Dict[str, Tuple[float, float]] = {
    "noise_level": (0.01, 1.0),
    "guidance_scale": (0.0, 1000.0),
    "steps": (MIN_STEPS, 1000),
    "min_component_voxels": (0, 10_000_000),
    "map_smoothing": (0.0, 10.0),
    "batch_size": (1, 4096),
    "map_levels": (1, 8),
    "redraw_noise_level": (0.0, 1.0),
}
INTEGER_SETTINGS = ("steps", "min_component_voxels", "batch_size", "map_levels")
LABELS = {
    "noise_level": "noise level",
    "guidance_scale": "guidance scale",
    "steps": "steps",
    "threshold": "threshold",
    "min_component_voxels": "minimum component size (voxels)",
    "map_smoothing": "map smoothing",
    "batch_size": "batch size",
    "precision": "precision",
    "device": "device",
    "brain_mask": "brain mask",
    "map_levels": "noise levels averaged",
    "guidance_schedule": "guidance schedule",
    "bias_correction": "bias correction",
    "redraw_noise_level": "redraw noise level",
    "map_reference": "map reference",
}


# How a panel offers the threshold: one of THRESHOLD_MODES, or "fixed" with a slider's value.
FIXED = "fixed"
PANEL_THRESHOLD_MODES = THRESHOLD_MODES + (FIXED,)
THRESHOLD_MEANINGS = {
    CALIBRATED: ("calibrated on this scan: above the top 0.5 % and the noise floor of its healthy-looking brain (and of each slice where the "
                 "model uses slice floors); where the model says so, each region keeps only what exceeds a share of its own peak"),
    OTSU: "Otsu's split of this map into two classes (it flags part of any brain, healthy ones too)",
    FIXED: "a fixed map value: the sum over sequences of the difference to the healthy translation (0 to 1 each)",
}


def threshold_from_panel(mode: str, value: float) -> Threshold:
    """A panel's threshold choice (mode and the fixed-value slider) as a setting."""
    if mode not in PANEL_THRESHOLD_MODES:
        raise ValueError(f"threshold mode must be one of {', '.join(PANEL_THRESHOLD_MODES)}, got {mode!r}")
    return value if mode == FIXED else mode


def panel_threshold_mode(threshold: Threshold) -> str:
    return threshold if isinstance(threshold, str) else FIXED


def parse_threshold(text: str) -> Threshold:
    """``"otsu"`` (any case) or a number, from a command line or a text field."""
    cleaned = str(text).strip().lower()
    if cleaned in THRESHOLD_MODES:
        return cleaned
    try:
        return float(cleaned)
    except ValueError:
        raise ValueError(f"threshold must be {' or '.join(repr(m) for m in THRESHOLD_MODES)} or a number, got {text!r}") from None


def number_from_text(name: str, text: Any) -> Union[int, float]:
    """A numeric setting typed into a field, with a message for an empty or non-numeric entry."""
    low, high = RANGES[name]
    kind = "a whole number" if name in INTEGER_SETTINGS else "a number"
    cleaned = "" if text is None else str(text).strip()
    if not cleaned:
        raise ValueError(f"{LABELS[name]} is empty: enter {kind} from {low:g} to {high:g}")
    try:
        value = float(cleaned)
    except ValueError:
        raise ValueError(f"{LABELS[name]} must be {kind} from {low:g} to {high:g}, got {cleaned!r}") from None
    return int(value) if name in INTEGER_SETTINGS and value.is_integer() else value


def _number(name: str, value: Any, integer: bool) -> Union[int, float]:
    """A finite number (an integer where one is needed), with a message naming the setting."""
    label = LABELS[name]
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{label} must be a number, got {value!r}")
    if not math.isfinite(float(value)):
        raise ValueError(f"{label} must be a finite number, got {value!r}")
    if integer:
        if float(value) != int(value):
            raise ValueError(f"{label} must be a whole number, got {value!r}")
        return int(value)
    return float(value)


def _in_range(name: str, value: Union[int, float]) -> None:
    low, high = RANGES[name]
    if not low <= value <= high:
        kind = "a whole number" if name in INTEGER_SETTINGS else "a number"
        raise ValueError(f"{LABELS[name]} must be {kind} from {low:g} to {high:g}, got {value:g}")


@dataclass(frozen=True)
class DetectionSettings:
    """How to translate, map and segment one study; ``None`` means the model card's default.

    Args:
        noise_level: encoding depth L as a fraction of the training steps.
        guidance_scale: s, how hard the classifier pulls toward healthy (0: plain reconstruction).
        steps: DDIM network evaluations per direction.
        threshold: ``"otsu"`` or a value of the anomaly map, which lies in [0, number of channels].
        min_component_voxels: segmented components smaller than this are removed.
        map_smoothing: Gaussian σ in model pixels applied to the map before thresholding.
        batch_size: slices per network pass.
        precision: autocast of the network passes: ``auto``, ``fp32``, ``bf16`` or ``fp16``.
        device: ``auto`` (the GPU when there is one), ``cpu`` or ``cuda``.
        brain_mask: how the brain is found: ``auto``, ``extract`` or ``none`` (see BRAIN_MASK_MODES);
            a mask of the user's is given with the images instead.
        map_levels: the map is averaged over this many noise levels, L/n, 2L/n, ..., L (1: L only).
        guidance_schedule: ``constant`` (the paper's s) or ``linear`` (s · t / L).
        bias_correction: ``n4`` divides out each sequence's bias field before detection
            (see :mod:`.bias`); ``none`` uses the intensities as given.
        redraw_noise_level: 0, or a second, deeper translation of what the first one segments
            (its regions of at least ``detector.REDRAW_MIN_AREA_MM2`` in their axial slice, with a margin), encoded to this noise level and redrawn in the context of the
            rest of the image (see :func:`.translation.translate`), with the first pass's DDIM stride;
            a level not deeper than ``noise_level`` is not used.
        map_reference: ``input`` (the map is |x − x̂|, the paper's) or ``reconstruction``
            (|x̃ − x̂|, x̃ the unguided decoding of the same encoding; see MAP_REFERENCES). The
            healthy image returned is x − (x̃ − x̂) then, so the map is always its difference to the input.
    """

    noise_level: Optional[float] = None
    guidance_scale: Optional[float] = None
    steps: Optional[int] = None
    threshold: Optional[Threshold] = None
    min_component_voxels: Optional[int] = None
    map_smoothing: Optional[float] = None
    batch_size: Optional[int] = None
    precision: str = "auto"
    device: str = "auto"
    brain_mask: Optional[str] = None
    map_levels: Optional[int] = None
    guidance_schedule: Optional[str] = None
    bias_correction: Optional[str] = None
    redraw_noise_level: Optional[float] = None
    map_reference: Optional[str] = None

    def replace(self, **changes: Any) -> "DetectionSettings":
        return dataclasses.replace(self, **changes)

    def resolve(self, card: "ModelCard") -> "DetectionSettings":
        """Every ``None`` taken from the card's defaults, then each value range-checked.

        The card's channel count bounds a fixed threshold. Resolving twice changes nothing.
        Raises ``ValueError`` naming the first bad setting and its allowed range.
        """
        defaults = card.defaults
        filled = {
            f.name: getattr(defaults, f.name) if getattr(self, f.name) is None else getattr(self, f.name)
            for f in dataclasses.fields(self)
        }
        missing = [name for name, value in filled.items() if value is None]
        if missing:
            raise ValueError(f"no value and no default for {', '.join(LABELS[m] for m in missing)}")
        checked: Dict[str, Any] = {}
        for name in RANGES:
            checked[name] = _number(name, filled[name], name in INTEGER_SETTINGS)
            _in_range(name, checked[name])
        checked["threshold"] = _checked_threshold(filled["threshold"], len(card.channels))
        for name, allowed in (("precision", PRECISIONS), ("device", DEVICES), ("brain_mask", BRAIN_MASK_MODES),
                              ("guidance_schedule", GUIDANCE_SCHEDULES), ("bias_correction", BIAS_CORRECTIONS),
                              ("map_reference", MAP_REFERENCES)):
            if filled[name] not in allowed:
                raise ValueError(f"{LABELS[name]} must be one of {', '.join(allowed)}, got {filled[name]!r}")
            checked[name] = filled[name]
        return DetectionSettings(**checked)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "DetectionSettings":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown detection setting(s) {unknown}; known: {', '.join(sorted(names))}")
        return cls(**data)


def _checked_threshold(value: Any, channels: int) -> Threshold:
    if isinstance(value, str):
        value = parse_threshold(value)
        if isinstance(value, str):
            return value
    number = _number("threshold", value, integer=False)
    # The map is Σ over channels of |x − x̂| / 2 with x, x̂ in [−1, 1]: at most 1 per channel.
    if not 0.0 < number <= channels:
        raise ValueError(
            f"threshold must be {' or '.join(repr(m) for m in THRESHOLD_MODES)} or a map value above 0 and at most "
            f"{channels:g} (this model's {channels} channel(s)), got {number:g}"
        )
    return number


CARD_DEFAULTS = DetectionSettings(
    noise_level=0.5, guidance_scale=10.0, steps=25, threshold=CALIBRATED, min_component_voxels=0, map_smoothing=0.0, batch_size=32,
    brain_mask="auto", map_levels=1, guidance_schedule="constant", bias_correction="none", redraw_noise_level=0.0,
    map_reference="input",
)
