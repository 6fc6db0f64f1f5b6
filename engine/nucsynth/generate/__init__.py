"""Generators of layouts and simple procedural H&E-like images (fixtures, sample data, designer)."""

from nucsynth.generate.layouts import nuclei_from_points, points_from_labels, random_layout
from nucsynth.generate.tissue import procedural_image, procedural_sample

__all__ = ["random_layout", "nuclei_from_points", "points_from_labels", "procedural_image", "procedural_sample"]
