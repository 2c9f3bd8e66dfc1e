"""End to end on small generated studies: train both networks, detect, evaluate, benchmark, torchrun."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import SimpleITK as sitk

from DiffusionAnomalyLib.bundle import load_bundle
from DiffusionAnomalyLib.cli import main
from DiffusionAnomalyLib.data import SliceDataset, find_brats_subjects, read_subject_csv

from conftest import brain_phantom, tiny_card, write_brats_study

TINY_NETWORK = ["--widths", "8,16", "--attention-levels", "0,1", "--head-channels", "8", "--norm-groups", "8"]
FAST_TRAINING = ["--max-steps", "4", "--batch-size", "8", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """Six subjects in the BraTS layout: two healthy, four with a lesion in different places."""
    root = tmp_path_factory.mktemp("cohort")
    centres = [None, None, (5, 8, 8), (7, 12, 10), (4, 10, 6), (8, 7, 11)]
    for number, centre in enumerate(centres):
        arrays, lesion = brain_phantom(shape=(12, 20, 18), lesion_centre=centre, seed=number)
        write_brats_study(root, f"case{number:02d}", arrays, lesion)
    return root


def test_brats_folder_and_csv_give_the_same_subjects_and_slice_labels(cohort, tmp_path):
    subjects = find_brats_subjects(cohort, ["T1", "FLAIR"])
    assert [s.name for s in subjects] == [f"case{i:02d}" for i in range(6)]
    assert all(s.mask is not None and s.channels[1].name.endswith("_flair.nii.gz") for s in subjects)

    table = tmp_path / "subjects.csv"
    with open(table, "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(["subject", "T1", "FLAIR", "mask"])
        for s in subjects:
            writer.writerow([s.name, s.channels[0], s.channels[1], s.mask])
    names, listed = read_subject_csv(table)
    assert names == ["T1", "FLAIR"] and [s.channels for s in listed] == [s.channels for s in subjects]

    dataset = SliceDataset.from_subjects(subjects, tiny_card(), min_foreground_fraction=0.0)
    lesion_slices = sum(int((sitk.GetArrayFromImage(sitk.ReadImage(str(s.mask))) > 0).any(axis=(1, 2)).sum()) for s in subjects)
    assert int(dataset.labels.sum()) == lesion_slices
    assert dataset.images.shape[1:] == (2, 16, 16)


def test_train_detect_evaluate(cohort, tmp_path, capsys):
    model = tmp_path / "model"
    common = ["--data", str(cohort), "--out", str(model), *FAST_TRAINING, *TINY_NETWORK]
    assert main(["train-diffusion", *common, "--channels", "T1,FLAIR", "--image-size", "16", "--name", "tiny"]) == 0
    assert load_bundle(model).classifier is None
    assert main(["train-classifier", *common]) == 0
    bundle = load_bundle(model)
    assert bundle.classifier is not None
    assert bundle.card.training["diffusion"]["steps"] == 4 and bundle.card.training["classifier"]["diseased_slices"] > 0

    study = cohort / "case02"
    outputs = {name: tmp_path / f"{name}.nii.gz" for name in ("map", "mask", "healthy")}
    code = main(
        ["detect", str(study / "case02_t1.nii.gz"), str(study / "case02_flair.nii.gz"), "--model", str(model),
         "--output-map", str(outputs["map"]), "--output-mask", str(outputs["mask"]), "--output-healthy", str(outputs["healthy"]),
         "--steps", "4", "--noise-level", "0.1", "--threshold", "otsu"]
    )
    assert code == 0
    assert "done in" in capsys.readouterr().out
    reference = sitk.ReadImage(str(study / "case02_flair.nii.gz"))
    for path in (outputs["map"], outputs["mask"], tmp_path / "healthy_T1.nii.gz", tmp_path / "healthy_FLAIR.nii.gz"):
        written = sitk.ReadImage(str(path))
        assert written.GetSize() == reference.GetSize() and written.GetDirection() == reference.GetDirection()
        assert written.GetOrigin() == reference.GetOrigin() and written.GetSpacing() == reference.GetSpacing()

    report_path = tmp_path / "report.json"
    assert main(["evaluate", "--model", str(model), "--data", str(cohort), "--json", str(report_path), "--steps", "4", "--noise-level", "0.1"]) == 0
    printed = capsys.readouterr().out
    assert "pooled" in printed and "slice-level classifier AUROC" in printed
    report = json.loads(report_path.read_text(encoding="utf-8"))
    assert report["counts"] == {"subjects": 6, "healthy_subjects": 2, "slices": report["counts"]["slices"], "diseased_slices": report["counts"]["diseased_slices"]}
    for key in ("dice", "auroc", "auprc", "slice_auroc"):
        assert 0.0 <= report["pooled"][key] <= 1.0
    assert report["subjects"][0]["dice"] is None and report["subjects"][0]["healthy_slice_fp_percent"] >= 0

    # A quick sweep: every second slice, more thresholds scored from the same maps.
    assert main(["evaluate", "--model", str(model), "--data", str(cohort), "--json", str(report_path), "--steps", "4",
                 "--noise-level", "0.1", "--slice-step", "2", "--also-thresholds", "calibrated,otsu,0.05,1000", "--record", "quick"]) == 0
    sweep = json.loads(report_path.read_text(encoding="utf-8"))
    assert sweep["settings"]["slice_step"] == 2
    assert sum(row["lesion_voxels"] for row in sweep["subjects"]) < sum(row["lesion_voxels"] for row in report["subjects"])
    assert sweep["thresholds"]["calibrated"]["pooled_dice"] == pytest.approx(sweep["pooled"]["dice"]), "the default threshold is the calibrated one"
    assert sweep["thresholds"]["1000.0"]["healthy_subjects_fp_percent"] == 0.0
    assert load_bundle(model).card.metrics["quick"]["settings"]["slice_step"] == 2

    # The calibrated threshold's constants, chosen on labelled data and kept in the card.
    capsys.readouterr()
    assert main(["calibrate", "--model", str(model), "--data", str(cohort), "--steps", "4", "--noise-level", "0.1", "--slice-step", "2"]) == 0
    printed = capsys.readouterr().out
    card = load_bundle(model).card
    recorded = card.metrics["calibration"]
    assert (recorded["subjects"], recorded["healthy_subjects"]) == (6, 2)
    chosen = card.calibration
    assert (recorded["chosen"]["noise_floor_mads"], recorded["chosen"]["slice_floor_mads"], recorded["chosen"]["peak_fraction"]) \
        == (chosen.noise_floor_mads, chosen.slice_floor_mads, chosen.peak_fraction)
    assert recorded["chosen"]["healthy_fp_percent"] <= 0.25 and f"noise floor {card.calibration.noise_floor_mads:g} MADs" in printed

    assert main(["set-defaults", str(model), "--steps", "4", "--threshold", "0.3", "--description", "tiny test model"]) == 0
    card = load_bundle(model).card
    assert (card.defaults.steps, card.defaults.threshold, card.description) == (4, 0.3, "tiny test model")
    capsys.readouterr()

    assert main(["info", str(model)]) == 0
    assert json.loads(capsys.readouterr().out)["channels"] == ["T1", "FLAIR"]


def test_training_resumes_from_its_checkpoint(cohort, tmp_path):
    model = tmp_path / "model"
    args = ["train-diffusion", "--data", str(cohort), "--out", str(model), "--channels", "T1,FLAIR", "--image-size", "16", *TINY_NETWORK,
            "--batch-size", "8", "--no-progress", "--device", "cpu", "--checkpoint-every", "2"]
    assert main([*args, "--max-steps", "2"]) == 0
    assert (tmp_path / "model-checkpoints" / "diffusion" / "checkpoint.pt").is_file()
    assert main([*args, "--max-steps", "3", "--resume"]) == 0
    record = load_bundle(model).card.training["diffusion"]
    assert record["steps"] == 3 and record["steps_this_run"] == 1
    # A run limited in time stops early, checkpointed and unfinished; the next one goes on.
    assert main([*args, "--max-steps", "1000", "--resume", "--max-minutes", "0.0001"]) == 0
    record = load_bundle(model).card.training["diffusion"]
    assert record["steps"] == 4 and not record["finished"] and record["wall_seconds_total"] >= record["wall_seconds_this_run"]


def test_classifier_needs_an_existing_diffusion_model(cohort, tmp_path, capsys):
    assert main(["train-classifier", "--data", str(cohort), "--out", str(tmp_path / "none"), *FAST_TRAINING, *TINY_NETWORK]) == 2
    assert "run train-diffusion" in capsys.readouterr().err


def test_benchmark_prints_both_settings(tiny_bundle, capsys):
    from DiffusionAnomalyLib.benchmark import format_benchmark, run_benchmark
    from DiffusionAnomalyLib.detector import AnomalyDetector
    from DiffusionAnomalyLib.imageio import Geometry

    detector = AnomalyDetector.from_bundle(tiny_bundle, device="cpu")
    arrays, _ = brain_phantom(shape=(8, 20, 18))
    report = run_benchmark(detector, arrays, Geometry(), paper_slices=1)
    assert report["paper"]["steps"] == 500 and report["paper"]["slices"] == 1
    assert report["default"]["slices"] == report["slices_with_foreground"]
    assert report["speedup_per_volume"] > 1
    assert "speed-up per volume" in format_benchmark(report)
    assert report["default"]["bias_correction_seconds"] == 0 and "bias correction" not in format_benchmark(report)
    # With bias correction in the defaults, the volume's time says how much of it the CPU-side N4 fit took.
    detector.card.defaults = detector.card.defaults.replace(bias_correction="n4")
    corrected = run_benchmark(detector, brain_phantom(shape=(12, 24, 24), seed=1)[0], Geometry(), paper_slices=1)
    assert 0 < corrected["default"]["bias_correction_seconds"] < corrected["default"]["seconds"]
    assert "s of it bias correction" in format_benchmark(corrected)


def test_torchrun_with_two_cpu_processes_trains_a_model(cohort, tmp_path):
    model = tmp_path / "ddp-model"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "DiffusionAnomalyLib.cli", "train-diffusion", "--data", str(cohort), "--out", str(model),
        "--channels", "T1,FLAIR", "--image-size", "16", *TINY_NETWORK, *FAST_TRAINING,
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment)
    assert finished.returncode == 0, finished.stderr[-3000:]
    record = load_bundle(model).card.training["diffusion"]
    assert record["processes"] == 2 and record["steps"] == 4
