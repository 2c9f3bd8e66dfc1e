"""The bundled model and sample study: checksums, card, and the demo end to end."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from DiffusionAnomalyLib import resources
from DiffusionAnomalyLib.bundle import load_bundle
from DiffusionAnomalyLib.cli import main
from DiffusionAnomalyLib.data import lesion_region


def test_bundled_model_loads_verified_and_documents_itself():
    bundle = load_bundle(resources.default_model())
    card = bundle.card
    assert card.channels == ("T1", "T1ce", "T2", "FLAIR")
    assert bundle.classifier is not None
    assert {"diffusion", "classifier"} <= set(card.training)
    assert card.metrics, "the card carries the measured metrics"
    weights = resources.default_model() / "weights.safetensors"
    assert weights.stat().st_size < 25 * 2**20


def test_every_bundled_model_is_verified_documented_and_small_enough_to_ship():
    models = resources.bundled_models()
    assert list(models)[0] == resources.DEFAULT_MODEL_NAME
    total_bytes = 0
    for name, folder in models.items():
        card = load_bundle(folder).card  # checks the weights against the card's SHA-256
        assert card.name == name and (folder / "MODEL_CARD.md").is_file(), name
        assert {"diffusion", "classifier"} <= set(card.training) and "test_default" in card.metrics, name
        total_bytes += sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    assert total_bytes <= 80 * 10**6


# FLAIR shows the whole tumour with its oedema; a post-contrast T1 shows the tumour core.
@pytest.mark.parametrize("sequence, region", [("FLAIR", "whole"), ("T1ce", "core")])
def test_a_single_sequence_gets_its_bundled_model_which_finds_the_tumour(tmp_path, capsys, sequence, region):
    model, order = resources.model_for_sequences([sequence])
    card = load_bundle(model).card
    assert card.channels == (sequence,) and order == [0] and card.lesion_region == region
    source = resources.sample_channels()[resources.SAMPLE_CHANNEL_SUFFIXES.index(sequence.lower())]
    study = tmp_path / f"study_{sequence}.nii.gz"
    shutil.copy(source, study)
    assert main(["detect", str(study), "--output-map", str(tmp_path / "map.nii.gz"), "--steps", "6", "--device", "cpu"]) == 0
    assert f"model {model.name} ({sequence})" in capsys.readouterr().out
    values = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "map.nii.gz")))
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(resources.sample_mask())))
    brain = sitk.GetArrayFromImage(sitk.ReadImage(str(source))) > 0
    assert values[lesion_region(labels, region)].mean() > 2 * values[brain & (labels == 0)].mean()


def test_a_sequence_no_bundled_model_takes_is_refused_naming_it():
    with pytest.raises(ValueError, match="no model fits the sequences given \\(T2\\)"):
        resources.model_for_sequences(["T2"])


def test_sample_study_matches_its_checksums():
    resources.verify_sample()
    images = [sitk.ReadImage(str(p)) for p in resources.sample_channels()]
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(resources.sample_mask())))
    assert set(np.unique(truth)) <= {0, 1, 2, 4} and (truth > 0).any()
    assert len({i.GetSize() for i in images}) == 1


def test_a_modified_sample_is_refused(tmp_path, monkeypatch):
    copy = tmp_path / "SampleData"
    shutil.copytree(resources.SAMPLE_DATA, copy)
    flair = copy / resources.SAMPLE_SUBJECT / f"{resources.SAMPLE_SUBJECT}_flair.nii.gz"
    flair.write_bytes(flair.read_bytes()[:-100])
    monkeypatch.setattr(resources, "SAMPLE_DATA", copy)
    with pytest.raises(ValueError, match="does not match its SHA-256"):
        resources.verify_sample()


def test_demo_writes_outputs_figure_and_scores(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "4", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "sample study: Dice" in printed and "AUROC" in printed
    for name in ("anomaly_map.nii.gz", "anomaly_mask.nii.gz", "healthy_FLAIR.nii.gz", "demo.png"):
        assert (out / name).is_file(), name
    reference = sitk.ReadImage(str(resources.sample_channels()[3]))
    anomaly = sitk.ReadImage(str(out / "anomaly_map.nii.gz"))
    assert anomaly.GetSize() == reference.GetSize() and anomaly.GetDirection() == reference.GetDirection()
    # Even at 4 steps the map is brighter inside the tumour than in the rest of the brain.
    values = sitk.GetArrayFromImage(anomaly)
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(resources.sample_mask()))) > 0
    brain = sitk.GetArrayFromImage(reference) > 0
    assert values[truth].mean() > 2 * values[brain & ~truth].mean()
