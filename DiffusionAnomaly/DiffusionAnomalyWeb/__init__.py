"""Diffusion Anomaly in the browser: trame-slicer pages on the same scene logic as the Slicer module."""
