"""DiffusionAnomaly's scene logic: MRML volume nodes in, anomaly map and segmentation nodes out.

Imports Slicer's MRML core (``slicer``, ``vtk``) and the engine, never Qt: the same code
serves the desktop module, the web app and the tests on ``slicer-core``.
"""
