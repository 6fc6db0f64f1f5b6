"""Layout generators: random layouts, nuclei grown from points, and points from labels.

Sizes, shapes, the density and the class mix come from a :class:`LayoutStats`: fitted to the
user's own data (:mod:`nucsynth.generate.fit`) or, by default, the statistics measured on
real CoNSeP data (:mod:`nucsynth.generate.stats`). Every generator is deterministic for a
given seed and statistics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy import ndimage as ndi

from nucsynth.generate.stats import (
    CONSEP_LAYOUT_STATS,
    PATCH_AREA,
    LayoutStats,
    NucleusStats,
    arrangement_for_class,
)
from nucsynth.layout import ClassSet, Layout, LayoutError

__all__ = ["random_layout", "nuclei_from_points", "points_from_labels", "nucleus_shape"]

# Tries per nucleus before it is dropped (first from its arrangement, then anywhere).
_TRIES = 40
# Irregularity of the boundary: std of the relative amplitude of radial harmonics 2..6.
# Chosen so that generated nuclei have a median solidity near the measured 0.94-0.96.
_HARMONIC_SD = 0.035
# A nucleus cut by the canvas border is kept when at least this share of it is visible.
_MIN_VISIBLE = 0.5
_CROSS = ndi.generate_binary_structure(2, 1)


@dataclass(frozen=True)
class _Shape:
    mask: np.ndarray  # bool (h, w)
    centre: tuple[float, float]  # the intended centre (y, x) in mask coordinates


def nucleus_shape(stats: NucleusStats, rng: np.random.Generator, angle: float | None = None) -> np.ndarray:
    """A boolean mask of one nucleus drawn from ``stats`` (area, axis ratio, irregularity).

    ``angle`` (radians) orients the major axis; random when ``None``. The mask is cropped to
    the nucleus' bounding box plus a 1 px margin and holds one connected region.
    """
    return _sample_shape(stats, rng, angle).mask


def _sample_shape(stats: NucleusStats, rng: np.random.Generator, angle: float | None = None) -> _Shape:
    lo, hi = stats.log_area_mu - 2 * stats.log_area_sigma, stats.log_area_mu + 2 * stats.log_area_sigma
    area = max(12.0, math.exp(float(np.clip(rng.normal(stats.log_area_mu, stats.log_area_sigma), lo, hi))))
    ratio = float(np.clip(math.exp(rng.normal(stats.log_axis_ratio_mu, stats.log_axis_ratio_sigma)), 1.0, 3.5))
    b = math.sqrt(area / (math.pi * ratio))
    a = ratio * b
    theta = float(rng.uniform(0, math.pi)) if angle is None else float(angle)
    amps = rng.normal(0.0, _HARMONIC_SD, size=5)
    phases = rng.uniform(0, 2 * math.pi, size=5)
    r = int(math.ceil(a * 1.25)) + 2
    cy, cx = r + rng.uniform(-0.5, 0.5), r + rng.uniform(-0.5, 0.5)
    yy, xx = np.mgrid[0 : 2 * r + 1, 0 : 2 * r + 1].astype(np.float64)
    dy, dx = yy - cy, xx - cx
    # Image rows grow downwards: angle measured from +x towards +y (rows).
    u = (dx * math.cos(theta) + dy * math.sin(theta)) / a
    v = (-dx * math.sin(theta) + dy * math.cos(theta)) / b
    rho = np.hypot(u, v)
    # cos(k * phi + p) = Re(e^{ip} z^k) with z = e^{i phi}: no trigonometry per pixel.
    z = (u + 1j * v) / np.maximum(rho, 1e-12)
    zk = z * z
    wobble = np.zeros_like(rho)
    for i in range(5):
        wobble += amps[i] * (zk * complex(math.cos(phases[i]), math.sin(phases[i]))).real
        zk = zk * z
    mask = rho <= 1.0 + wobble
    mask[int(round(cy)), int(round(cx))] = True
    mask = _component_at(mask, (int(round(cy)), int(round(cx))))
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min() - 1, ys.max() + 2, xs.min() - 1, xs.max() + 2
    return _Shape(mask[y0:y1, x0:x1], (cy - y0, cx - x0))


def _component_at(mask: np.ndarray, yx: tuple[int, int]) -> np.ndarray:
    """The 4-connected component of ``mask`` containing pixel ``yx``."""
    lab, _ = ndi.label(mask, structure=_CROSS)
    return lab == lab[yx]


def _paste_window(shape_hw: tuple[int, int], mask: np.ndarray, top: int, left: int):
    """Slices of the canvas and of the mask where a mask placed at (top, left) is visible."""
    h, w = shape_hw
    mh, mw = mask.shape
    cy0, cx0 = max(top, 0), max(left, 0)
    cy1, cx1 = min(top + mh, h), min(left + mw, w)
    if cy0 >= cy1 or cx0 >= cx1:
        return None
    return (slice(cy0, cy1), slice(cx0, cx1)), (slice(cy0 - top, cy1 - top), slice(cx0 - left, cx1 - left))


# ---------------------------------------------------------------------------- random layouts
Proposal = Callable[[np.random.Generator], tuple[float, float, float | None]]


def _uniform_proposal(h: int, w: int) -> Proposal:
    return lambda rng: (rng.uniform(-0.5, h - 0.5), rng.uniform(-0.5, w - 0.5), None)


def _gland_proposal(h: int, w: int, n: int, stats: NucleusStats, rng: np.random.Generator) -> Proposal:
    """Epithelial nuclei on rings (gland cross-sections), long axis pointing to the lumen."""
    spacing = 2 * math.sqrt(math.exp(stats.log_area_mu) / math.pi) + 4
    glands = []
    while sum(2 * math.pi * g[2] for g in glands) < 1.1 * n * spacing:
        glands.append((rng.uniform(0, h), rng.uniform(0, w), rng.uniform(20, 45)))
    radii = np.array([g[2] for g in glands])
    p = radii / radii.sum()

    def propose(r: np.random.Generator) -> tuple[float, float, float | None]:
        gy, gx, rad = glands[int(r.choice(len(glands), p=p))]
        t = r.uniform(0, 2 * math.pi)
        d = rad + r.normal(0, 2.0)
        return gy + d * math.sin(t), gx + d * math.cos(t), t + r.normal(0, 0.2)

    return propose


def _stream_proposal(h: int, w: int, n: int, stats: NucleusStats, rng: np.random.Generator) -> Proposal:
    """Spindle nuclei along roughly parallel streams, long axis along the stream."""
    length = math.hypot(h, w)
    spacing = 2 * math.sqrt(math.exp(stats.log_area_mu) * stats.axis_ratio_quartiles[1] / math.pi) + 4
    k = max(1, math.ceil(1.2 * n * spacing / length))
    base = rng.uniform(0, math.pi)
    streams = [(rng.uniform(0, h), rng.uniform(0, w), base + rng.normal(0, 0.25)) for _ in range(k)]

    def propose(r: np.random.Generator) -> tuple[float, float, float | None]:
        sy, sx, psi = streams[int(r.integers(len(streams)))]
        t, off = r.uniform(-length / 2, length / 2), r.normal(0, 5.0)
        return (sy + t * math.sin(psi) + off * math.cos(psi), sx + t * math.cos(psi) - off * math.sin(psi),
                psi + r.normal(0, 0.15))

    return propose


def _clump_proposal(h: int, w: int, n: int, rng: np.random.Generator) -> Proposal:
    """Inflammatory nuclei in loose clumps."""
    centres = [(rng.uniform(0, h), rng.uniform(0, w)) for _ in range(max(1, math.ceil(n / 12)))]

    def propose(r: np.random.Generator) -> tuple[float, float, float | None]:
        cy, cx = centres[int(r.integers(len(centres)))]
        return cy + r.normal(0, 16.0), cx + r.normal(0, 16.0), None

    return propose


def _check_shares(class_shares, k: int) -> np.ndarray:
    s = np.asarray(class_shares, dtype=np.float64).reshape(-1)
    if s.shape != (k,) or not np.all(np.isfinite(s)) or (s < 0).any() or s.sum() <= 0:
        raise LayoutError(
            f"class_shares must be {k} finite non-negative numbers (one per class 1..{k}) with a positive sum, "
            f"got {np.asarray(class_shares).tolist()}"
        )
    return s / s.sum()


def _check_stats(stats: LayoutStats | None) -> LayoutStats:
    if stats is None:
        return CONSEP_LAYOUT_STATS
    if not isinstance(stats, LayoutStats):
        raise LayoutError(f"stats must be a LayoutStats (nucsynth.generate.stats), got {type(stats).__name__}")
    return stats


def random_layout(
    shape: tuple[int, int],
    class_set: ClassSet | None = None,
    density: float | None = None,
    class_shares=None,
    seed: int = 0,
    arrangement: str = "clustered",
    stats: LayoutStats | None = None,
) -> Layout:
    """A random layout of non-overlapping, ellipse-like nuclei with slightly irregular borders.

    ``stats`` (a :class:`LayoutStats`, e.g. fitted by :func:`nucsynth.generate.fit.fit_layout_stats`;
    default: the built-in CoNSeP statistics) gives every default below; ``class_set`` defaults
    to the statistics' own (CoNSeP for the built-in ones); its classes take the statistics of
    the class of the same name, else of a CoNSeP-like profile, else the pooled ones
    (:meth:`LayoutStats.nucleus`). ``density`` is the number of nuclei per 256 x 256 px
    (default: the statistics' median, 38.5 for CoNSeP); ``class_shares`` (K numbers,
    normalized here) sets the class mix (default: the measured mix when the statistics name
    every class, equal shares otherwise). Sizes and axis ratios are drawn per class from
    log-normal fits of the statistics. ``arrangement="clustered"`` puts
    epithelial-like nuclei on gland rings, spindle-like nuclei in oriented streams and
    inflammatory nuclei in loose clumps; ``"uniform"`` scatters every nucleus uniformly.
    Nuclei keep a 1 px gap between each other; nuclei may be cut by the canvas border (as in
    real patches). Nuclei that find no free place after a bounded number of tries are dropped,
    so very high densities give fewer nuclei than asked for.
    """
    if len(shape) != 2 or min(shape) < 8:
        raise LayoutError(f"shape must be (H, W) with H, W >= 8, got {shape}")
    if arrangement not in ("clustered", "uniform"):
        raise LayoutError(f"arrangement must be 'clustered' or 'uniform', got {arrangement!r}")
    st = _check_stats(stats)
    class_set = st.class_set if class_set is None else class_set
    h, w = int(shape[0]), int(shape[1])
    dens = st.nuclei_per_patch_median if density is None else float(density)
    if not math.isfinite(dens) or dens < 0:
        raise LayoutError(f"density must be a finite number of nuclei per 256x256 px >= 0, got {density}")
    k = class_set.num_classes
    shares = st.class_shares(class_set) if class_shares is None else _check_shares(class_shares, k)
    rng = np.random.default_rng(seed)
    n = int(round(dens * h * w / PATCH_AREA))
    classes = rng.choice(np.arange(1, k + 1), size=n, p=shares)
    nstats = {c: st.nucleus(class_set, c) for c in range(1, k + 1)}
    proposals: dict[int, Proposal] = {}
    for c in range(1, k + 1):
        m = int((classes == c).sum())
        kind = arrangement_for_class(class_set, c) if arrangement == "clustered" else "scatter"
        if kind == "gland" and m:
            proposals[c] = _gland_proposal(h, w, m, nstats[c], rng)
        elif kind == "stream" and m:
            proposals[c] = _stream_proposal(h, w, m, nstats[c], rng)
        elif kind == "clump" and m:
            proposals[c] = _clump_proposal(h, w, m, rng)
        else:
            proposals[c] = _uniform_proposal(h, w)
    anywhere = _uniform_proposal(h, w)
    # Big nuclei first: they are the hardest to fit.
    sizes = np.array([nstats[c].log_area_mu for c in classes])
    order = np.argsort(-sizes, kind="stable")
    inst = np.zeros((h, w), np.int32)
    blocked = np.zeros((h, w), bool)  # nuclei grown by 1 px: keeps a gap between nuclei
    placed: list[int] = []
    for i in order:
        c = int(classes[i])
        for attempt in range(2 * _TRIES):
            y, x, angle = (proposals[c] if attempt < _TRIES else anywhere)(rng)
            if not (-0.5 <= y <= h - 0.5 and -0.5 <= x <= w - 0.5):
                continue
            if blocked[min(int(round(y)), h - 1), min(int(round(x)), w - 1)]:
                continue  # cheap early rejection before drawing a shape
            sh = _sample_shape(nstats[c], rng, angle)
            top, left = int(round(y - sh.centre[0])), int(round(x - sh.centre[1]))
            win = _paste_window((h, w), sh.mask, top, left)
            if win is None:
                continue
            cwin, mwin = win
            part = sh.mask[mwin]
            if part.sum() < _MIN_VISIBLE * sh.mask.sum() or (blocked[cwin] & part).any():
                continue
            placed.append(c)
            inst[cwin][part] = len(placed)
            grown = ndi.binary_dilation(np.pad(sh.mask, 1), structure=_CROSS)
            gwin = _paste_window((h, w), grown, top - 1, left - 1)
            if gwin is not None:
                blocked[gwin[0]] |= grown[gwin[1]]
            break
    return Layout.from_inst_map(inst, np.asarray(placed, np.int64), class_set)


# ---------------------------------------------------------------------------- points <-> nuclei
def points_from_labels(layout: Layout) -> Layout:
    """A point layout with the same centroids and classes as ``layout`` and no pixels."""
    return Layout.from_points(layout.shape, layout.centroids.copy(), layout.classes.copy(), layout.class_set)


def _centroid_pixels(layout: Layout) -> np.ndarray:
    h, w = layout.shape
    yx = np.rint(layout.centroids).astype(np.int64)
    yx[:, 0] = yx[:, 0].clip(0, h - 1)
    yx[:, 1] = yx[:, 1].clip(0, w - 1)
    return yx


def nuclei_from_points(layout: Layout, seed: int = 0, stats: LayoutStats | None = None) -> Layout:
    """Grow a plausible nucleus at every centroid that has no pixels yet.

    Each point-only nucleus gets a shape drawn from its class statistics in ``stats``
    (default: the built-in CoNSeP statistics; see :meth:`LayoutStats.nucleus`; random orientation),
    centred on its centroid. Collisions are resolved by clipping every grown shape to its
    Voronoi cell (the pixels nearer to its centroid than to any other nucleus' centroid or
    painted pixels), so grown nuclei never overlap, and each keeps the connected part that
    contains its centroid pixel. Nuclei that already have pixels are kept exactly. Ids,
    classes and centroids (the given points) are unchanged.

    Raises :class:`LayoutError` when two point-only nuclei fall on the same pixel or a point
    lies on another nucleus' painted pixels (no nucleus could contain its centroid).
    """
    st = _check_stats(stats)
    areas = layout.areas()
    todo = np.flatnonzero(areas == 0)
    if todo.size == 0:
        return layout.replace()
    inst = layout.inst_map.copy()
    yx = _centroid_pixels(layout)
    seeds = inst.copy()
    for i in todo:
        y, x = yx[i]
        if seeds[y, x] != 0:
            other = int(seeds[y, x])
            what = "has its centroid on the same pixel" if areas[other - 1] == 0 else "lies on the painted pixels"
            raise LayoutError(
                f"nucleus {i + 1} at (y={y}, x={x}) {what} of nucleus {other}: move or delete one of them"
            )
        seeds[y, x] = i + 1
    # Voronoi owner of each pixel: the nucleus of the nearest seed pixel.
    _, (iy, ix) = ndi.distance_transform_edt(seeds == 0, return_indices=True)
    owner = seeds[iy, ix]
    rng = np.random.default_rng(seed)
    h, w = layout.shape
    for i in todo:
        sh = _sample_shape(st.nucleus(layout.class_set, int(layout.classes[i])), rng)
        cy, cx = layout.centroids[i]
        top, left = int(round(cy - sh.centre[0])), int(round(cx - sh.centre[1]))
        cwin, mwin = _paste_window((h, w), sh.mask, top, left)
        allowed = sh.mask[mwin] & (owner[cwin] == i + 1) & (layout.inst_map[cwin] == 0)
        grown = np.zeros((h, w), bool)
        grown[cwin] = allowed
        grown[tuple(yx[i])] = True
        inst[_component_at(grown, tuple(yx[i]))] = i + 1
    return Layout(inst, layout.classes.copy(), layout.centroids.copy(), layout.class_set)
