"""Fit the layout generator's statistics (:class:`~nucsynth.generate.stats.LayoutStats`) to
real annotated data: any Samples or Layouts, or one split of a dataset store.

Definitions (the same as the built-in CoNSeP constants):

- every nucleus with pixels is measured with ``skimage.measure.regionprops``: area (px),
  axis ratio (major / minor axis of the moment ellipse), eccentricity, solidity, centroid;
- size and shape figures use only whole nuclei (not touching the patch border);
- class shares, densities and spacings use every nucleus; the density is nuclei per
  256 x 256 px (a patch's count scaled by 65536 / its pixels);
- spacing is the distance from each centroid to the nearest other centroid of the same
  patch; ``nn_same_class`` the share of nuclei whose nearest neighbour has their class
  (nuclei alone in their patch count as "not the same", as in the original measurement);
- coverage is the percentage of a patch's pixels inside nuclei;
- a padded patch is measured on its source pixels only
  (:func:`nucsynth.data.tiling.crop_to_source`): mirrored nuclei are not data.

A class with fewer than :data:`MIN_FIT_NUCLEI` whole nuclei borrows the pooled size and
shape (and with fewer spaced nuclei, the pooled spacing); the statistics' ``notes`` say so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
from scipy.spatial import cKDTree
from skimage.measure import regionprops

from nucsynth.data.tiling import crop_to_source
from nucsynth.generate.stats import PATCH_AREA, LayoutStats, NucleusStats, StatsError
from nucsynth.layout import ClassSet, Layout, Sample

__all__ = ["MIN_FIT_NUCLEI", "Measurements", "measure_layouts", "fit_layout_stats", "fit_source_stats", "stats_table",
           "write_run_stats"]

# Fewer whole nuclei than this give no stable quartiles: the class borrows the pooled figures.
MIN_FIT_NUCLEI = 10
# Columns of Measurements.rows.
_CLASS, _AREA, _RATIO, _ECC, _SOLID, _BORDER, _NN, _SAME = range(8)


@dataclass(frozen=True)
class Measurements:
    """Per-nucleus rows (M, 8): class, area, axis ratio, eccentricity, solidity (NaN for a
    nucleus cut by the border), touches the border (0/1), nearest-neighbour distance (px, NaN when alone), nearest neighbour of the
    same class (0/1); and per patch (P,): nuclei per 256 x 256 px and nuclear coverage (0-1)."""

    class_set: ClassSet
    rows: np.ndarray
    density: np.ndarray
    coverage: np.ndarray


def _layouts(source: Iterable[Sample | Layout]) -> Iterable[Layout]:
    for i, item in enumerate(source):
        lay = crop_to_source(item.layout, item.provenance) if isinstance(item, Sample) else item
        if not isinstance(lay, Layout):
            raise StatsError(f"item {i} of the source is a {type(item).__name__}, not a Sample or Layout")
        yield lay


def measure_layouts(source: Iterable[Sample | Layout], progress: Callable[[int], None] | None = None) -> Measurements:
    """Measure every nucleus and patch of ``source`` (all of one class set, matched by
    name). ``progress(i)`` after patch i. Raises :class:`StatsError` for an empty source or
    a layout of another class set."""
    rows: list[tuple[float, ...]] = []
    density, coverage = [], []
    class_set: ClassSet | None = None
    for i, lay in enumerate(_layouts(source)):
        if class_set is None:
            class_set = lay.class_set
        elif lay.class_set.names != class_set.names:
            raise StatsError(f"patch {i} has classes {list(lay.class_set.names)} but patch 0 has "
                             f"{list(class_set.names)}: statistics are fitted on one class set")
        inst = lay.inst_map
        h, w = inst.shape
        coverage.append(float((inst > 0).mean()))
        props = regionprops(inst)
        density.append(len(props) * PATCH_AREA / (h * w))
        if props:
            cen = np.array([p.centroid for p in props])
            cls = lay.classes[np.array([p.label for p in props]) - 1]
            if len(props) > 1:
                d, j = cKDTree(cen).query(cen, k=2)
                nn, same = d[:, 1], cls[j[:, 1]] == cls
            else:
                nn, same = np.full(1, np.nan), np.zeros(1, bool)
            for p, c, dn, sm in zip(props, cls, nn, same):
                y0, x0, y1, x1 = p.bbox
                if y0 == 0 or x0 == 0 or y1 == h or x1 == w:  # cut by the border: no shape figures
                    rows.append((c, p.area, np.nan, np.nan, np.nan, True, dn, sm))
                    continue
                minor = max(p.axis_minor_length, 1e-6)  # a one-pixel-wide nucleus has no minor axis
                rows.append((c, p.area, p.axis_major_length / minor, p.eccentricity, p.solidity, False, dn, sm))
        if progress is not None:
            progress(i)
    if class_set is None:
        raise StatsError("the source holds no patches: nothing to fit layout statistics on")
    return Measurements(class_set, np.array(rows, np.float64).reshape(-1, 8), np.array(density), np.array(coverage))


def _q(a: np.ndarray) -> tuple[float, float, float]:
    q = np.percentile(a, [25, 50, 75])
    return float(q[0]), float(q[1]), float(q[2])


def _nucleus_stats(name: str, sel: np.ndarray, m: Measurements, pooled: NucleusStats | None,
                   notes: list[str]) -> NucleusStats:
    """Statistics of the nuclei ``sel`` (a boolean mask over ``m.rows``)."""
    rows, total = m.rows, len(m.rows)
    count = int(sel.sum())
    whole = rows[sel & (rows[:, _BORDER] == 0)]
    nn = rows[sel, _NN]
    nn = nn[np.isfinite(nn)]
    size: dict[str, Any]
    if len(whole) >= MIN_FIT_NUCLEI or pooled is None:
        if len(whole) == 0:
            raise StatsError("no whole nucleus (one not touching its patch border) in the source: "
                             "nothing to fit nucleus sizes on")
        la = np.log(whole[:, _AREA])
        size = dict(area_quartiles=_q(whole[:, _AREA]), log_area_mu=float(la.mean()), log_area_sigma=float(la.std()),
                    axis_ratio_quartiles=_q(whole[:, _RATIO]),
                    eccentricity_median=float(np.median(whole[:, _ECC])),
                    solidity_median=float(np.median(whole[:, _SOLID])))
    else:
        notes.append(f"class {name!r}: {len(whole)} whole nuclei (< {MIN_FIT_NUCLEI}): pooled size and shape used")
        size = dict(area_quartiles=pooled.area_quartiles, log_area_mu=pooled.log_area_mu,
                    log_area_sigma=pooled.log_area_sigma, axis_ratio_quartiles=pooled.axis_ratio_quartiles,
                    eccentricity_median=pooled.eccentricity_median, solidity_median=pooled.solidity_median)
    if len(nn) >= MIN_FIT_NUCLEI or (pooled is None and len(nn)):
        spacing = dict(nn_distance_quartiles=_q(nn), nn_same_class=float(rows[sel, _SAME].mean()))
    elif pooled is not None:
        notes.append(f"class {name!r}: {len(nn)} nuclei with a neighbour (< {MIN_FIT_NUCLEI}): pooled spacing used")
        spacing = dict(nn_distance_quartiles=pooled.nn_distance_quartiles, nn_same_class=pooled.nn_same_class)
    else:
        raise StatsError("no patch of the source holds two nuclei: nothing to fit spacings on")
    return NucleusStats(name, count, count / total if total else 0.0, **size, **spacing)


def fit_layout_stats(source: Iterable[Sample | Layout] | Measurements, info: dict[str, Any] | None = None,
                     progress: Callable[[int], None] | None = None) -> LayoutStats:
    """Fit :class:`LayoutStats` to the layouts of ``source`` (Samples, Layouts, or their
    :class:`Measurements`), for their class set. ``info`` (JSON-friendly: path, split, ...)
    is kept as the statistics' ``source`` with the counts (no date: the same data gives
    the same file). Raises
    :class:`StatsError` when the source has no patches, no whole nucleus or no patch with
    two nuclei."""
    m = source if isinstance(source, Measurements) else measure_layouts(source, progress)
    rows = m.rows
    notes: list[str] = []
    pooled = _nucleus_stats("all", np.ones(len(rows), bool), m, None, notes)
    classes = tuple(_nucleus_stats(name, rows[:, _CLASS] == k, m, pooled, notes)
                    for k, name in enumerate(m.class_set.names, start=1))
    nn_all = rows[np.isfinite(rows[:, _NN]), _NN]
    src = {**(info or {}), "patches": int(len(m.density)), "nuclei": int(len(rows))}
    return LayoutStats(
        class_set=m.class_set, classes=classes, pooled=pooled, patches=int(len(m.density)),
        nuclei_per_patch_mean=float(m.density.mean()), nuclei_per_patch_sd=float(m.density.std()),
        nuclei_per_patch_quartiles=_q(m.density), nn_distance_quartiles=_q(nn_all),
        nn_distance_p01=float(np.percentile(nn_all, 1)), coverage_quartiles=_q(100 * m.coverage),
        source=src, notes=tuple(notes),
    )


def fit_source_stats(path: str | Path, split: str | None = None,
                     progress: Callable[[int, int], None] | None = None) -> LayoutStats:
    """Fit :class:`LayoutStats` to a dataset store (one ``split``, default ``"train"``;
    ``"all"``: every patch) or to any dataset folder :mod:`nucsynth.io` reads (no split).
    ``progress(done, total)`` per patch. Errors (``ValueError`` / ``OSError``) name the path
    and what was expected."""
    from nucsynth.io.sources import read_layout_source, source_kind

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist (expected a dataset store or a dataset folder)")
    kind = source_kind(p)
    if kind in ("csv", "geojson"):
        raise StatsError(f"{p} is one {kind.upper()} canvas; fit layout statistics on a dataset store or folder")
    if kind == "store":
        split = split or "train"
    elif split not in (None, "all"):
        raise StatsError(f"--split {split} applies to a dataset store; {p} is a {kind} dataset (all of it is used)")
    src = read_layout_source(p, split=None if split == "all" else split)
    report = None if progress is None else (lambda i: progress(i + 1, len(src.items)))
    info = {"path": str(p), "kind": kind, **({"split": split} if split else {})}
    return fit_layout_stats(src.items, info=info, progress=report)


def stats_table(stats: LayoutStats) -> str:
    """A readable table of ``stats`` (one line per class, then the pooled figures)."""
    lines = [f"patches: {stats.patches}, nuclei: {stats.pooled.count}, nuclei per 256 px patch: "
             f"mean {stats.nuclei_per_patch_mean:.1f}, sd {stats.nuclei_per_patch_sd:.1f}, "
             f"quartiles {_fmt(stats.nuclei_per_patch_quartiles)}",
             "class: count share | area q25/q50/q75 | log-area mu sigma | axis ratio q25/q50/q75 | "
             "eccentricity median | solidity median | nn dist q25/q50/q75 | nn same-class share"]
    for k, s in [*enumerate(stats.classes, start=1), (0, stats.pooled)]:
        lines.append(f"{k} {s.name}: {s.count} {s.share:.4f} | {_fmt(s.area_quartiles)} | {s.log_area_mu:.3f} "
                     f"{s.log_area_sigma:.3f} | {_fmt(s.axis_ratio_quartiles, 2)} | {s.eccentricity_median:.3f} | "
                     f"{s.solidity_median:.3f} | {_fmt(s.nn_distance_quartiles)} | {s.nn_same_class:.3f}")
    lines.append(f"all: nn dist quartiles {_fmt(stats.nn_distance_quartiles)}, 1st percentile "
                 f"{stats.nn_distance_p01:.1f}; nucleus pixel coverage per patch quartiles "
                 f"{_fmt(stats.coverage_quartiles)} %")
    lines += [f"note: {n}" for n in stats.notes]
    return "\n".join(lines)


def _fmt(q: tuple[float, float, float], digits: int = 1) -> str:
    return " / ".join(f"{v:.{digits}f}" for v in q)


def write_run_stats(source: Iterable[Sample | Layout], folder: str | Path, info: dict[str, Any] | None = None,
                    keep: bool = False) -> tuple[Path | None, str]:
    """Fit the statistics of a training source and write them as ``folder/layout_stats.json``
    (what :func:`nucsynth.generate.stats.find_layout_stats` finds beside the run's
    checkpoints). ``keep``: an existing file is left as it is (a resumed run). Returns
    ``(file or None, one line saying what happened)``; a source with nothing to fit is
    reported, not raised, so training goes on."""
    from nucsynth.generate.stats import LAYOUT_STATS_FILE

    path = Path(folder) / LAYOUT_STATS_FILE
    if keep and path.is_file():
        return path, f"layout statistics: kept {path}"
    try:
        stats = fit_layout_stats(source, info=info)
    except StatsError as e:
        return None, f"layout statistics not written ({e}); generated layouts will use the built-in CoNSeP ones"
    stats.save(path, overwrite=True)
    return path, f"layout statistics of the training patches: {path} ({stats.describe()})"
