"""Typed configuration of a model bundle: networks, noise schedule, preprocessing, defaults.

Everything here round-trips through the bundle's JSON card (``to_dict`` / ``from_dict``),
so a card is the single description of how a model was built and how it must be used.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Type, TypeVar

from .settings import CARD_DEFAULTS, DetectionSettings

T = TypeVar("T")

# BraTS regions that count as "the lesion", by label (2021: 1 necrosis, 2 oedema, 4 enhancing;
# 2023: 3 enhancing); ``None``: every label. A post-contrast T1 shows the core, not the oedema.
LESION_REGIONS: Dict[str, Optional[Tuple[int, ...]]] = {"whole": None, "core": (1, 3, 4), "enhancing": (3, 4)}


def check_lesion_region(region: str) -> None:
    if region not in LESION_REGIONS:
        raise ValueError(f"unknown lesion region '{region}': use one of {', '.join(LESION_REGIONS)}")


def _from_dict(cls: Type[T], data: Dict[str, Any], where: str) -> T:
    """Builds a dataclass from a dict, naming unknown keys instead of failing obscurely."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown field(s) {unknown} in '{where}' of the model card")
    kwargs = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in data:
            value = data[f.name]
            kwargs[f.name] = tuple(value) if isinstance(value, list) else value
    return cls(**kwargs)  # type: ignore[call-arg]


@dataclass
class NetworkConfig:
    """Widths of a MONAI diffusion UNet or of its encoder half used as a classifier.

    Args:
        channels: feature channels per resolution level.
        attention_levels: whether each level has a self-attention block.
        num_res_blocks: residual blocks per level.
        num_head_channels: channels per attention head.
        norm_num_groups: GroupNorm groups; must divide every entry of ``channels``.
    """

    channels: Tuple[int, ...] = (32, 64, 64)
    attention_levels: Tuple[bool, ...] = (False, False, True)
    num_res_blocks: int = 1
    num_head_channels: int = 32
    norm_num_groups: int = 32

    def validate(self, name: str) -> None:
        if len(self.channels) != len(self.attention_levels):
            raise ValueError(f"{name}: 'channels' and 'attention_levels' must have the same length")
        bad = [c for c in self.channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"{name}: channels {bad} are not divisible by norm_num_groups={self.norm_num_groups}")


@dataclass
class ScheduleConfig:
    """The forward-noising schedule the networks were trained with (DDPM linear beta)."""

    num_train_timesteps: int = 1000
    beta_schedule: str = "linear_beta"
    beta_start: float = 1e-4
    beta_end: float = 0.02


@dataclass
class NormalisationConfig:
    """How a volume's intensities are mapped to the network range [-1, 1].

    Each channel is scaled over the *whole volume's* foreground (never per slice, so a
    tumour cannot change the intensity scale of its slice): the ``lower_percentile`` maps
    to 0 and the ``upper_percentile`` to 1, values are clipped to [0, ``clip_max``],
    then mapped to [-1, 1] by ``2 * v - 1``. Voxels outside the foreground become -1.

    Args:
        foreground: ``"nonzero"`` (skull-stripped data: any channel non-zero) or
            ``"otsu"`` (Otsu threshold of the first channel, for data with a noisy background).
    """

    foreground: str = "nonzero"
    lower_percentile: float = 0.5
    upper_percentile: float = 99.5
    clip_max: float = 1.0

    def validate(self) -> None:
        if self.foreground not in ("nonzero", "otsu"):
            raise ValueError(f"normalisation foreground must be 'nonzero' or 'otsu', got {self.foreground!r}")
        if not 0 <= self.lower_percentile < self.upper_percentile <= 100:
            raise ValueError(f"normalisation percentiles must satisfy 0 <= lower < upper <= 100, got {self.lower_percentile} and {self.upper_percentile}")
        if not 1.0 <= self.clip_max <= 10.0:
            raise ValueError(f"clip_max must be between 1 (the upper percentile) and 10, got {self.clip_max}")


