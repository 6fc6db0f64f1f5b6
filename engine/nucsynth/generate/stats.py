"""Nucleus layout statistics: the type the layout generator draws from, its JSON file, and
the CoNSeP figures kept as documented constants (the default when nothing else is given).

:class:`LayoutStats` holds, per class and pooled, nucleus size (area quartiles and a
log-normal fit), shape (axis ratio, eccentricity, solidity) and spacing (nearest-neighbour
distance, share of same-class neighbours), plus the class mix, the density (nuclei per
256 x 256 px) and the nuclear coverage. :func:`nucsynth.generate.fit.fit_layout_stats`
measures them on any Samples (``nucsynth stats STORE --out FILE.json``; ``nucsynth train``
writes ``layout_stats.json`` beside its checkpoints); :meth:`LayoutStats.load` reads such a
file back, validating every figure.

The built-in constants were measured on 2026-11-22 over the 432 CoNSeP 256 x 256 px
training patches (18216 nuclei; Graham et al., "HoVer-Net", Medical Image Analysis 2019)
with::

    python scripts/measure_layout_stats.py ../shared/data/consep256/Train

Size and shape figures use only nuclei that do not touch the patch border (a nucleus cut
by the border is not a whole nucleus); counts, shares and spacings use every nucleus.
Areas are in pixels at the 40x scan resolution of CoNSeP (about 0.25 um per pixel).
The patches of one tile overlap, so some nuclei are counted more than once; the figures
are distributions, not counts of distinct cells.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from nucsynth.layout import CONSEP_CLASSES, ClassSet, LayoutError

__all__ = [
    "NucleusStats",
    "LayoutStats",
    "StatsError",
    "CONSEP_STATS",
    "POOLED_STATS",
    "CONSEP_LAYOUT_STATS",
    "LAYOUT_STATS_FILE",
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
    "find_layout_stats",
]

# The file name of fitted statistics beside a model (written by `nucsynth train`).
LAYOUT_STATS_FILE = "layout_stats.json"
STATS_FORMAT = "nucsynth-layout-stats"
STATS_VERSION = 1

# Nuclei per 256 x 256 px patch (all classes): very variable (stroma-only patches have ~10,
# dense tumour patches 60+). Mean 42.2, standard deviation 38.0.
PATCH_AREA = 256 * 256
NUCLEI_PER_PATCH_MEAN = 42.2
NUCLEI_PER_PATCH_SD = 38.0
NUCLEI_PER_PATCH_MEDIAN = 38.5
NUCLEI_PER_PATCH_QUARTILES = (10.0, 38.5, 60.0)
# Distance (px) from each nucleus centroid to the nearest other centroid, all classes.
NN_DISTANCE_QUARTILES = (13.1, 17.3, 23.3)
NN_DISTANCE_P01 = 6.5  # 1st percentile
# Share of patch pixels inside nuclei, in percent: quartiles over patches.
NUCLEAR_COVERAGE_QUARTILES = (3.1, 13.8, 27.6)


class StatsError(LayoutError):
    """Layout statistics that cannot be fitted, read or used (one line: what, where, expected)."""


@dataclass(frozen=True)
class NucleusStats:
    """Size, shape and spacing statistics of one nucleus class.

    ``count`` nuclei, ``share`` of all nuclei; areas in px; ``log_area_mu`` /
    ``log_area_sigma`` are the mean and standard deviation of the natural log of the area (a
    log-normal fit); ``axis_ratio_quartiles`` are quartiles of the ratio of the major to the
    minor axis of the moment ellipse; ``nn_distance_quartiles`` (px) of the distance to the
    nearest other centroid; ``nn_same_class`` is the share of nuclei whose nearest neighbour
    has the same class (high = clustered).
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

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Any, where: str = "nucleus statistics") -> "NucleusStats":
        """Inverse of :meth:`to_dict`; raises :class:`StatsError` naming ``where`` and the
        first figure that is missing or out of range."""
        d = _mapping(d, where, {f.name for f in fields(cls)})
        name = d["name"]
        if not isinstance(name, str) or not name:
            raise StatsError(f"{where}: 'name' must be a non-empty string, got {name!r}")
        return cls(
            name=name,
            count=_count(d, "count", where),
            share=_number(d, "share", where, 0.0, 1.0),
            area_quartiles=_quartiles(d, "area_quartiles", where, 0.0, exclusive_lo=True),
            log_area_mu=_number(d, "log_area_mu", where),
            log_area_sigma=_number(d, "log_area_sigma", where, 0.0),
            axis_ratio_quartiles=_quartiles(d, "axis_ratio_quartiles", where, 1.0),
            eccentricity_median=_number(d, "eccentricity_median", where, 0.0, 1.0),
            solidity_median=_number(d, "solidity_median", where, 0.0, 1.0),
            nn_distance_quartiles=_quartiles(d, "nn_distance_quartiles", where, 0.0),
            nn_same_class=_number(d, "nn_same_class", where, 0.0, 1.0),
        )


