"""The result nodes: the anomaly-map volume with its heat-map display, and the segmentation."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
import slicer
import vtk

RESOURCES = Path(__file__).resolve().parents[1] / "Resources"
HEAT_COLOR_TABLE = "Inferno"
HEAT_COLOR_FILE = RESOURCES / "ColorTables" / "DiffusionAnomalyInferno.txt"
SEGMENT_NAME = "Anomaly"
# Cyan stands out against every colour of the Inferno heat map and against grey MRI.
SEGMENT_COLOR = (0.0, 0.85, 1.0)
BRAIN_SEGMENT_NAME = "Brain"
BRAIN_SEGMENT_COLOR = (0.45, 0.85, 0.35)
OVERLAY_OPACITY = 0.5
# The heat map's window ends at this percentile of the map over the analysed voxels, so
# that a few extreme voxels do not wash out the rest.
WINDOW_PERCENTILE = 99.5
# Map values below this fraction of the segmentation threshold are drawn transparent.
DISPLAY_FLOOR_FRACTION = 0.5


def heat_color_table(scene):
    """Slicer's Inferno table when the application has it, else the one that ships here."""
    for node in _nodes_of_class(scene, "vtkMRMLColorTableNode"):
        if node.GetName() == HEAT_COLOR_TABLE:
            return node
    table = slicer.vtkMRMLColorTableNode()
    table.SetName(HEAT_COLOR_TABLE)
    storage = slicer.vtkMRMLColorTableStorageNode()
    storage.SetFileName(str(HEAT_COLOR_FILE))
    if not storage.ReadData(table):
        raise RuntimeError(f"cannot read the heat-map colour table {HEAT_COLOR_FILE}; reinstall DiffusionAnomaly")
    table.SetAttribute("Category", "DiffusionAnomaly")
    scene.AddNode(table)
    return table


def _nodes_of_class(scene, class_name: str):
    collection = scene.GetNodesByClass(class_name)
    return [collection.GetItemAsObject(i) for i in range(collection.GetNumberOfItems())]


def write_map_volume(scene, map_node, anomaly_map: np.ndarray, reference_node) -> None:
    """Fills ``map_node`` with the map, on exactly the reference volume's grid and transform."""
    matrix = vtk.vtkMatrix4x4()
    reference_node.GetIJKToRASMatrix(matrix)
    map_node.SetIJKToRASMatrix(matrix)
    map_node.SetAndObserveTransformNodeID(reference_node.GetTransformNodeID())
    slicer.util.updateVolumeFromArray(map_node, np.ascontiguousarray(anomaly_map, dtype=np.float32))


def style_map_display(scene, map_node, anomaly_map: np.ndarray, analysed: np.ndarray, threshold: float) -> None:
    """Heat colours, a fixed window from 0 to a robust maximum, low values transparent, a legend."""
    display = map_node.GetDisplayNode()
    if display is None:
        map_node.CreateDefaultDisplayNodes()
        display = map_node.GetDisplayNode()
    display.SetAndObserveColorNodeID(heat_color_table(scene).GetID())
    values = anomaly_map[analysed > 0]
    top = float(np.percentile(values, WINDOW_PERCENTILE)) if values.size else 0.0
    top = max(top, float(threshold) * 1.5, 1e-3)
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0.0, top)
    display.SetApplyThreshold(True)
    display.SetAutoThreshold(False)
    display.SetLowerThreshold(max(float(threshold), 0.0) * DISPLAY_FLOOR_FRACTION)
    display.SetUpperThreshold(float(np.max(anomaly_map)) + 1.0)
    display.SetInterpolate(True)
    if slicer.vtkSlicerColorLogic.GetColorLegendDisplayNode(map_node) is None:
        legend = slicer.vtkSlicerColorLogic.AddDefaultColorLegendDisplayNode(map_node)
        if legend is not None:
            legend.SetTitleText("Anomaly")
            legend.SetLabelFormat("%.2f")


