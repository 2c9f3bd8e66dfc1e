"""Scene logic of anomaly detection: what every front end (desktop, web, scripts) calls.

A detection has three steps, so that the work itself can run elsewhere (a thread, a
process) while the scene stays untouched until there is a complete result:

1. :meth:`AnomalySceneLogic.request` reads the chosen volumes into a
   :class:`~DiffusionAnomalyLib.jobs.DetectionRequest`;
2. the caller runs it (``ThreadJob``/``ProcessJob`` from ``DiffusionAnomalyLib.jobs``, or
   :meth:`AnomalySceneLogic.detect`, which waits);
3. :meth:`AnomalySceneLogic.apply` writes the result into the map volume and segmentation,
   creating them the first time and updating them afterwards.

:meth:`AnomalySceneLogic.rethreshold` re-cuts the segmentation from the stored map at once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import slicer

from DiffusionAnomalyLib.bundle import load_card
from DiffusionAnomalyLib.config import ModelCard
from DiffusionAnomalyLib.detector import DetectionResult, threshold_map
from DiffusionAnomalyLib.jobs import DetectionRequest, ThreadJob

from . import outputs
from .volumes import axial_slice_at, channel_inputs, guess_channel_volumes

ATTRIBUTE_PREFIX = "DiffusionAnomaly."


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
class DetectionSettings:
    """The panel's settings; ``None`` means the model card's default.

    ``threshold`` is a map value or ``"otsu"``; ``device`` is auto, cpu or cuda.
    """

    noise_level: Optional[float] = None
    guidance_scale: Optional[float] = None
    steps: Optional[int] = None
    threshold: Optional[Union[float, str]] = None
    batch_size: Optional[int] = None
    device: str = "auto"

    def engine_settings(self) -> Dict[str, object]:
        names = ("noise_level", "guidance_scale", "steps", "threshold", "batch_size")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


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

    def summary(self) -> str:
        what = f"slice {self.preview_slice} (preview)" if self.preview_slice is not None else f"{self.slices_processed} slices"
        return f"{what} in {self.seconds:.1f} s; {self.anomaly_voxels} voxels above {self.threshold:.3g}"


@dataclass
class PendingDetection:
    """A request with what :meth:`AnomalySceneLogic.apply` needs to know about it afterwards."""

    request: DetectionRequest
    card: ModelCard
    reference_node: object
    background_node: object
    preview_slice: Optional[int]
    messages: List[str]


class AnomalySceneLogic:
    """Turns volume nodes into an anomaly map and a segmentation in one MRML scene."""

    def __init__(self, scene) -> None:
        self.scene = scene
        # The analysed voxels of each map, for re-thresholding (Otsu needs them); a map
        # loaded from disk falls back to its non-zero voxels.
        self._analysed: Dict[str, np.ndarray] = {}

    # -- inputs ----------------------------------------------------------------------------

    def input_volumes(self) -> List[object]:
        """The scalar volumes a user can choose as inputs: all but label maps and anomaly maps."""
        collection = self.scene.GetNodesByClass("vtkMRMLScalarVolumeNode")
        nodes = [collection.GetItemAsObject(i) for i in range(collection.GetNumberOfItems())]
        return [node for node in nodes if not node.IsA("vtkMRMLLabelMapVolumeNode") and node.GetAttribute(ATTRIBUTE_PREFIX + "Model") is None]

    def guess_channel_volumes(self, channel_names: Sequence[str]) -> List[Optional[object]]:
        """One input volume per channel, matched by name (``*flair*`` → FLAIR, ...), or None."""
        return guess_channel_volumes(channel_names, self.input_volumes())

    # -- 1. request ------------------------------------------------------------------------

    def request(self, model: str, volume_nodes: Sequence[Optional[object]], settings: Optional[DetectionSettings] = None,
                preview_ras: Optional[Sequence[float]] = None) -> PendingDetection:
        """Reads the channel volumes (one per model channel, in the card's order).

        ``preview_ras``: a point on the slice to preview (the red view's centre); only the
        axial slice through it is translated.
        """
        settings = settings or DetectionSettings()
        card = load_card(model)
        inputs = channel_inputs(card.channels, volume_nodes)
        reference = volume_nodes[0]
        preview_slice = None
        if preview_ras is not None:
            preview_slice, _ = axial_slice_at(reference, preview_ras)
        request = DetectionRequest(str(model), inputs.arrays, inputs.geometry, settings.engine_settings(), settings.device,
                                   None if preview_slice is None else [preview_slice])
        names = [name.lower() for name in card.channels]
        background = volume_nodes[names.index("flair")] if "flair" in names else reference
        return PendingDetection(request, card, reference, background, preview_slice, inputs.messages)

    # -- 2. run (here, waiting) --------------------------------------------------------------

    def detect(self, model: str, volume_nodes: Sequence[Optional[object]], settings: Optional[DetectionSettings] = None,
               preview_ras: Optional[Sequence[float]] = None, map_node=None, segmentation_node=None) -> DetectionOutputs:
        """Request, run and apply in one call, for scripts (blocks until done)."""
        pending = self.request(model, volume_nodes, settings, preview_ras)
        job = ThreadJob(pending.request)
        job.wait()
        return self.apply(pending, job.result(), map_node, segmentation_node)

    # -- 3. apply ----------------------------------------------------------------------------

    def apply(self, pending: PendingDetection, result: DetectionResult, map_node=None, segmentation_node=None) -> DetectionOutputs:
        """Writes a finished result; nodes given are updated, missing ones are created.

        If writing fails, every node added to the scene here is removed again.
        """
        reference = pending.reference_node
        shape = slicer.util.arrayFromVolume(reference).shape
        if result.anomaly_map.shape != shape or result.mask.shape != shape:
            raise ValueError(f"the result's grid {result.mask.shape} does not match volume '{reference.GetName()}' {shape}: "
                             "the input changed while detection ran; run Detect anomalies again")
        existing = set(_node_ids(self.scene))
        try:
            if map_node is None:
                map_node = self.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", f"{reference.GetName()} anomaly map")
            if segmentation_node is None:
                segmentation_node = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{reference.GetName()} anomalies")
            outputs.write_map_volume(self.scene, map_node, result.anomaly_map, reference)
            outputs.style_map_display(self.scene, map_node, result.anomaly_map, result.foreground, result.threshold)
            outputs.write_segment(self.scene, segmentation_node, result.mask, reference)
            for node in (map_node, segmentation_node):
                outputs.place_with_input(self.scene, node, reference)
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
        self._record(map_node, pending, result)
        return DetectionOutputs(map_node, segmentation_node, float(result.threshold), int(result.mask.sum()),
                                result.slices_processed, result.seconds, pending.preview_slice, list(pending.messages))

    def _record(self, map_node, pending: PendingDetection, result: DetectionResult) -> None:
        map_node.SetAttribute(ATTRIBUTE_PREFIX + "Model", pending.request.model)
        map_node.SetAttribute(ATTRIBUTE_PREFIX + "Settings", json.dumps(pending.request.settings))
        map_node.SetAttribute(ATTRIBUTE_PREFIX + "Threshold", repr(float(result.threshold)))
        map_node.SetAttribute(ATTRIBUTE_PREFIX + "MinComponentVoxels", str(pending.card.defaults.min_component_voxels))

    # -- re-threshold --------------------------------------------------------------------------

    def rethreshold(self, map_node, segmentation_node, threshold: Union[float, str],
                    min_component_voxels: Optional[int] = None) -> Tuple[int, float]:
        """Re-cuts the segmentation from the map node's values; returns (voxels, threshold)."""
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
        mask, value = threshold_map(anomaly_map, analysed, threshold, min_component_voxels)
        outputs.write_segment(self.scene, segmentation_node, mask, map_node)
        display = map_node.GetDisplayNode()
        if display is not None:
            display.SetLowerThreshold(max(value, 0.0) * outputs.DISPLAY_FLOOR_FRACTION)
        map_node.SetAttribute(ATTRIBUTE_PREFIX + "Threshold", repr(float(value)))
        return int(mask.sum()), float(value)
