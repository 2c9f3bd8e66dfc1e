"""DiffusionAnomaly engine: classifier-guided diffusion anomaly detection (arrays in, arrays out).

Imports torch, MONAI, numpy and SimpleITK; never Slicer or Qt, so it runs in Slicer's
Python, in a plain Python environment and in a background process alike.
"""

__version__ = "0.1.0"
