"""The scene logic on a real MRML scene (slicer-core): volume nodes in, map and segmentation out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer", reason="the scene logic needs slicer-core (pip install -e '.[test]')")
vtk = pytest.importorskip("vtk")

from DiffusionAnomalyLib import resources  # noqa: E402
from DiffusionAnomalyLib.cards import WEIGHTS_FILE  # noqa: E402
from DiffusionAnomalyLib.jobs import ThreadJob  # noqa: E402
from DiffusionAnomalyLib.process_job import ProcessJob  # noqa: E402
from DiffusionAnomalyLib.settings import DetectionSettings  # noqa: E402
from DiffusionAnomalyScene import outputs  # noqa: E402
from DiffusionAnomalyScene.logic import AnomalySceneLogic, DetectionRun  # noqa: E402
from DiffusionAnomalyScene.volumes import axial_slice_at, channel_inputs, guess_channel_volumes, load_volume  # noqa: E402

from conftest import brain_phantom, oblique_direction, write_image  # noqa: E402


def _study(tmp_path: Path, scene, direction=None, lesion_centre=(6, 10, 9)):
    arrays, lesion = brain_phantom(lesion_centre=lesion_centre)
    nodes = []
    for name, array in zip(("t1", "flair"), arrays):
        path = write_image(array, tmp_path / f"case_{name}.nii.gz", spacing=(0.9, 1.1, 2.0), direction=direction)
        nodes.append(load_volume(scene, path))
    return nodes, lesion


def detect(logic, model, nodes, settings=None, preview_ras=None, map_node=None, segmentation_node=None):
    """A detection run to the end on a thread, as a script would do it."""
    run = DetectionRun(logic)
    run.start(str(model), nodes, settings, preview_ras, map_node, segmentation_node)
    return run.wait(300)


def _ijk_to_ras(node) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _segment_array(segmentation_node, reference) -> np.ndarray:
    """The "Anomaly" segment as an array on the reference grid (helper nodes removed again)."""
    scene = segmentation_node.GetScene()
    before = set(_node_ids(scene))
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    try:
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segmentation_node.GetSegmentation().GetSegmentIdBySegmentName(outputs.SEGMENT_NAME))
        assert slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(segmentation_node, ids, labelmap, reference)
        return slicer.util.arrayFromVolume(labelmap).copy()
    finally:
        for node_id in set(_node_ids(scene)) - before:
            scene.RemoveNode(scene.GetNodeByID(node_id))


def _node_ids(scene) -> list:
    return sorted(scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes()))


def test_detection_writes_map_and_segmentation_on_the_oblique_input_grid(scene, tmp_path, tiny_bundle):
    nodes, _ = _study(tmp_path, scene, direction=oblique_direction())
    logic = AnomalySceneLogic(scene)

    result = detect(logic, tiny_bundle, nodes, DetectionSettings(steps=4, threshold=0.05))

    map_node, segmentation_node = result.map_node, result.segmentation_node
    assert np.allclose(_ijk_to_ras(map_node), _ijk_to_ras(nodes[0]), atol=1e-6)
    assert abs(np.linalg.det(_ijk_to_ras(map_node)[:3, :3]) - 0.9 * 1.1 * 2.0) < 1e-6
    anomaly_map = slicer.util.arrayFromVolume(map_node)
    assert anomaly_map.shape == slicer.util.arrayFromVolume(nodes[0]).shape
    assert anomaly_map.max() > 0
    segment = _segment_array(segmentation_node, nodes[0])
    assert segment.shape == anomaly_map.shape
    assert segment.sum() == result.anomaly_voxels == int((anomaly_map > 0.05).sum())


def test_map_display_is_a_fixed_heat_window_with_a_transparent_floor_shown_over_flair(scene, tmp_path, tiny_bundle):
    nodes, _ = _study(tmp_path, scene)
    result = detect(AnomalySceneLogic(scene), tiny_bundle, nodes, DetectionSettings(steps=4, threshold=0.05))

    display = result.map_node.GetDisplayNode()
    assert scene.GetNodeByID(display.GetColorNodeID()).GetName() == "Inferno"
    assert not display.GetAutoWindowLevel()
    assert display.GetWindowLevelMin() == 0.0
    assert display.GetWindowLevelMax() >= 0.05 * 1.5
    assert display.GetApplyThreshold()
    assert display.GetLowerThreshold() == pytest.approx(0.05 * outputs.DISPLAY_FLOOR_FRACTION)
    assert slicer.vtkSlicerColorLogic.GetColorLegendDisplayNode(result.map_node) is not None
    composites = scene.GetNodesByClass("vtkMRMLSliceCompositeNode")
    for i in range(composites.GetNumberOfItems()):
        composite = composites.GetItemAsObject(i)
        assert composite.GetForegroundVolumeID() == result.map_node.GetID()
        assert composite.GetBackgroundVolumeID() == nodes[1].GetID()  # FLAIR, not T1
        assert composite.GetForegroundOpacity() == pytest.approx(0.5)
    segment = result.segmentation_node.GetSegmentation().GetSegment(
        result.segmentation_node.GetSegmentation().GetSegmentIdBySegmentName("Anomaly"))
    assert segment is not None and tuple(segment.GetColor()) == pytest.approx(outputs.SEGMENT_COLOR)


def test_rerunning_and_rethresholding_update_the_same_nodes(scene, tmp_path, tiny_bundle):
    nodes, _ = _study(tmp_path, scene)
    logic = AnomalySceneLogic(scene)
    first = detect(logic, tiny_bundle, nodes, DetectionSettings(steps=4, threshold=0.05))
    count = scene.GetNumberOfNodes()

    second = detect(logic, tiny_bundle, nodes, DetectionSettings(steps=4, threshold=0.05), map_node=first.map_node,
                          segmentation_node=first.segmentation_node)
    assert scene.GetNumberOfNodes() == count
    assert (second.map_node, second.segmentation_node) == (first.map_node, first.segmentation_node)
    assert first.segmentation_node.GetSegmentation().GetNumberOfSegments() == 1
    assert logic.input_volumes() == nodes, "anomaly maps are not offered as inputs"

    anomaly_map = slicer.util.arrayFromVolume(first.map_node)
    high = float(np.percentile(anomaly_map[anomaly_map > 0], 90))
    voxels, value = logic.rethreshold(first.map_node, first.segmentation_node, high)
    assert value == high and voxels == int((anomaly_map > high).sum()) > 0
    assert _segment_array(first.segmentation_node, nodes[0]).sum() == voxels
    assert first.map_node.GetDisplayNode().GetLowerThreshold() == pytest.approx(high * outputs.DISPLAY_FLOOR_FRACTION)
    assert logic.rethreshold(first.map_node, first.segmentation_node, anomaly_map.max() + 1)[0] == 0
    assert _segment_array(first.segmentation_node, nodes[0]).sum() == 0
    otsu_voxels, otsu_value = logic.rethreshold(first.map_node, first.segmentation_node, "otsu")
    assert 0 < otsu_value < anomaly_map.max() and otsu_voxels > 0
    assert scene.GetNumberOfNodes() == count


def test_results_go_under_the_inputs_study(scene, tmp_path, tiny_bundle):
    nodes, _ = _study(tmp_path, scene)
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    patient = hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), "Patient 1")
    study = hierarchy.CreateStudyItem(patient, "MR brain")
    for node in nodes:
        hierarchy.CreateItem(study, node)

    result = detect(AnomalySceneLogic(scene), tiny_bundle, nodes, DetectionSettings(steps=4))

    for node in (result.map_node, result.segmentation_node):
        assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(node)) == study


def test_the_map_lights_up_the_tumour_of_the_sample_study(scene):
    nodes = [load_volume(scene, path) for path in resources.sample_channels()]
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(resources.sample_mask()))) > 0
    tumour_slice = int(np.argmax(truth.sum(axis=(1, 2))))  # the sample is axial: k is inferior→superior
    ras = _ijk_to_ras(nodes[0]) @ np.array([truth.shape[2] / 2, truth.shape[1] / 2, tumour_slice, 1.0])

    result = detect(AnomalySceneLogic(scene), resources.default_model(), nodes, DetectionSettings(device="cpu"), preview_ras=ras[:3])

    assert result.preview_slice == tumour_slice and result.slices_processed == 1
    anomaly_map = slicer.util.arrayFromVolume(result.map_node)
    assert not np.delete(anomaly_map, tumour_slice, axis=0).any()  # a preview leaves other slices empty
    inside, outside = anomaly_map[tumour_slice][truth[tumour_slice]], anomaly_map[tumour_slice][~truth[tumour_slice]]
    assert inside.mean() > 5 * outside.mean()
    segment = _segment_array(result.segmentation_node, nodes[0])[tumour_slice].astype(bool)
    dice = 2 * (segment & truth[tumour_slice]).sum() / (segment.sum() + truth[tumour_slice].sum())
    # The tumour's widest slice is where healing is weakest (the default model keeps part of a
    # large tumour's core and rim): the segment must still cover about half of it.
    assert dice > 0.45


def test_preview_slice_follows_the_patient_axial_axis_of_an_oblique_volume(scene, tmp_path):
    direction = oblique_direction((0.1, 0.05, 0.1))
    path = write_image(np.ones((10, 12, 14), np.float32), tmp_path / "oblique.nii.gz", direction=direction)
    node = load_volume(scene, path)
    ijk_to_ras = _ijk_to_ras(node)
    for k in (0, 4, 9):
        index, count = axial_slice_at(node, (ijk_to_ras @ np.array([6.0, 5.0, k, 1.0]))[:3])
        assert (index, count) == (k, 10)
    with pytest.raises(ValueError, match="outside volume"):
        axial_slice_at(node, (ijk_to_ras @ np.array([6.0, 5.0, 30.0, 1.0]))[:3])


def test_cancelled_or_failed_detection_leaves_the_scene_unchanged(scene, tmp_path, tiny_bundle):
    nodes, _ = _study(tmp_path, scene)
    logic = AnomalySceneLogic(scene)
    before = _node_ids(scene)

    pending = logic.request(str(tiny_bundle), nodes, DetectionSettings(steps=400))
    job = ThreadJob(pending.request)
    job.cancel()
    assert job.wait(60).state == "cancelled"
    with pytest.raises(RuntimeError, match="cancelled"):
        job.result()
    assert _node_ids(scene) == before

    finished = ThreadJob(logic.request(str(tiny_bundle), nodes, DetectionSettings(steps=4)).request)
    result = finished.wait(60) and finished.result()
    result.mask = result.mask[:-1]  # a result that cannot be written
    with pytest.raises(ValueError, match="does not match volume"):
        logic.apply(pending, result)
    assert _node_ids(scene) == before


def test_a_damaged_model_fails_in_the_background_process_with_a_clear_message(scene, tmp_path, tiny_bundle):
    nodes, _ = _study(tmp_path, scene)
    weights = tiny_bundle / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-100])
    before = _node_ids(scene)

    job = ProcessJob(AnomalySceneLogic(scene).request(str(tiny_bundle), nodes).request)
    status = job.wait(120)

    assert status.state == "failed"
    assert "SHA-256" in status.message or "checksum" in status.message.lower()
    assert _node_ids(scene) == before


def test_background_process_returns_the_same_result_as_a_thread(scene, tmp_path, tiny_bundle):
    nodes, _ = _study(tmp_path, scene)
    pending = AnomalySceneLogic(scene).request(str(tiny_bundle), nodes, DetectionSettings(steps=4, device="cpu", threshold=0.05))
    in_process = ThreadJob(pending.request)
    child = ProcessJob(pending.request)
    assert child.wait(120).state == "done", child.status().message
    assert in_process.wait(60).state == "done"
    assert child.status().done == child.status().total > 0
    np.testing.assert_allclose(child.result().anomaly_map, in_process.result().anomaly_map, atol=1e-5)
    np.testing.assert_array_equal(child.result().mask, in_process.result().mask)


def test_missing_channels_and_other_grids(scene, tmp_path):
    arrays, _ = brain_phantom()
    t1 = load_volume(scene, write_image(arrays[0], tmp_path / "t1.nii.gz"))
    with pytest.raises(ValueError, match="no input volume chosen for FLAIR"):
        channel_inputs(("T1", "FLAIR"), [t1, None])
    with pytest.raises(ValueError, match="needs 2 input volume"):
        channel_inputs(("T1", "FLAIR"), [t1])

    coarse = sitk.GetImageFromArray(arrays[1][::2, ::2, ::2].copy())
    coarse.SetSpacing((2.0, 2.0, 2.0))
    sitk.WriteImage(coarse, str(tmp_path / "flair.nii.gz"))
    flair = load_volume(scene, tmp_path / "flair.nii.gz")
    inputs = channel_inputs(("T1", "FLAIR"), [t1, flair])
    assert inputs.arrays[1].shape == arrays[0].shape
    assert "resampled" in inputs.messages[0] and "FLAIR" in inputs.messages[0]
    assert np.corrcoef(inputs.arrays[1].ravel(), arrays[1].ravel())[0, 1] > 0.8

    elsewhere = sitk.GetImageFromArray(arrays[1])
    elsewhere.SetOrigin((0.0, 0.0, 500.0))
    sitk.WriteImage(elsewhere, str(tmp_path / "other_study.nii.gz"))
    with pytest.raises(ValueError, match="do not show the same region"):
        channel_inputs(("T1", "FLAIR"), [t1, load_volume(scene, tmp_path / "other_study.nii.gz")])

    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    flair.SetAndObserveTransformNodeID(transform.GetID())
    with pytest.raises(ValueError, match="harden the transforms"):
        channel_inputs(("T1", "FLAIR"), [t1, flair])


def test_unreadable_file_is_refused_and_leaves_no_node(scene, tmp_path):
    bad = tmp_path / "notes.nii.gz"
    bad.write_text("not an image", encoding="utf-8")
    before = _node_ids(scene)
    with pytest.raises(ValueError, match="cannot read notes.nii.gz"):
        load_volume(scene, bad)
    assert _node_ids(scene) == before


def test_channel_volumes_are_guessed_from_names(scene):
    names = ["BraTS_001_flair", "BraTS_001_t1ce", "BraTS_001_t2", "BraTS_001_t1", "localizer"]
    nodes = [slicer.util.addVolumeFromArray(np.zeros((2, 2, 2), np.float32), name=name) for name in names]
    guessed = guess_channel_volumes(("T1", "T1ce", "T2", "FLAIR"), nodes)
    assert [node.GetName() for node in guessed] == ["BraTS_001_t1", "BraTS_001_t1ce", "BraTS_001_t2", "BraTS_001_flair"]
    assert guess_channel_volumes(("T1", "FLAIR"), nodes[4:]) == [None, None]


def test_a_failure_while_writing_removes_the_nodes_it_created(scene, tmp_path, tiny_bundle, monkeypatch):
    nodes, _ = _study(tmp_path, scene)
    logic = AnomalySceneLogic(scene)
    pending = logic.request(str(tiny_bundle), nodes, DetectionSettings(steps=4))
    job = ThreadJob(pending.request)
    job.wait(60)
    before = _node_ids(scene)

    def full_disk(*_):
        raise RuntimeError("no space left on device")

    monkeypatch.setattr(outputs, "write_segment", full_disk)
    with pytest.raises(RuntimeError, match="no space left"):
        logic.apply(pending, job.result())
    assert _node_ids(scene) == before


def test_views_jump_to_the_largest_finding(scene, tmp_path):
    arrays, _ = brain_phantom()
    node = load_volume(scene, write_image(arrays[0], tmp_path / "t1.nii.gz", spacing=(0.9, 1.1, 2.0), direction=oblique_direction()))
    slice_node = scene.AddNewNodeByClass("vtkMRMLSliceNode")
    slice_node.SetOrientationToAxial()
    mask = np.zeros(arrays[0].shape, np.uint8)
    mask[2:5, 3:8, 4:9] = 1  # the largest component
    mask[9, 15, 15] = 1
    centre = outputs.largest_finding_centre(mask, node)
    expected = _ijk_to_ras(node) @ np.array([6.0, 5.0, 3.0, 1.0])
    assert np.allclose(centre, expected[:3])
    outputs.jump_views_to(scene, centre)
    slice_to_ras = slice_node.GetSliceToRAS()
    normal = np.array([slice_to_ras.GetElement(r, 2) for r in range(3)])
    origin = np.array([slice_to_ras.GetElement(r, 3) for r in range(3)])
    assert abs(normal @ (expected[:3] - origin)) < 1e-4  # the axial plane passes through the finding
    assert outputs.largest_finding_centre(np.zeros_like(mask), node) is None
