"""Bad inputs and damaged model bundles give clear errors and never a wrong result."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from DiffusionAnomalyLib.bundle import load_bundle, save_bundle
from DiffusionAnomalyLib.cards import BundleError
from DiffusionAnomalyLib.cli import main
from DiffusionAnomalyLib.detector import AnomalyDetector
from DiffusionAnomalyLib.networks import build_unet

from conftest import brain_phantom, tiny_card, write_image


@pytest.fixture
def detector(tiny_bundle) -> AnomalyDetector:
    return AnomalyDetector.from_bundle(tiny_bundle, device="cpu")


def images(arrays):
    return [sitk.GetImageFromArray(a) for a in arrays]


def test_channels_on_different_grids_are_refused(detector):
    arrays, _ = brain_phantom()
    t1, flair = images(arrays)
    flair.SetSpacing((1.0, 1.0, 2.0))
    with pytest.raises(ValueError, match="FLAIR differs from T1 in spacing"):
        detector.detect([t1, flair])
    bigger = sitk.GetImageFromArray(np.pad(arrays[1], 1))
    with pytest.raises(ValueError, match="FLAIR has size"):
        detector.detect([t1, bigger])
    with pytest.raises(ValueError, match="share one voxel grid"):
        detector.detect([arrays[0], arrays[1][:, :-1]])


def test_wrong_channel_count_names_the_expected_channels(detector):
    arrays, _ = brain_phantom()
    with pytest.raises(ValueError, match="expects 2 channel.*T1, FLAIR; got 1"):
        detector.detect([arrays[0]])


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_voxels_are_refused(detector, bad):
    arrays, _ = brain_phantom()
    arrays[1, 5, 5, 5] = bad
    with pytest.raises(ValueError, match="FLAIR contains NaN or infinite"):
        detector.detect(list(arrays))


def test_empty_and_constant_volumes_are_refused(detector):
    arrays, _ = brain_phantom()
    with pytest.raises(ValueError, match="no foreground"):
        detector.detect([np.zeros_like(arrays[0])] * 2)
    constant = np.where(arrays[0] > 0, 50.0, 0.0).astype(np.float32)
    with pytest.raises(ValueError, match="FLAIR is constant"):
        detector.detect([arrays[0], constant])
    with pytest.raises(ValueError, match="empty"):
        detector.detect([np.zeros((0, 4, 4))] * 2)


def test_4d_and_vector_images_are_refused(detector):
    arrays, _ = brain_phantom()
    with pytest.raises(ValueError, match="4D"):
        detector.detect([arrays[0][None], arrays[1][None]])
    vector = sitk.GetImageFromArray(np.stack([arrays[0]] * 3, axis=-1), isVector=True)
    with pytest.raises(ValueError, match="components per voxel"):
        detector.detect([vector, vector])


def test_a_missing_bundle_is_reported(tmp_path):
    with pytest.raises(BundleError, match="no model bundle"):
        load_bundle(tmp_path / "nowhere")


def test_tampered_weights_fail_the_checksum(tiny_bundle):
    weights = tiny_bundle / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="do not match the SHA-256"):
        load_bundle(tiny_bundle)


def test_truncated_weights_fail_the_checksum(tiny_bundle):
    weights = tiny_bundle / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(BundleError, match="truncated or was modified"):
        load_bundle(tiny_bundle)


def test_corrupt_card_is_reported(tiny_bundle):
    (tiny_bundle / "card.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(tiny_bundle)


def test_weights_that_do_not_fit_the_card_are_reported(tiny_bundle, tmp_path):
    other = tiny_card(channels=("T1",))
    foreign = save_bundle(tmp_path / "other", other, build_unet(other))
    shutil.copy(foreign / "weights.safetensors", tiny_bundle / "weights.safetensors")
    card = json.loads((tiny_bundle / "card.json").read_text(encoding="utf-8"))
    card["weights"]["sha256"] = json.loads((foreign / "card.json").read_text(encoding="utf-8"))["weights"]["sha256"]
    (tiny_bundle / "card.json").write_text(json.dumps(card), encoding="utf-8")
    with pytest.raises(BundleError, match="do not fit the architecture"):
        load_bundle(tiny_bundle)


def test_unknown_card_fields_and_versions_are_reported(tiny_bundle):
    card = json.loads((tiny_bundle / "card.json").read_text(encoding="utf-8"))
    card["format_version"] = 99
    (tiny_bundle / "card.json").write_text(json.dumps(card), encoding="utf-8")
    with pytest.raises(BundleError, match="format version 99"):
        load_bundle(tiny_bundle)
    card["format_version"] = 1
    card["unet"]["wings"] = 2
    (tiny_bundle / "card.json").write_text(json.dumps(card), encoding="utf-8")
    with pytest.raises(BundleError, match="unknown field.*wings"):
        load_bundle(tiny_bundle)


def test_card_updates_cannot_change_the_architecture(tiny_bundle):
    from DiffusionAnomalyLib.cards import load_card, update_card

    card = load_card(tiny_bundle)
    card.image_size = (32, 32)
    with pytest.raises(ValueError, match="image_size.*retraining"):
        update_card(tiny_bundle, card)
    card = load_card(tiny_bundle)
    card.defaults = card.defaults.replace(steps=7)
    update_card(tiny_bundle, card)
    assert load_bundle(tiny_bundle).card.defaults.steps == 7, "the weights still verify after a card update"


def test_bundle_round_trip_restores_identical_weights(tiny_bundle):
    first = load_bundle(tiny_bundle)
    resaved = save_bundle(tiny_bundle.parent / "copy", first.card, first.unet, first.classifier)
    second = load_bundle(resaved)
    for a, b in zip(first.unet.state_dict().values(), second.unet.state_dict().values()):
        assert (a == b).all()


def test_cli_reports_bad_input_without_writing_outputs(tiny_bundle, tmp_path, capsys):
    arrays, _ = brain_phantom()
    t1 = write_image(arrays[0], tmp_path / "t1.nii.gz")
    not_an_image = tmp_path / "flair.nii.gz"
    not_an_image.write_text("hello", encoding="utf-8")
    out = tmp_path / "map.nii.gz"
    assert main(["detect", str(t1), "--model", str(tiny_bundle), "--output-map", str(out)]) == 2
    assert "expects 2 input volume(s), in the order T1, FLAIR" in capsys.readouterr().err
    assert main(["detect", str(t1), str(not_an_image), "--model", str(tiny_bundle), "--output-map", str(out)]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert not out.exists()


def test_fp16_weights_in_small_files_give_the_same_maps_and_are_verified(tiny_bundle, tmp_path):
    from DiffusionAnomalyLib.cli import main as cli

    out = tmp_path / "exported"
    assert cli(["export", str(tiny_bundle), "--out", str(out), "--fp16", "--max-file-mib", "0.05"]) == 0
    files = sorted(out.glob("weights-*.safetensors"))
    assert len(files) > 1 and all(f.stat().st_size <= 0.05 * 2**20 for f in files)
    arrays, _ = brain_phantom(lesion_centre=(6, 10, 9))
    original = AnomalyDetector.from_bundle(tiny_bundle, device="cpu").detect(list(arrays))
    halved = AnomalyDetector.from_bundle(out, device="cpu").detect(list(arrays))
    np.testing.assert_allclose(halved.anomaly_map, original.anomaly_map, atol=2e-3)
    files[1].write_bytes(files[1].read_bytes()[:-10])
    with pytest.raises(BundleError, match="do not match the SHA-256"):
        load_bundle(out)


def test_export_never_writes_into_a_folder_of_other_files(tiny_bundle, tmp_path, capsys):
    from DiffusionAnomalyLib.cli import main as cli

    documents = tmp_path / "documents"
    documents.mkdir()
    (documents / "weights-report.safetensors").write_bytes(b"someone else's file")
    assert cli(["export", str(tiny_bundle), "--out", str(documents), "--fp16"]) == 2
    assert "is not an empty folder or a model bundle" in capsys.readouterr().err
    assert sorted(p.name for p in documents.iterdir()) == ["weights-report.safetensors"]
    assert cli(["export", str(tiny_bundle), "--out", str(tmp_path / "new"), "--fp16"]) == 0
    assert cli(["export", str(tiny_bundle), "--out", str(tmp_path / "new")]) == 0, "an earlier export is replaced"
