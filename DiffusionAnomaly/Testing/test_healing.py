"""Measuring healing: the translation against each subject's image from before its lesion was put in."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("nilearn")

from DiffusionAnomalyLib import synth  # noqa: E402
from DiffusionAnomalyLib.cli import main  # noqa: E402
from DiffusionAnomalyLib.data import find_brats_subjects  # noqa: E402
from DiffusionAnomalyLib.evaluation import lesion_region  # noqa: E402
from DiffusionAnomalyLib.healing import healing_scores, size_group  # noqa: E402
from DiffusionAnomalyLib.preprocessing import IntensityScale  # noqa: E402


def test_the_healthy_image_differs_from_the_study_only_where_the_tumour_is():
    from scipy import ndimage

    subject = synth.make_subject(4, True, spacing_mm=3.0)
    lesion = subject.seg > 0
    # Oedema fades out beyond its labelled border, and the tumour pushes tissue around it.
    far = ~ndimage.binary_dilation(lesion, iterations=8)
    for channel in synth.CHANNELS:
        image, healthy = subject.images[channel], subject.healthy_images[channel]
        assert (image != healthy)[lesion].mean() > 0.9, "the tumour is not in the healthy image"
        # Same anatomy, contrast, bias and noise away from the tumour (up to the rounding of integer voxels).
        assert np.abs(image[far] - healthy[far]).max() <= 1


def test_healing_scores_read_what_the_translation_did():
    rng = np.random.default_rng(0)
    healthy = [rng.normal(100, 5, (6, 10, 10)).astype(np.float32)]
    lesion = np.zeros((6, 10, 10), bool)
    lesion[2:4, 3:6, 3:6] = True
    study = [np.where(lesion, healthy[0] + 80, healthy[0])]
    brain = np.ones_like(lesion)
    scale = IntensityScale((50.0,), (250.0,))
    healed = healing_scores(study, healthy, healthy, scale, lesion, brain)
    assert healed["lesion_error"] == 0 and healed["contrast_removed"] == 1 and healed["healthy_error"] == 0
    untouched = healing_scores(study, healthy, study, scale, lesion, brain)
    assert untouched["contrast_removed"] == 0 and untouched["lesion_error"] == pytest.approx(80 / 200)
    dimmed = healing_scores(study, healthy, [np.where(lesion, healthy[0] + 20, healthy[0])], scale, lesion, brain)
    assert dimmed["contrast_removed"] == pytest.approx(0.75)
    assert [size_group(v) for v in (1.0, 12.0, 40.0)] == ["small", "medium", "large"]


def test_evaluate_reports_healing_by_lesion_size_and_the_classifier_by_noise_level(tmp_path, tiny_bundle):
    folders = synth.synthesize_dataset(tmp_path / "data", 3, seed=9, healthy_fraction=1 / 3, spacing_mm=4.0)
    subjects = find_brats_subjects(tmp_path / "data", ["T1", "FLAIR"])
    assert [s.healthy is not None for s in subjects] == [any("healthy" in p.name for p in f.iterdir()) for f in folders]
    report_path = tmp_path / "report.json"
    assert main(["evaluate", "--model", str(tiny_bundle), "--data", str(tmp_path / "data"), "--json", str(report_path),
                 "--reconstruction-baseline", "--device", "cpu"]) == 0
    report = json.loads(report_path.read_text(encoding="utf-8"))
    diseased = [row for row in report["subjects"] if not row["healthy"]]
    assert diseased and all(row["size_group"] in ("small", "medium", "large") and row["contrast_removed"] is not None for row in diseased)
    assert all(row["healthy_error"] is not None and row["reconstruction_healthy_error"] is not None for row in report["subjects"])
    assert sum(group["subjects"] for group in report["by_lesion_size"].values()) == len(diseased)
    assert set(report["classifier_auroc_by_t"]) == {"0", "100", "250", "500", "750"}
    # The baseline is the plain reconstruction whatever the map is compared with.
    assert main(["evaluate", "--model", str(tiny_bundle), "--data", str(tmp_path / "data"), "--json", str(report_path),
                 "--reconstruction-baseline", "--map-reference", "reconstruction", "--device", "cpu"]) == 0
    against_reconstruction = json.loads(report_path.read_text(encoding="utf-8"))
    assert [row["reconstruction_healthy_error"] for row in against_reconstruction["subjects"]] == pytest.approx(
        [row["reconstruction_healthy_error"] for row in report["subjects"]])
    assert all(row["reconstruction_healthy_error"] > 0 for row in report["subjects"])


def test_a_post_contrast_model_can_be_scored_on_the_tumour_core(tmp_path, tiny_bundle):
    labels = np.array([0, 1, 2, 3, 4])
    assert lesion_region(labels, "whole").tolist() == [False, True, True, True, True]
    assert lesion_region(labels, "core").tolist() == [False, True, False, True, True]  # oedema (2) is not core
    assert lesion_region(labels, "enhancing").tolist() == [False, False, False, True, True]
    with pytest.raises(ValueError, match="unknown lesion region 'edema'"):
        lesion_region(labels, "edema")
    synth.synthesize_dataset(tmp_path / "data", 2, seed=9, healthy_fraction=0.0, spacing_mm=4.0)
    voxels = {}
    for region in ("whole", "core"):
        report_path = tmp_path / f"{region}.json"
        assert main(["evaluate", "--model", str(tiny_bundle), "--data", str(tmp_path / "data"), "--region", region,
                     "--json", str(report_path), "--device", "cpu"]) == 0
        report = json.loads(report_path.read_text(encoding="utf-8"))
        assert report["settings"]["region"] == region
        voxels[region] = [row["lesion_voxels"] for row in report["subjects"]]
        assert not any(row["healthy"] for row in report["subjects"]), "a tumour with oedema is a diseased subject whatever is scored"
    assert all(0 < core < whole for core, whole in zip(voxels["core"], voxels["whole"]))
