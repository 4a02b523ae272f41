"""Synthetic data worlds (deterministic, generated on the fly or to disk): ShapesWorld in `shapes.py`."""
