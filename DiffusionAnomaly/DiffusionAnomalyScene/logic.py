"""Scene logic of anomaly detection: what every front end (desktop, web, scripts) calls.

A detection has three steps, so that the work itself can run elsewhere (a process, a
thread) while the scene stays untouched until there is a complete result:

1. :meth:`AnomalySceneLogic.request` reads the chosen volumes into a
   :class:`~DiffusionAnomalyLib.jobs.DetectionRequest`, with the settings resolved against
   the model card (a bad value is refused here, before any work);
2. a job runs it (``ProcessJob`` in desktop Slicer, ``ThreadJob`` in the web app);
3. :meth:`AnomalySceneLogic.apply` writes the result into a map volume and a segmentation.

:class:`DetectionRun` owns these steps for a front end: one run at a time, its status,
Cancel, and where the result goes. A preview of one slice is written to preview nodes of
its own, never over a full result.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import slicer

from DiffusionAnomalyLib.cards import load_card
from DiffusionAnomalyLib.config import ModelCard
from DiffusionAnomalyLib.jobs import CANCELLED, DONE, RUNNING, DetectionJob, DetectionRequest, JobStatus, ThreadJob
from DiffusionAnomalyLib.settings import CALIBRATED, DetectionSettings, Threshold

from . import outputs
from .volumes import axial_slice_at, channel_inputs, guess_channel_volumes

ATTRIBUTE_PREFIX = "DiffusionAnomaly."
PREVIEW_OF = ATTRIBUTE_PREFIX + "PreviewOf"
BRAIN_OF = ATTRIBUTE_PREFIX + "BrainOf"
JobFactory = Callable[[DetectionRequest], DetectionJob]


def prepare_scene(scene) -> None:
    """Registers what the scene logic needs in a scene made outside the Slicer application.

    Desktop Slicer does this at start-up; ``slicer-core`` scripts and servers call it once.
    The segmentations logic registers the labelmap converters, the colours logic the
    built-in colour tables and the colour-legend node class.
    """
    for logic_class in (slicer.vtkSlicerSegmentationsModuleLogic, slicer.vtkSlicerColorLogic):
        logic_class().SetMRMLScene(scene)


def _node_ids(scene) -> List[str]:
    return [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())]


@dataclass
class DetectionOutputs:
    """Where a detection's results are in the scene, and what they say."""

    map_node: object
    segmentation_node: object
    threshold: float
    anomaly_voxels: int
    slices_processed: int
    seconds: float
    preview_slice: Optional[int] = None
    messages: List[str] = field(default_factory=list)
    brain_node: Optional[object] = None
    brain_source: str = ""
    bias_correction: str = ""
    slices_redrawn: int = 0

    @property
    def is_preview(self) -> bool:
        return self.preview_slice is not None

    def summary(self) -> str:
        what = f"slice {self.preview_slice} (preview)" if self.is_preview else f"{self.slices_processed} slices"
        if self.slices_redrawn:
            what += f" ({self.slices_redrawn} redrawn deeper)"
        brain = f"; brain: {self.brain_source}" if self.brain_source else ""
        bias = f"; {self.bias_correction}" if self.bias_correction not in ("", "none") else ""
        return f"{what} in {self.seconds:.1f} s; {self.anomaly_voxels} voxels above {self.threshold:.3g}{brain}{bias}"


@dataclass
class PendingDetection:
    """A request with what :meth:`AnomalySceneLogic.apply` needs to know about it afterwards."""

    request: DetectionRequest
    card: ModelCard
    reference_node: object
    background_node: object
    preview_slice: Optional[int]
    messages: List[str]
    # How the brain was found: "user" (the user's segmentation), "found" (kept from an
    # earlier run on the same images and mode) or "" (the detection finds it).
    brain_origin: str = ""
    brain_key: Tuple = ()


