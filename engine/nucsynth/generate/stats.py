"""Nucleus layout statistics measured on real CoNSeP data, kept as documented constants.

Measured on 2026-11-22 over the 432 CoNSeP 256 x 256 px training patches (18216 nuclei;
Graham et al., "HoVer-Net", Medical Image Analysis 2019) with::

    python scripts/measure_layout_stats.py ../shared/data/consep256/Train

Size and shape figures use only nuclei that do not touch the patch border (a nucleus cut
by the border is not a whole nucleus); counts, shares and spacings use every nucleus.
Areas are in pixels at the 40x scan resolution of CoNSeP (about 0.25 um per pixel).
The patches of one tile overlap, so some nuclei are counted more than once; the figures
are distributions, not counts of distinct cells.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nucsynth.layout import CONSEP_CLASSES, ClassSet

__all__ = [
    "NucleusStats",
    "CONSEP_STATS",
    "POOLED_STATS",
    "NUCLEI_PER_PATCH_MEDIAN",
    "NUCLEI_PER_PATCH_MEAN",
    "NUCLEI_PER_PATCH_QUARTILES",
    "NN_DISTANCE_QUARTILES",
    "NN_DISTANCE_P01",
    "NUCLEAR_COVERAGE_QUARTILES",
    "PATCH_AREA",
    "stats_for_class",
    "arrangement_for_class",
    "default_class_shares",
]

# Nuclei per 256 x 256 px patch (all classes): very variable (stroma-only patches have ~10,
# dense tumour patches 60+). Mean 42.2, standard deviation 38.0.
PATCH_AREA = 256 * 256
NUCLEI_PER_PATCH_MEAN = 42.2
NUCLEI_PER_PATCH_MEDIAN = 38.5
NUCLEI_PER_PATCH_QUARTILES = (10.0, 38.5, 60.0)
# Distance (px) from each nucleus centroid to the nearest other centroid, all classes.
NN_DISTANCE_QUARTILES = (13.1, 17.3, 23.3)
NN_DISTANCE_P01 = 6.5  # 1st percentile
# Share of patch pixels inside nuclei, in percent: quartiles over patches.
NUCLEAR_COVERAGE_QUARTILES = (3.1, 13.8, 27.6)


@dataclass(frozen=True)
class NucleusStats:
    """Size, shape and spacing statistics of one nucleus class.

    ``log_area_mu`` / ``log_area_sigma`` are the mean and standard deviation of the natural
    log of the area (a log-normal fit); ``axis_ratio_quartiles`` are quartiles of the ratio
    of the major to the minor axis of the moment ellipse; ``nn_same_class`` is the share of
    nuclei whose nearest neighbour has the same class (high = clustered).
    """

    name: str
    count: int
    share: float
    area_quartiles: tuple[float, float, float]
    log_area_mu: float
    log_area_sigma: float
    axis_ratio_quartiles: tuple[float, float, float]
    eccentricity_median: float
    solidity_median: float
    nn_distance_quartiles: tuple[float, float, float]
    nn_same_class: float

    @property
    def log_axis_ratio_mu(self) -> float:
        """Log-normal fit of the axis ratio: log of the median."""
        return float(np.log(self.axis_ratio_quartiles[1]))

    @property
    def log_axis_ratio_sigma(self) -> float:
        """Log-normal fit of the axis ratio: sigma from the interquartile range (IQR / 1.349)."""
        q1, _, q3 = self.axis_ratio_quartiles
        return float((np.log(q3) - np.log(q1)) / 1.349)


# Per class of the 4 merged CoNSeP classes, in class-id order 1..4.
CONSEP_STATS: dict[str, NucleusStats] = {
    "other": NucleusStats("other", 432, 0.0237, (41.8, 78.5, 149.0), 4.381, 0.865,
                          (1.37, 1.65, 2.19), 0.794, 0.948, (9.8, 15.2, 25.1), 0.769),
    "inflammatory": NucleusStats("inflammatory", 4507, 0.2474, (134.0, 185.0, 225.0), 5.122, 0.460,
                                 (1.17, 1.31, 1.52), 0.644, 0.957, (11.8, 15.2, 18.8), 0.726),
    "epithelial": NucleusStats("epithelial", 6609, 0.3628, (201.0, 343.0, 551.0), 5.777, 0.731,
                               (1.37, 1.67, 2.10), 0.802, 0.940, (14.2, 18.3, 23.2), 0.963),
    "spindle": NucleusStats("spindle", 6668, 0.3661, (112.0, 177.0, 280.0), 5.180, 0.676,
                            (1.43, 1.80, 2.47), 0.831, 0.938, (13.3, 18.8, 27.3), 0.806),
}
# All classes pooled: used for unknown-class nuclei and instance-only class sets.
POOLED_STATS = NucleusStats("all", 18216, 1.0, (133.0, 207.0, 331.0), 5.347, 0.731,
                            (1.30, 1.58, 2.06), 0.774, 0.945, (13.1, 17.3, 23.3), 0.842)

# Classes of other datasets borrow the CoNSeP profile that matches them biologically.
_PROFILE_OF_NAME = {
    "other": "other", "dead": "other", "miscellaneous": "other",
    "inflammatory": "inflammatory", "lymphocyte": "inflammatory", "plasma": "inflammatory",
    "neutrophil": "inflammatory", "eosinophil": "inflammatory",
    "epithelial": "epithelial", "neoplastic": "epithelial", "tumor": "epithelial", "tumour": "epithelial",
    "spindle": "spindle", "connective": "spindle", "fibroblast": "spindle", "endothelial": "spindle",
}
# How a profile's nuclei are arranged by the clustered layout generator.
_ARRANGEMENT_OF_PROFILE = {"epithelial": "gland", "spindle": "stream", "inflammatory": "clump", "other": "scatter"}


def _profile(class_set: ClassSet, k: int) -> str | None:
    if k == 0:
        return None
    return _PROFILE_OF_NAME.get(class_set.names[k - 1].lower())


def stats_for_class(class_set: ClassSet, k: int) -> NucleusStats:
    """The statistics used for class ``k`` (1-based; 0 = unknown) of ``class_set``.

    CoNSeP-like class names map to their measured profile (e.g. PanNuke "connective" ->
    spindle, Lizard "lymphocyte" -> inflammatory); other names and class 0 use the pooled
    statistics.
    """
    p = _profile(class_set, k)
    return CONSEP_STATS[p] if p else POOLED_STATS


def arrangement_for_class(class_set: ClassSet, k: int) -> str:
    """Clustered arrangement of class ``k``: "gland", "stream", "clump" or "scatter"."""
    p = _profile(class_set, k)
    return _ARRANGEMENT_OF_PROFILE[p] if p else "scatter"


def default_class_shares(class_set: ClassSet) -> np.ndarray:
    """Share of each class 1..K: the measured CoNSeP mix for the CoNSeP class set, else equal."""
    k = class_set.num_classes
    if class_set.names == CONSEP_CLASSES.names:
        s = np.array([CONSEP_STATS[n].share for n in class_set.names])
        return s / s.sum()
    return np.full(k, 1.0 / k)
