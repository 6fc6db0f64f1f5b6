"""Generators of layouts and simple procedural H&E-like images (fixtures, sample data, designer),
and the layout statistics they draw from (built-in CoNSeP figures, or fitted to a user's data)."""

from nucsynth.generate.fit import fit_layout_stats, fit_source_stats
from nucsynth.generate.layouts import nuclei_from_points, points_from_labels, random_layout
from nucsynth.generate.stats import CONSEP_LAYOUT_STATS, LayoutStats, StatsError, find_layout_stats
from nucsynth.generate.tissue import procedural_image, procedural_sample

__all__ = [
    "random_layout",
    "nuclei_from_points",
    "points_from_labels",
    "procedural_image",
    "procedural_sample",
    "LayoutStats",
    "StatsError",
    "CONSEP_LAYOUT_STATS",
    "fit_layout_stats",
    "fit_source_stats",
    "find_layout_stats",
]