@dataclass
class CalibrationConfig:
    """A model's constants for the calibrated threshold (see :mod:`.thresholds`).

    Args:
        quantile: share of the healthy-looking brain left below the threshold.
        noise_floor_mads: width of the scan-wide noise floor, in robust standard deviations.
        slice_floor_mads: width of each axial slice's own noise floor; ``None``: not used.
        peak_fraction: each region above the floor, in its axial slice, keeps only what exceeds
            this share of its own peak; ``None``: the floor alone.
    """

    quantile: float = 0.995
    noise_floor_mads: float = 6.5
    slice_floor_mads: Optional[float] = None
    peak_fraction: Optional[float] = None

    def validate(self) -> None:
        if not 0.5 <= self.quantile < 1:
            raise ValueError(f"calibration quantile must be in [0.5, 1), got {self.quantile}")
        for name in ("noise_floor_mads", "slice_floor_mads"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 50:
                raise ValueError(f"calibration {name} must be between 0 and 50, got {value}")
        if self.peak_fraction is not None and not 0 < self.peak_fraction < 1:
            raise ValueError(f"calibration peak_fraction must be between 0 and 1, got {self.peak_fraction}")


@dataclass
class ModelCard:
    """Everything needed to rebuild and correctly use a pair of networks.

    Args:
        channels: channel (sequence) names in the order the networks expect them.
        image_size: (height, width) of the 2D slices the networks were trained on.
        unet: noise predictor widths.
        classifier: time-conditioned classifier widths, or ``None`` if not trained yet.
        class_conditional: the noise predictor was trained on both classes with a class
            embedding (then decoding conditions it on the healthy class).
        healthy_class: label index of "healthy" in the classifier output.
        lesion_region: the part of a lesion mask (``LESION_REGIONS``) that makes a training slice
            diseased, and what evaluation scores by default: ``core`` for a sequence that shows the
            tumour core but not the oedema around it.
        calibration: the constants of the calibrated threshold, chosen on the model's validation data.
    """

    channels: Tuple[str, ...] = ("FLAIR",)
    image_size: Tuple[int, int] = (64, 64)
    unet: NetworkConfig = field(default_factory=NetworkConfig)
    classifier: Optional[NetworkConfig] = None
    class_conditional: bool = False
    healthy_class: int = 0
    lesion_region: str = "whole"
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    normalisation: NormalisationConfig = field(default_factory=NormalisationConfig)
    defaults: DetectionSettings = CARD_DEFAULTS
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    name: str = "unnamed"
    description: str = ""
    training: Dict[str, Any] = field(default_factory=dict)
    metrics: Dict[str, Any] = field(default_factory=dict)

    _NESTED = {
        "unet": NetworkConfig,
        "classifier": NetworkConfig,
        "schedule": ScheduleConfig,
        "normalisation": NormalisationConfig,
        "defaults": DetectionSettings,
        "calibration": CalibrationConfig,
    }

    def validate(self) -> None:
        if not self.channels:
            raise ValueError("the model card names no channels")
        if len(self.image_size) != 2 or min(self.image_size) < 8:
            raise ValueError(f"image_size must be two sizes >= 8, got {self.image_size}")
        self.unet.validate("unet")
        self.normalisation.validate()
        if self.classifier is not None:
            self.classifier.validate("classifier")
        if self.healthy_class not in (0, 1):
            raise ValueError("healthy_class must be 0 or 1")
        check_lesion_region(self.lesion_region)
        self.calibration.validate()
        if self.defaults.resolve(self) != self.defaults:
            raise ValueError("the default settings must be complete, checked values (see DetectionSettings.resolve)")

    def summary(self) -> List[str]:
        """A few lines for a model picker: name, channels, and the recorded test scores."""
        lines = [f"{self.name}: {self.description}" if self.description else self.name,
                 f"Channels: {', '.join(self.channels)}; slices at {self.image_size[0]}x{self.image_size[1]}."]
        if self.lesion_region != "whole":
            lines.append(f"Trained to flag the tumour {self.lesion_region} (BraTS labels {', '.join(map(str, LESION_REGIONS[self.lesion_region]))}), "
                         "not the oedema around it.")
        recorded = [(name, entry["pooled"]) for name, entry in self.metrics.items() if isinstance(entry, dict) and isinstance(entry.get("pooled"), dict)]
        if recorded:
            name, pooled = next(((n, p) for n, p in recorded if n == "test_default"), recorded[0])
            scores = [f"{label} {pooled[key]:.2f}" for key, label in (("dice", "Dice"), ("auroc", "AUROC"), ("auprc", "AUPRC")) if isinstance(pooled.get(key), (int, float))]
            if scores:
                lines.append(f"Scores ({name}): {', '.join(scores)}.")
        return lines

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "ModelCard":
        data = dict(data)
        if isinstance(data.get("defaults"), dict):
            # Settings added after a card was written take the product's defaults.
            data["defaults"] = {**{k: v for k, v in CARD_DEFAULTS.to_dict().items() if k not in data["defaults"]}, **data["defaults"]}
        for key, sub_cls in cls._NESTED.items():
            if data.get(key) is not None:
                data[key] = _from_dict(sub_cls, data[key], key)
        card = _from_dict(cls, data, "card")
        card.image_size = tuple(int(s) for s in card.image_size)  # type: ignore[assignment]
        card.validate()
        return card