def write_segment(scene, segmentation_node, mask: np.ndarray, reference_node, name: str = SEGMENT_NAME,
                  color: Sequence[float] = SEGMENT_COLOR) -> None:
    """Puts ``mask`` into the segmentation's segment ``name``, creating the segment if needed.

    The segmentation and the temporary labelmap sit under the reference volume's transform:
    importing a labelmap applies the transform between the labelmap's and the segmentation's
    parents (Slicer's ``vtkSlicerSegmentationsModuleLogic::ImportLabelmapToSegmentationNode``),
    so a labelmap outside the transform would land where the volume was before it was moved.
    """
    segmentation_node.SetAndObserveTransformNodeID(reference_node.GetTransformNodeID())
    segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_node)
    segmentation = segmentation_node.GetSegmentation()
    segment_id = segmentation.GetSegmentIdBySegmentName(name)
    if not segment_id:
        segment_id = segmentation.AddEmptySegment(name, name, color)
    labelmap = slicer.vtkMRMLLabelMapVolumeNode()
    labelmap.SetName("__diffusion_anomaly_mask__")
    scene.AddNode(labelmap)
    try:
        matrix = vtk.vtkMatrix4x4()
        reference_node.GetIJKToRASMatrix(matrix)
        labelmap.SetIJKToRASMatrix(matrix)
        labelmap.SetAndObserveTransformNodeID(reference_node.GetTransformNodeID())
        slicer.util.updateVolumeFromArray(labelmap, np.ascontiguousarray(mask, dtype=np.uint8))
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segment_id)
        if not mask.any():
            segmentation.ClearSegment(segment_id)
        elif not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation_node, ids):
            raise RuntimeError("Slicer could not import the anomaly mask into the segmentation")
    finally:
        scene.RemoveNode(labelmap)
    segment = segmentation.GetSegment(segment_id)
    segment.SetName(name)
    segment.SetColor(*color)
    if segmentation_node.GetDisplayNode() is None:
        segmentation_node.CreateDefaultDisplayNodes()
    segmentation_node.GetDisplayNode().SetOpacity2DFill(0.25)


def show_as_outline(segmentation_node) -> None:
    """Only the outline in the slice views, nothing in 3D (the brain mask is context, not a finding)."""
    display = segmentation_node.GetDisplayNode()
    display.SetOpacity2DFill(0.0)
    display.SetOpacity2DOutline(0.8)
    display.SetVisibility3D(False)


def segment_as_mask(scene, segmentation_node, reference_node, segment_name: Optional[str] = None) -> np.ndarray:
    """A segment (``segment_name``, else the first) as a (k, j, i) mask on the reference volume's grid."""
    segmentation = segmentation_node.GetSegmentation()
    if segmentation.GetNumberOfSegments() == 0:
        raise ValueError(f"segmentation '{segmentation_node.GetName()}' has no segment to use as the brain mask")
    segment_id = segmentation.GetSegmentIdBySegmentName(segment_name) if segment_name else segmentation.GetNthSegmentID(0)
    if not segment_id:
        raise ValueError(f"segmentation '{segmentation_node.GetName()}' has no segment '{segment_name}'")
    labelmap = slicer.vtkMRMLLabelMapVolumeNode()
    scene.AddNode(labelmap)
    try:
        labelmap.SetAndObserveTransformNodeID(reference_node.GetTransformNodeID())
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segment_id)
        if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(segmentation_node, ids, labelmap, reference_node):
            raise ValueError(f"the segment of '{segmentation_node.GetName()}' could not be put on the grid of '{reference_node.GetName()}'")
        return slicer.util.arrayFromVolume(labelmap) > 0
    finally:
        scene.RemoveNode(labelmap)


def place_with_input(scene, node, reference_node) -> None:
    """Puts ``node`` in the subject hierarchy beside the input (under its study)."""
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if hierarchy is None:
        return
    reference_item = hierarchy.GetItemByDataNode(reference_node)
    parent = hierarchy.GetItemParent(reference_item) if reference_item else hierarchy.GetSceneItemID()
    item = hierarchy.GetItemByDataNode(node)
    if not item:
        # Without the desktop application nothing creates items for new nodes.
        hierarchy.CreateItem(parent, node)
    elif hierarchy.GetItemParent(item) != parent:
        hierarchy.SetItemParent(item, parent)


def largest_finding_centre(mask: np.ndarray, reference_node) -> Optional[Tuple[float, float, float]]:
    """RAS centre of the largest connected component of a (k, j, i) mask, or None if empty."""
    if not mask.any():
        return None
    components = sitk.RelabelComponent(sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8))))
    k, j, i = np.argwhere(sitk.GetArrayViewFromImage(components) == 1).mean(axis=0)
    matrix = vtk.vtkMatrix4x4()
    reference_node.GetIJKToRASMatrix(matrix)
    return tuple(matrix.MultiplyPoint((float(i), float(j), float(k), 1.0))[:3])


def jump_views_to(scene, ras: Sequence[float]) -> None:
    """Moves every slice view to the plane through ``ras``, keeping the in-plane view (Slicer's default jump)."""
    slicer.vtkMRMLSliceNode.JumpAllSlices(scene, *ras, slicer.vtkMRMLSliceNode.OffsetJumpSlice)


def show_overlay(scene, background_node, map_node, segmentation_node: Optional[object] = None, opacity: float = OVERLAY_OPACITY) -> None:
    """Shows the map over the background volume in every slice view, and the segmentation."""
    for composite in _nodes_of_class(scene, "vtkMRMLSliceCompositeNode"):
        composite.SetBackgroundVolumeID(background_node.GetID())
        composite.SetForegroundVolumeID(map_node.GetID())
        composite.SetForegroundOpacity(opacity)
    if segmentation_node is not None and segmentation_node.GetDisplayNode() is not None:
        segmentation_node.GetDisplayNode().SetVisibility(True)