# ------------------------------------------------------------------ validation helpers
def _mapping(d: Any, where: str, keys: set[str]) -> Mapping[str, Any]:
    if not isinstance(d, Mapping):
        raise StatsError(f"{where}: expected a JSON object, got {type(d).__name__}")
    missing = sorted(keys - set(d))
    if missing:
        raise StatsError(f"{where}: missing {', '.join(repr(k) for k in missing)}")
    return d


def _number(d: Mapping[str, Any], key: str, where: str, lo: float | None = None, hi: float | None = None,
            exclusive_lo: bool = False) -> float:
    v = d[key]
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if ok and lo is not None:
        ok = v > lo if exclusive_lo else v >= lo
    if ok and hi is not None:
        ok = v <= hi
    if not ok:
        rng = f"{'>' if exclusive_lo else '>='} {lo}" if lo is not None else "finite"
        rng += f" and <= {hi}" if hi is not None else ""
        raise StatsError(f"{where}: {key!r} must be a number {rng}, got {v!r}")
    return float(v)


def _count(d: Mapping[str, Any], key: str, where: str) -> int:
    v = d[key]
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise StatsError(f"{where}: {key!r} must be a whole number >= 0, got {v!r}")
    return int(v)


def _quartiles(d: Mapping[str, Any], key: str, where: str, lo: float, exclusive_lo: bool = False
               ) -> tuple[float, float, float]:
    v = d[key]
    if not isinstance(v, (list, tuple)) or len(v) != 3:
        raise StatsError(f"{where}: {key!r} must be 3 quartiles [q25, q50, q75], got {v!r}")
    q = tuple(_number({key: x}, key, where, lo, exclusive_lo=exclusive_lo) for x in v)
    if not q[0] <= q[1] <= q[2]:
        raise StatsError(f"{where}: {key!r} must be in increasing order [q25, q50, q75], got {list(v)}")
    return q  # type: ignore[return-value]


# ------------------------------------------------------------------ class profiles
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


