"""Training that starts from a bundle (--init-from), on a part of the lesion (--lesion-region) and
with a higher intensity ceiling (--clip-max), as the bundled single-sequence and class-conditional
models were made."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from DiffusionAnomalyLib.bundle import load_bundle
from DiffusionAnomalyLib.cards import update_card
from DiffusionAnomalyLib.cli import main
from DiffusionAnomalyLib.config import CalibrationConfig
from DiffusionAnomalyLib.data import DISEASED, HEALTHY, SliceDataset, find_brats_subjects

from conftest import brain_phantom, tiny_card, write_image

TINY_NETWORK = ["--widths", "8,16", "--attention-levels", "0,1", "--head-channels", "8", "--norm-groups", "8"]
QUIET = ["--batch-size", "8", "--no-progress", "--device", "cpu"]
NECROSIS, OEDEMA = 1, 2
CORE_SLICES, OEDEMA_SLICES = range(4, 7), range(2, 9)


@pytest.fixture(scope="module")
def tumours(tmp_path_factory) -> Path:
    """Four subjects in the BraTS layout; two have a tumour whose core (label 1) lies in axial
    slices 4-6 and whose oedema (label 2) reaches slices 2-8."""
    root = tmp_path_factory.mktemp("tumours")
    for number in range(4):
        arrays, _ = brain_phantom(shape=(12, 20, 18), seed=number)
        labels = np.zeros(arrays.shape[1:], dtype=np.uint8)
        if number >= 2:
            labels[OEDEMA_SLICES.start:OEDEMA_SLICES.stop, 8:12, 7:11] = OEDEMA
            labels[CORE_SLICES.start:CORE_SLICES.stop, 9:11, 8:10] = NECROSIS
            arrays[:, labels > 0] += 60.0
        folder = root / f"case{number}"
        folder.mkdir()
        for suffix, array in zip(("t1", "flair"), arrays):
            write_image(array, folder / f"case{number}_{suffix}.nii.gz")
        write_image(labels, folder / f"case{number}_seg.nii.gz")
    return root


@pytest.fixture(scope="module")
def healthy_only_model(tumours, tmp_path_factory) -> Path:
    """A tiny four-step model trained on healthy slices, with a classifier and its own calibration."""
    model = tmp_path_factory.mktemp("start") / "model"
    common = ["--data", str(tumours), "--out", str(model), "--max-steps", "4", *QUIET, *TINY_NETWORK]
    assert main(["train-diffusion", *common, "--channels", "T1,FLAIR", "--image-size", "16", "--name", "start"]) == 0
    assert main(["train-classifier", *common]) == 0
    card = load_bundle(model).card
    card.calibration = CalibrationConfig(noise_floor_mads=7.0, slice_floor_mads=3.0)
    update_card(model, card)
    return model


def _noise_predictions(unet: torch.nn.Module, class_label) -> torch.Tensor:
    x = torch.randn(3, 2, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([5, 200, 900])
    labels = None if class_label is None else torch.full_like(t, class_label)
    with torch.no_grad():
        return unet(x, timesteps=t, class_labels=labels)


def test_training_on_all_slices_starts_exactly_where_the_healthy_model_was(tumours, healthy_only_model, tmp_path, capsys):
    tuned = tmp_path / "tuned"
    # A learning rate of 0 keeps the weights where they started: what the new network predicts is
    # then what it inherited, and a new class embedding must not change it for either class.
    command = ["train-diffusion", "--data", str(tumours), "--out", str(tuned), "--channels", "T1,FLAIR", "--train-on", "all",
               "--init-from", str(healthy_only_model), *QUIET, "--name", "tuned"]
    assert main([*command, "--max-steps", "1", "--lr", "0"]) == 0
    assert "run calibrate again" in capsys.readouterr().out
    start, result = load_bundle(healthy_only_model), load_bundle(tuned)
    assert result.card.class_conditional and not start.card.class_conditional
    expected = _noise_predictions(start.unet, None)
    for label in (HEALTHY, DISEASED):
        torch.testing.assert_close(_noise_predictions(result.unet, label), expected, rtol=0, atol=1e-5)

    # Classifier, defaults and calibration come along (they fit the same channels and slices).
    for name, value in start.classifier.state_dict().items():
        torch.testing.assert_close(result.classifier.state_dict()[name], value)
    assert result.card.calibration == start.card.calibration and result.card.defaults == start.card.defaults
    assert result.card.training["init_from"]["model"] == "start"
    assert result.card.training["init_from"]["diffusion"]["steps"] == 4
    assert result.card.training["diffusion"]["slices_used"] == "all, class-conditional"

    # Resumed from its checkpoint, the run goes on and still keeps the classifier it already has.
    assert main([*command, "--max-steps", "2", "--lr", "1e-3", "--resume"]) == 0
    resumed = load_bundle(tuned)
    assert resumed.card.training["diffusion"]["steps"] == 2 and resumed.card.training["diffusion"]["steps_this_run"] == 1
    assert resumed.classifier is not None and resumed.card.training["init_from"]["model"] == "start"
    assert not torch.equal(_noise_predictions(resumed.unet, HEALTHY), expected)


@pytest.mark.parametrize("options, message", [
    (["--channels", "T1,FLAIR", "--widths", "16,32"], "--widths cannot be combined with --init-from"),
    (["--channels", "T1,FLAIR", "--image-size", "32"], "--image-size cannot be combined with --init-from"),
    (["--channels", "FLAIR"], "takes 2 channel(s) (T1, FLAIR), --channels names 1"),
    (["--channels", "T1,FLAIR", "--clip-max", "0.5"], "clip_max must be between 1 (the upper percentile) and 10, got 0.5"),
])
def test_a_start_or_ceiling_that_does_not_fit_is_refused_before_any_training(tumours, healthy_only_model, tmp_path, capsys, options, message):
    out = tmp_path / "never"
    code = main(["train-diffusion", "--data", str(tumours), "--out", str(out), "--init-from", str(healthy_only_model),
                 "--max-steps", "1", *QUIET, *options])
    assert code == 2 and message in capsys.readouterr().err
    assert not out.exists()


def test_a_class_conditional_start_must_go_on_class_conditionally(tumours, healthy_only_model, tmp_path, capsys):
    conditional = tmp_path / "conditional"
    assert main(["train-diffusion", "--data", str(tumours), "--out", str(conditional), "--channels", "T1,FLAIR", "--train-on", "all",
                 "--init-from", str(healthy_only_model), "--max-steps", "1", *QUIET]) == 0
    code = main(["train-diffusion", "--data", str(tumours), "--out", str(tmp_path / "again"), "--channels", "T1,FLAIR",
                 "--init-from", str(conditional), "--max-steps", "1", *QUIET])
    assert code == 2 and "continue it with --train-on all" in capsys.readouterr().err


def test_a_core_model_learns_from_core_slices_and_leaves_oedema_only_slices_out(tumours):
    subjects = find_brats_subjects(tumours, ["T1", "FLAIR"])

    def labels(region: str) -> np.ndarray:
        return SliceDataset.from_subjects(subjects, _card(region), 0.0).labels.numpy()

    whole, core = labels("whole"), labels("core")
    assert (whole == DISEASED).sum() == 2 * len(OEDEMA_SLICES)
    assert (core == DISEASED).sum() == 2 * len(CORE_SLICES)
    assert len(core) == len(whole) - 2 * (len(OEDEMA_SLICES) - len(CORE_SLICES))
    assert (core == HEALTHY).sum() == (whole == HEALTHY).sum()


def _card(region: str):
    card = tiny_card()
    card.lesion_region = region
    card.validate()
    return card


def test_lesion_region_and_intensity_ceiling_are_the_models_own(tumours, tmp_path, capsys):
    model = tmp_path / "core-model"
    common = ["--data", str(tumours), "--out", str(model), "--max-steps", "2", *QUIET, *TINY_NETWORK]
    assert main(["train-diffusion", *common, "--channels", "T1,FLAIR", "--image-size", "16", "--lesion-region", "core", "--clip-max", "2"]) == 0
    assert main(["train-classifier", *common]) == 0
    card = load_bundle(model).card
    assert card.lesion_region == "core" and card.normalisation.clip_max == 2.0
    assert card.training["classifier"]["diseased_slices"] == 2 * len(CORE_SLICES)
    assert any("flag the tumour core" in line for line in card.summary()), "the model picker says what the model flags"
    # Evaluation scores the model's region unless told otherwise.
    capsys.readouterr()
    report = tmp_path / "report.json"
    assert main(["evaluate", "--model", str(model), "--data", str(tumours), "--steps", "4", "--json", str(report)]) == 0
    scored = json.loads(report.read_text(encoding="utf-8"))
    assert scored["settings"]["region"] == "core"
    assert sum(row["lesion_voxels"] for row in scored["subjects"]) == 2 * len(CORE_SLICES) * 2 * 2