class AnomalySceneLogic:
    """Turns volume nodes into an anomaly map and a segmentation in one MRML scene."""

    def __init__(self, scene) -> None:
        self.scene = scene
        # The analysed voxels of each map, for re-thresholding (Otsu needs them); a map
        # loaded from disk falls back to its non-zero voxels.
        self._analysed: Dict[str, np.ndarray] = {}
        # The brain found for a set of input volumes, by (their IDs and modification times,
        # mode): a preview after a detection does not extract the brain again; an edit of any
        # input (new modification time) makes it be found anew.
        self._brains: Dict[Tuple, np.ndarray] = {}

    # -- inputs ----------------------------------------------------------------------------

    def input_volumes(self) -> List[object]:
        """The scalar volumes a user can choose as inputs: all but label maps and anomaly maps."""
        collection = self.scene.GetNodesByClass("vtkMRMLScalarVolumeNode")
        nodes = [collection.GetItemAsObject(i) for i in range(collection.GetNumberOfItems())]
        return [node for node in nodes if not node.IsA("vtkMRMLLabelMapVolumeNode") and node.GetAttribute(ATTRIBUTE_PREFIX + "Model") is None]

    def guess_channel_volumes(self, channel_names: Sequence[str], chosen: Sequence[Optional[object]] = ()) -> List[Optional[object]]:
        """One input volume per channel: the ``chosen`` ones kept, empty ones matched by name."""
        return guess_channel_volumes(channel_names, self.input_volumes(), chosen)

    # -- 1. request ------------------------------------------------------------------------

    def request(self, model: str, volume_nodes: Sequence[Optional[object]], settings: Optional[DetectionSettings] = None,
                preview_ras: Optional[Sequence[float]] = None, brain_segmentation=None) -> PendingDetection:
        """Reads the channel volumes (one per model channel, in the card's order).

        ``preview_ras``: a point on the slice to preview (the red view's centre); only the
        axial slice through it is translated. ``brain_segmentation``: a segmentation whose
        first segment is the brain (instead of finding it). Raises ``ValueError`` for a bad
        setting or input.
        """
        card = load_card(model)
        resolved = (settings or DetectionSettings()).resolve(card)
        inputs = channel_inputs(card.channels, volume_nodes)
        reference = volume_nodes[0]
        preview_slice = None
        if preview_ras is not None:
            preview_slice, _ = axial_slice_at(reference, preview_ras)
        brain_key = self._brain_key(volume_nodes, resolved.brain_mask)
        if brain_segmentation is not None:
            brain, origin = outputs.segment_as_mask(self.scene, brain_segmentation, reference), "user"
        else:
            brain = self._brains.get(brain_key)
            origin = "found" if brain is not None else ""
        request = DetectionRequest(str(model), inputs.arrays, inputs.geometry, resolved, None if preview_slice is None else [preview_slice], brain)
        return PendingDetection(request, card, reference, background_volume(card, volume_nodes), preview_slice, inputs.messages,
                                origin, brain_key)

    @staticmethod
    def _brain_key(volume_nodes, mode: str) -> Tuple:
        """The inputs (the brain may be found on any channel) as they are now, and the brain mode."""
        return tuple((node.GetID(), node.GetImageData().GetMTime() if node.GetImageData() else 0) for node in volume_nodes), mode

    def _keep_brain(self, key: Tuple, brain: np.ndarray) -> None:
        """Keeps the brain found for ``key``, dropping those of earlier versions of the same inputs."""
        node_ids = [node_id for node_id, _ in key[0]]
        for stale in [k for k in self._brains if k[1] == key[1] and [node_id for node_id, _ in k[0]] == node_ids]:
            del self._brains[stale]
        self._brains[key] = brain

    # -- 3. apply ----------------------------------------------------------------------------

    def apply(self, pending: PendingDetection, result, map_node=None, segmentation_node=None) -> DetectionOutputs:
        """Writes a finished result; nodes given are updated, missing ones are created.

        If writing fails, every node added to the scene here is removed again.
        """
        reference = pending.reference_node
        shape = slicer.util.arrayFromVolume(reference).shape
        if result.anomaly_map.shape != shape or result.mask.shape != shape:
            raise ValueError(f"the result's grid {result.mask.shape} does not match volume '{reference.GetName()}' {shape}: "
                             "the input changed while detection ran; run Detect anomalies again")
        existing = set(_node_ids(self.scene))
        suffix = " preview" if pending.preview_slice is not None else ""
        try:
            if map_node is None:
                map_node = self.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", f"{reference.GetName()} anomaly map{suffix}")
            if segmentation_node is None:
                segmentation_node = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{reference.GetName()} anomalies{suffix}")
            if pending.preview_slice is not None:
                for node in (map_node, segmentation_node):
                    node.SetAttribute(PREVIEW_OF, reference.GetID())
            outputs.write_map_volume(self.scene, map_node, result.anomaly_map, reference)
            outputs.style_map_display(self.scene, map_node, result.anomaly_map, result.foreground, result.threshold)
            outputs.write_segment(self.scene, segmentation_node, result.mask, reference)
            for node in (map_node, segmentation_node):
                outputs.place_with_input(self.scene, node, reference)
            brain_node = None
            if pending.brain_origin != "user":  # a brain the user gave is shown by its own segmentation
                brain_node = self.brain_node(reference) or self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{reference.GetName()} brain")
                brain_node.SetAttribute(BRAIN_OF, reference.GetID())
                outputs.write_segment(self.scene, brain_node, result.brain_mask, reference, outputs.BRAIN_SEGMENT_NAME, outputs.BRAIN_SEGMENT_COLOR)
                outputs.show_as_outline(brain_node)
                outputs.place_with_input(self.scene, brain_node, reference)
            outputs.show_overlay(self.scene, pending.background_node, map_node, segmentation_node)
            finding = outputs.largest_finding_centre(result.mask, reference) if pending.preview_slice is None else None
            if finding is not None:
                outputs.jump_views_to(self.scene, finding)
        except Exception:
            for node_id in reversed(_node_ids(self.scene)):
                if node_id not in existing and self.scene.GetNodeByID(node_id) is not None:
                    self.scene.RemoveNode(self.scene.GetNodeByID(node_id))
            raise
        self._analysed[map_node.GetID()] = result.foreground.astype(bool)
        if pending.brain_origin != "user":
            self._keep_brain(pending.brain_key, result.brain_mask.astype(bool))
        self._record(map_node, pending, result)
        source = "as found by the earlier detection" if pending.brain_origin == "found" else result.brain_source
        return DetectionOutputs(map_node, segmentation_node, float(result.threshold), int(result.mask.sum()),
                                result.slices_processed, result.seconds, pending.preview_slice, list(pending.messages),
                                brain_node, source, result.bias_correction, result.slices_redrawn)

    def brain_node(self, reference_node) -> Optional[object]:
        """The segmentation holding the brain outline of ``reference_node``'s detections, if there is one."""
        collection = self.scene.GetNodesByClass("vtkMRMLSegmentationNode")
        nodes = [collection.GetItemAsObject(i) for i in range(collection.GetNumberOfItems())]
        return next((node for node in nodes if node.GetAttribute(BRAIN_OF) == reference_node.GetID()), None)

    def preview_nodes(self, reference_node) -> Tuple[Optional[object], Optional[object]]:
        """The map and segmentation that hold previews of ``reference_node``, if there are any yet."""
        found: Dict[str, object] = {}
        for class_name in ("vtkMRMLScalarVolumeNode", "vtkMRMLSegmentationNode"):
            collection = self.scene.GetNodesByClass(class_name)
            for i in range(collection.GetNumberOfItems()):
                node = collection.GetItemAsObject(i)
                if node.GetAttribute(PREVIEW_OF) == reference_node.GetID():
                    found.setdefault(class_name, node)
        return found.get("vtkMRMLScalarVolumeNode"), found.get("vtkMRMLSegmentationNode")

    def _record(self, map_node, pending: PendingDetection, result) -> None:
        map_node.SetAttribute(ATTRIBUTE_PREFIX + "Model", pending.request.model)
        map_node.SetAttribute(ATTRIBUTE_PREFIX + "Settings", json.dumps(result.settings.to_dict()))
        map_node.SetAttribute(ATTRIBUTE_PREFIX + "Threshold", repr(float(result.threshold)))
        # Its floor per axial slice and peak fraction, as JSON: a saved scene keeps it, since vtkMRMLNode::WriteXML
        # escapes only ';' and '%' in attribute values and ReadXMLAttributes splits at the first ':'
        # (Slicer Libs/MRML/Core/vtkMRMLNode.cxx).
        map_node.SetAttribute(ATTRIBUTE_PREFIX + "CalibratedThreshold", result.calibrated_threshold.to_text())
        map_node.SetAttribute(ATTRIBUTE_PREFIX + "MinComponentVoxels", str(result.settings.min_component_voxels))

    # -- re-threshold --------------------------------------------------------------------------

    def rethreshold(self, map_node, segmentation_node, threshold: Threshold,
                    min_component_voxels: Optional[int] = None) -> Tuple[int, float]:
        """Re-cuts the segmentation from the map node's values; returns (voxels, threshold)."""
        from DiffusionAnomalyLib.thresholds import ScanThreshold, threshold_map

        if map_node is None or map_node.GetImageData() is None:
            raise ValueError("there is no anomaly map to threshold yet: run Detect anomalies first")
        if segmentation_node is None:
            raise ValueError("choose the output segmentation to update")
        anomaly_map = slicer.util.arrayFromVolume(map_node)
        analysed = self._analysed.get(map_node.GetID())
        if analysed is None or analysed.shape != anomaly_map.shape:
            analysed = anomaly_map > 0
        if min_component_voxels is None:
            min_component_voxels = int(map_node.GetAttribute(ATTRIBUTE_PREFIX + "MinComponentVoxels") or 0)
        calibrated = map_node.GetAttribute(ATTRIBUTE_PREFIX + "CalibratedThreshold")
        mask, value = threshold_map(anomaly_map, analysed, threshold, min_component_voxels, ScanThreshold.from_text(calibrated) if calibrated else None)
        outputs.write_segment(self.scene, segmentation_node, mask, map_node)
        self.show_threshold(map_node, value)
        map_node.SetAttribute(ATTRIBUTE_PREFIX + "Threshold", repr(float(value)))
        return int(mask.sum()), float(value)

    @staticmethod
    def threshold_value(map_node, threshold: Threshold) -> Optional[float]:
        """The map value a threshold choice stands for on this map, when it is known without a re-cut."""
        from DiffusionAnomalyLib.thresholds import ScanThreshold

        if isinstance(threshold, (int, float)):
            return float(threshold)
        stored = map_node.GetAttribute(ATTRIBUTE_PREFIX + "CalibratedThreshold") if map_node is not None else None
        return ScanThreshold.from_text(stored).summary() if threshold == CALIBRATED and stored else None

    @staticmethod
    def show_threshold(map_node, value: float) -> None:
        """Moves the heat map's transparent floor with the threshold (cheap: no segmentation update)."""
        display = map_node.GetDisplayNode() if map_node is not None else None
        if display is not None:
            display.SetLowerThreshold(max(float(value), 0.0) * outputs.DISPLAY_FLOOR_FRACTION)