# ------------------------------------------------------------------ layout statistics
@dataclass(frozen=True)
class LayoutStats:
    """Everything the layout generator draws from, for one class set.

    ``classes[k - 1]`` describes class ``k`` of ``class_set``; ``pooled`` all nuclei together
    (used for class 0 and for classes of another set that match no class here). Densities
    are nuclei per 256 x 256 px over ``patches`` patches (mean, standard deviation,
    quartiles); ``nn_distance_*`` are in px over all nuclei; ``coverage_quartiles`` is the
    percentage of patch pixels inside nuclei. ``source`` says what the figures were measured
    on; ``notes`` what could not be fitted (e.g. a class with too few whole nuclei borrows
    the pooled size and shape).
    """

    class_set: ClassSet
    classes: tuple[NucleusStats, ...]
    pooled: NucleusStats
    patches: int
    nuclei_per_patch_mean: float
    nuclei_per_patch_sd: float
    nuclei_per_patch_quartiles: tuple[float, float, float]
    nn_distance_quartiles: tuple[float, float, float]
    nn_distance_p01: float
    coverage_quartiles: tuple[float, float, float]
    source: dict[str, Any] = field(default_factory=dict, compare=False)
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if len(self.classes) != self.class_set.num_classes:
            raise StatsError(f"layout statistics: {len(self.classes)} class entries for the "
                             f"{self.class_set.num_classes} classes of class set {self.class_set.name!r}")
        for k, (st, name) in enumerate(zip(self.classes, self.class_set.names), start=1):
            if st.name != name:
                raise StatsError(f"layout statistics: class {k} is {name!r} in the class set but its "
                                 f"statistics are named {st.name!r}")

    @property
    def nuclei_per_patch_median(self) -> float:
        """Median nuclei per 256 x 256 px: the generator's default density."""
        return self.nuclei_per_patch_quartiles[1]

    def _own_index(self, name: str) -> int | None:
        own = [n.lower() for n in self.class_set.names]
        name = name.lower()
        if name in own:
            return own.index(name)
        profile = _PROFILE_OF_NAME.get(name)
        return own.index(profile) if profile in own else None

    def nucleus(self, class_set: ClassSet, k: int) -> NucleusStats:
        """The statistics for class ``k`` (1-based; 0 = unknown) of ``class_set``: the class
        of the same name here (case-insensitive), else the class of its CoNSeP-like profile
        (e.g. "connective" -> "spindle", "lymphocyte" -> "inflammatory") when present, else
        the pooled statistics."""
        if k == 0:
            return self.pooled
        i = self._own_index(class_set.names[k - 1])
        return self.pooled if i is None else self.classes[i]

    def class_shares(self, class_set: ClassSet) -> np.ndarray:
        """Share of each class 1..K of ``class_set`` (sums to 1): the measured mix when every
        class of ``class_set`` is a class here by name, else equal shares."""
        own = [n.lower() for n in self.class_set.names]
        k = class_set.num_classes
        if all(n.lower() in own for n in class_set.names):
            s = np.array([self.classes[own.index(n.lower())].share for n in class_set.names], np.float64)
            if s.sum() > 0:
                return s / s.sum()
        return np.full(k, 1.0 / k)

    def describe(self) -> str:
        """One line: what the statistics were measured on."""
        what = self.source.get("description") or self.source.get("path") or "unknown source"
        split = self.source.get("split")
        return (f"{what}{f' (split {split})' if split else ''}: {self.patches} patches, "
                f"{self.pooled.count} nuclei, classes {', '.join(self.class_set.names)}")

    # -------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict; :meth:`from_dict` reads it back."""
        d: dict[str, Any] = {"format": STATS_FORMAT, "version": STATS_VERSION}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "class_set":
                v = v.to_dict()
            elif f.name in ("classes",):
                v = [s.to_dict() for s in v]
            elif f.name == "pooled":
                v = v.to_dict()
            elif isinstance(v, tuple):
                v = list(v)
            d[f.name] = v
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str = "layout statistics") -> "LayoutStats":
        """Inverse of :meth:`to_dict`, validating every figure; raises :class:`StatsError`
        naming ``where`` and what is wrong."""
        keys = {f.name for f in fields(cls)} - {"source", "notes"} | {"format", "version"}
        d = _mapping(d, where, keys)
        if d["format"] != STATS_FORMAT:
            raise StatsError(f"{where}: not layout statistics (format {d['format']!r}, expected {STATS_FORMAT!r})")
        if not isinstance(d["version"], int) or d["version"] > STATS_VERSION:
            raise StatsError(f"{where}: version {d['version']!r}; this nucsynth reads versions up to {STATS_VERSION}")
        try:
            class_set = ClassSet.from_dict(_mapping(d["class_set"], f"{where}: class_set", {"name", "names", "colours"}))
        except (LayoutError, TypeError, ValueError) as e:
            raise StatsError(f"{where}: class_set: {e}") from None
        entries = d["classes"]
        if not isinstance(entries, list):
            raise StatsError(f"{where}: 'classes' must be a list (one entry per class), got {type(entries).__name__}")
        classes = tuple(NucleusStats.from_dict(e, f"{where}: classes[{i}]") for i, e in enumerate(entries))
        source, notes = d.get("source", {}), d.get("notes", [])
        if not isinstance(source, Mapping):
            raise StatsError(f"{where}: 'source' must be a JSON object, got {type(source).__name__}")
        if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
            raise StatsError(f"{where}: 'notes' must be a list of strings, got {notes!r}")
        try:
            return cls(
                class_set=class_set,
                classes=classes,
                pooled=NucleusStats.from_dict(d["pooled"], f"{where}: pooled"),
                patches=_count(d, "patches", where),
                nuclei_per_patch_mean=_number(d, "nuclei_per_patch_mean", where, 0.0),
                nuclei_per_patch_sd=_number(d, "nuclei_per_patch_sd", where, 0.0),
                nuclei_per_patch_quartiles=_quartiles(d, "nuclei_per_patch_quartiles", where, 0.0),
                nn_distance_quartiles=_quartiles(d, "nn_distance_quartiles", where, 0.0),
                nn_distance_p01=_number(d, "nn_distance_p01", where, 0.0),
                coverage_quartiles=_quartiles(d, "coverage_quartiles", where, 0.0),
                source=dict(source),
                notes=tuple(notes),
            )
        except StatsError as e:
            raise StatsError(str(e) if str(e).startswith(where) else f"{where}: {e}") from None

    @classmethod
    def load(cls, path: str | Path) -> "LayoutStats":
        """Read and validate a statistics file written by :meth:`save`."""
        p = Path(path)
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"layout statistics file {p} does not exist") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise StatsError(f"layout statistics {p}: not a JSON file ({e})") from None
        return cls.from_dict(d, where=f"layout statistics {p}")

    def save(self, path: str | Path, overwrite: bool = False, option: str = "--out") -> Path:
        """Write the statistics as JSON (an existing file only with ``overwrite``; the old
        file stays until the new one is complete)."""
        from nucsynth.outputs import write_json

        return write_json(path, self.to_dict(), overwrite, option)


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

