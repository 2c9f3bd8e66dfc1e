"""From MRML volume nodes to the engine's arrays and voxel grids."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import slicer
import vtk

from DiffusionAnomalyLib.imageio import Geometry, resample_onto
from DiffusionAnomalyLib.preprocessing import Orientation
from DiffusionAnomalyLib.sequences import sequence_pattern, volume_label

# Slicer's world is RAS, SimpleITK's (and the engine's) LPS.
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


# A channel on another grid must cover at least this fraction of the first channel's box.
MIN_OVERLAP = 0.5


def load_volume(scene, path, name: Optional[str] = None):
    """Reads a NIfTI/NRRD file into a new scalar volume node with Slicer's own reader.

    Raises ``ValueError`` naming the file if it cannot be read; the scene is then unchanged.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} does not exist")
    node = slicer.vtkMRMLScalarVolumeNode()
    node.SetName(name or volume_label(path))
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    scene.AddNode(storage)
    scene.AddNode(node)
    node.SetAndObserveStorageNodeID(storage.GetID())
    if not storage.ReadData(node) or node.GetImageData() is None:
        scene.RemoveNode(node)
        scene.RemoveNode(storage)
        raise ValueError(f"cannot read {path.name} as an image volume: a NIfTI (.nii, .nii.gz) or NRRD (.nrrd) file is needed")
    node.CreateDefaultDisplayNodes()
    return node


def geometry_of(volume_node) -> Geometry:
    """The node's voxel grid in the engine's (SimpleITK, LPS) convention."""
    directions = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASDirectionMatrix(directions)
    ras_directions = np.array([[directions.GetElement(r, c) for c in range(3)] for r in range(3)])
    lps_directions = RAS_TO_LPS @ ras_directions
    origin = RAS_TO_LPS @ np.array(volume_node.GetOrigin())
    return Geometry(tuple(float(s) for s in volume_node.GetSpacing()), tuple(float(o) for o in origin), tuple(float(d) for d in lps_directions.ravel()))


def array_of(volume_node) -> np.ndarray:
    """The node's voxels as a float32 (k, j, i) array, with a clear error for what cannot be used."""
    name = volume_node.GetName()
    image = volume_node.GetImageData()
    if image is None or image.GetNumberOfPoints() == 0:
        raise ValueError(f"volume '{name}' has no voxels: load an image into it first")
    if image.GetNumberOfScalarComponents() != 1:
        raise ValueError(f"volume '{name}' has {image.GetNumberOfScalarComponents()} components per voxel (a colour or vector image); choose a scalar MRI volume")
    return np.asarray(slicer.util.arrayFromVolume(volume_node), dtype=np.float32)


def guess_channel_volumes(channel_names: Sequence[str], volume_nodes: Sequence, chosen: Sequence[Optional[object]] = ()) -> List[Optional[object]]:
    """Pairs each model channel with the loaded volume whose name says it is that sequence.

    Channels with a volume in ``chosen`` keep it; the others are guessed among the volumes
    not chosen for any channel, each used once. Channels without a match get ``None``.
    """
    chosen = list(chosen) + [None] * (len(channel_names) - len(chosen))
    taken = {node.GetID() for node in chosen if node is not None}
    guesses: List[Optional[object]] = []
    for channel, current in zip(channel_names, chosen):
        if current is not None:
            guesses.append(current)
            continue
        pattern = sequence_pattern(channel)
        match = next((node for node in volume_nodes if node.GetID() not in taken and re.search(pattern, node.GetName().lower())), None)
        if match is not None:
            taken.add(match.GetID())
        guesses.append(match)
    return guesses


@dataclass
class ChannelInputs:
    """The channel arrays on the first channel's grid, with notes on what was done to them."""

    arrays: List[np.ndarray]
    geometry: Geometry
    messages: List[str]


def channel_inputs(channel_names: Sequence[str], volume_nodes: Sequence[Optional[object]]) -> ChannelInputs:
    """Reads one volume per model channel; volumes on another grid are resampled onto the first."""
    if len(volume_nodes) != len(channel_names):
        raise ValueError(f"this model needs {len(channel_names)} input volume(s) ({', '.join(channel_names)}); got {len(volume_nodes)}")
    missing = [name for name, node in zip(channel_names, volume_nodes) if node is None]
    if missing:
        raise ValueError(f"no input volume chosen for {', '.join(missing)}: this model needs {', '.join(channel_names)}; load and select one volume per sequence")
    for index, node in enumerate(volume_nodes):
        twin = next((other for other, other_node in zip(channel_names[index + 1:], volume_nodes[index + 1:]) if other_node is node), None)
        if twin is not None:
            raise ValueError(f"volume '{node.GetName()}' is chosen for both {channel_names[index]} and {twin}: choose a different volume for each sequence")
    transforms = {node.GetTransformNodeID() for node in volume_nodes}
    if len(transforms) > 1:
        raise ValueError("the input volumes are under different transforms: harden the transforms (Data module) so that all inputs share one patient space")
    reference = volume_nodes[0]
    geometry = geometry_of(reference)
    arrays = [array_of(reference)]
    messages = []
    for name, node in zip(channel_names[1:], volume_nodes[1:]):
        array = array_of(node)
        node_geometry = geometry_of(node)
        if array.shape != arrays[0].shape or node_geometry.differences(geometry):
            covered = geometry.overlap(arrays[0].shape, node_geometry, array.shape)
            if covered < MIN_OVERLAP:
                raise ValueError(
                    f"{name} ('{node.GetName()}') covers only {covered:.0%} of {channel_names[0]} ('{reference.GetName()}'): "
                    "these volumes do not show the same region; choose volumes of one study (or register them first)"
                )
            array = resample_onto(array, node_geometry, geometry, arrays[0].shape)
            messages.append(f"{name} ('{node.GetName()}') is on another voxel grid than {channel_names[0]} ('{reference.GetName()}'); it was resampled onto it (linear)")
        arrays.append(array)
    return ChannelInputs(arrays, geometry, messages)


def axial_slice_at(volume_node, ras: Sequence[float]) -> Tuple[int, int]:
    """The canonical axial slice (as the engine counts them) through a RAS point, and their number.

    Raises ``ValueError`` if the point lies outside the volume.
    """
    ras_to_ijk = vtk.vtkMatrix4x4()
    volume_node.GetRASToIJKMatrix(ras_to_ijk)
    ijk = ras_to_ijk.MultiplyPoint(tuple(ras[:3]) + (1.0,))[:3]
    shape = slicer.util.arrayFromVolume(volume_node).shape
    kji = tuple(int(round(ijk[axis])) for axis in (2, 1, 0))
    if any(not 0 <= index < size for index, size in zip(kji, shape)):
        raise ValueError(f"the slice shown is outside volume '{volume_node.GetName()}': move the red view onto the image")
    orientation = Orientation.from_direction(geometry_of(volume_node).direction)
    return orientation.axial_index(kji, shape), shape[orientation.transpose[0]]