def background_volume(card: ModelCard, volume_nodes: Sequence[Optional[object]]):
    """The volume shown under the map: FLAIR when the model has it (lesions show best there), else the first."""
    names = [name.lower() for name in card.channels]
    if "flair" in names and volume_nodes[names.index("flair")] is not None:
        return volume_nodes[names.index("flair")]
    return volume_nodes[0]


class DetectionRun:
    """The detection of one front end: one at a time, followed, cancellable, finished into the scene.

    Args:
        scene_logic: the scene the results go to.
        start_job: runs a full detection (``ProcessJob`` in desktop Slicer, ``ThreadJob`` elsewhere).
        start_preview_job: runs a one-slice preview (default: as ``start_job``).
    """

    def __init__(self, scene_logic: AnomalySceneLogic, start_job: JobFactory = ThreadJob, start_preview_job: Optional[JobFactory] = None) -> None:
        self.scene_logic = scene_logic
        self._start_job = start_job
        self._start_preview_job = start_preview_job or start_job
        self._job: Optional[DetectionJob] = None
        self._pending: Optional[PendingDetection] = None
        self._targets: Tuple[Optional[object], Optional[object]] = (None, None)
        self.full: Optional[DetectionOutputs] = None
        self.latest: Optional[DetectionOutputs] = None

    @property
    def running(self) -> bool:
        return self._job is not None and self._job.status().state == RUNNING

    def start(self, model: str, volume_nodes: Sequence[Optional[object]], settings: Optional[DetectionSettings] = None,
              preview_ras: Optional[Sequence[float]] = None, map_node=None, segmentation_node=None, brain_segmentation=None) -> List[str]:
        """Starts a detection (a preview of the slice through ``preview_ras`` if given); returns notes on the inputs.

        A full result goes to ``map_node``/``segmentation_node`` (created when ``None``); a
        preview always goes to the reference volume's own preview nodes. ``brain_segmentation``:
        the user's brain mask (its first segment) instead of finding the brain.
        """
        if self.running:
            raise RuntimeError("a detection is already running: wait for it or cancel it first")
        pending = self.scene_logic.request(model, volume_nodes, settings, preview_ras, brain_segmentation)
        preview = pending.preview_slice is not None
        self._targets = self.scene_logic.preview_nodes(pending.reference_node) if preview else (map_node, segmentation_node)
        self._job = (self._start_preview_job if preview else self._start_job)(pending.request)
        self._pending = pending
        return list(pending.messages)

    def status(self) -> Optional[JobStatus]:
        return self._job.status() if self._job is not None else None

    def cancel(self) -> None:
        if self._job is not None:
            self._job.cancel()
        self._job = self._pending = None

    def finish(self) -> Optional[DetectionOutputs]:
        """Writes a finished job's result into the scene: its outputs, or None if it was cancelled.

        Raises ``RuntimeError`` with the job's message if it failed (the scene is unchanged).
        """
        job, pending = self._job, self._pending
        if job is None or pending is None:
            return None
        status = job.status()
        if status.state == RUNNING:
            raise RuntimeError("the detection is still running")
        self._job = self._pending = None
        if status.state == CANCELLED:
            return None
        if status.state != DONE:
            raise RuntimeError(status.message or "the detection failed")
        result = self.scene_logic.apply(pending, job.result(), *self._targets)
        if not result.is_preview:
            self.full = result
        self.latest = result
        return result

    def wait(self, timeout: Optional[float] = None) -> Optional[DetectionOutputs]:
        """Blocks until the detection ends and finishes it (for scripts); cancels it after ``timeout`` s."""
        if self._job is None:
            return None
        if self._job.wait(timeout).state == RUNNING:
            self.cancel()
            raise TimeoutError(f"the detection did not finish within {timeout} s and was cancelled")
        return self.finish()

    def rethreshold(self, threshold: Threshold) -> Tuple[int, float]:
        """Re-cuts the segmentation of the result shown last (full or preview)."""
        if self.latest is None:
            raise ValueError("there is no anomaly map to threshold yet: run Detect anomalies first")
        return self.scene_logic.rethreshold(self.latest.map_node, self.latest.segmentation_node, threshold)