# The built-in default: the constants above as one statistics object.
CONSEP_LAYOUT_STATS = LayoutStats(
    class_set=CONSEP_CLASSES,
    classes=tuple(CONSEP_STATS[n] for n in CONSEP_CLASSES.names),
    pooled=POOLED_STATS,
    patches=432,
    nuclei_per_patch_mean=NUCLEI_PER_PATCH_MEAN,
    nuclei_per_patch_sd=NUCLEI_PER_PATCH_SD,
    nuclei_per_patch_quartiles=NUCLEI_PER_PATCH_QUARTILES,
    nn_distance_quartiles=NN_DISTANCE_QUARTILES,
    nn_distance_p01=NN_DISTANCE_P01,
    coverage_quartiles=NUCLEAR_COVERAGE_QUARTILES,
    source={"description": "built-in CoNSeP statistics (432 training patches, Graham et al. 2019)",
            "builtin": "consep"},
)


def stats_for_class(class_set: ClassSet, k: int, stats: LayoutStats | None = None) -> NucleusStats:
    """The statistics used for class ``k`` (1-based; 0 = unknown) of ``class_set``, from
    ``stats`` (default: the built-in CoNSeP statistics); see :meth:`LayoutStats.nucleus`."""
    return (stats or CONSEP_LAYOUT_STATS).nucleus(class_set, k)


def arrangement_for_class(class_set: ClassSet, k: int) -> str:
    """Clustered arrangement of class ``k``: "gland" (epithelial-like names), "stream"
    (spindle-like), "clump" (inflammatory-like) or "scatter" (any other name, class 0)."""
    p = _profile(class_set, k)
    return _ARRANGEMENT_OF_PROFILE[p] if p else "scatter"


def default_class_shares(class_set: ClassSet, stats: LayoutStats | None = None) -> np.ndarray:
    """Share of each class 1..K: the mix measured by ``stats`` (default: CoNSeP) when it
    names every class of ``class_set``, else equal shares."""
    return (stats or CONSEP_LAYOUT_STATS).class_shares(class_set)


def find_layout_stats(checkpoint: str | Path) -> tuple[LayoutStats, Path | None]:
    """The statistics beside a checkpoint folder: its own ``layout_stats.json``, else the
    one of its run folder (``RUN/checkpoints/step_N`` -> ``RUN``), else the built-in CoNSeP
    statistics. Returns ``(stats, file or None)``; a file that is there but invalid raises
    :class:`StatsError` (never a silent fallback)."""
    ckpt = Path(checkpoint)
    folder = ckpt if ckpt.is_dir() else ckpt.parent
    candidates = [folder / LAYOUT_STATS_FILE]
    if folder.parent.name == "checkpoints":
        candidates.append(folder.parent.parent / LAYOUT_STATS_FILE)
    for c in candidates:
        if c.is_file():
            return LayoutStats.load(c), c
    return CONSEP_LAYOUT_STATS, None
