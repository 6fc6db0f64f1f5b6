"""Whole-image evaluation: the patches of one tile put back together, or pooled per tile.

HoVer-Net's figures (PQ 0.547 on CoNSeP) are means over WHOLE test images; a mean over
256 px patches is a different quantity (nuclei cut by the patch border, empty patches).
To set our figures beside published ones, the patches of each source tile (provenance
``"tile"``) are put back where they were cut:

1. :func:`tile_geometry`: the patch origins recorded by ``nucsynth prepare`` (provenance
   ``y0``, ``x0``) when the patches were cut from a larger image; otherwise
   :func:`infer_grid`, for patches cut on a regular ``r x r`` grid (row-major) with an
   unknown overlap: the stride is the one at which neighbouring patches agree best on
   their shared pixels, and that agreement is checked before it is used.
2. :func:`assemble_tile` builds the tile's image and labels: each pixel comes from the
   patch whose centre is nearest, and the pieces of one nucleus seen by several patches
   are joined by the source ids ``nucsynth prepare`` recorded (provenance ``source_ids``),
   else through the pixels they share (a connected-components graph): patches that only
   abut share no pixel, so without the record a nucleus they cut stays cut in two.

Either way only pixels of the source image are scored: a tile's padded rows and columns
(``nucsynth prepare`` pads the last patches of an image whose side is not a multiple of the
patch) are cut off truth and prediction (:func:`nucsynth.data.tiling.source_pairs`).

When neither works (the CoNSeP 256 px release: each tile's 16 patches are separate crops,
not cut on a grid, so there is no tile to rebuild), :func:`evaluate_tiles` pools the
patches of each tile instead: PQ from the tile's summed TP, FP, FN and IoU, Dice from its
summed areas, then the mean over tiles. That is the per-image protocol on each tile's
pixels, minus the nuclei the crops cut in two; the mode used is always reported.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from nucsynth.data.tiling import source_pairs
from nucsynth.layout import Layout, Sample, relabel_contiguous
from nucsynth.metrics import EMPTY_SCORE, evaluate_set, pq_from_counts

__all__ = ["TileGrid", "infer_grid", "recorded_offsets", "tile_geometry", "assemble_tile", "tile_groups", "tile_samples",
           "evaluate_tiles", "MAX_GRID_RESIDUAL"]

# Mean absolute difference (grey levels, 0-255) between neighbouring patches on their shared
# pixels above which a grid is refused: JPEG quality ~75 re-encoding of the same pixels
# gives about 2-4; unrelated image content gives 20-40.
MAX_GRID_RESIDUAL = 8.0


@dataclass(frozen=True)
class TileGrid:
    """Where the patches of one tile lie: ``offsets`` (n, 2) int (y0, x0) of each patch in
    the order given, the tile ``shape`` (H, W), the grid ``stride`` (px) and the
    ``residual``: mean absolute grey difference of neighbouring patches on their overlaps."""

    offsets: np.ndarray
    shape: tuple[int, int]
    stride: int
    residual: float


def _grey(image: np.ndarray) -> np.ndarray:
    return np.asarray(image, np.float32).mean(-1) if np.ndim(image) == 3 else np.asarray(image, np.float32)


def _overlap_residual(grid: list[list[np.ndarray]], stride: int) -> float:
    """Mean |difference| of horizontally and vertically adjacent patches on their overlap."""
    p = grid[0][0].shape[0]
    o = p - stride
    total, count = 0.0, 0
    r = len(grid)
    for i in range(r):
        for j in range(r):
            if j + 1 < r:
                d = np.abs(grid[i][j][:, stride:] - grid[i][j + 1][:, :o])
                total, count = total + float(d.sum()), count + d.size
            if i + 1 < r:
                d = np.abs(grid[i][j][stride:, :] - grid[i + 1][j][:o, :])
                total, count = total + float(d.sum()), count + d.size
    return total / count


def infer_grid(images: Sequence[np.ndarray], max_residual: float = MAX_GRID_RESIDUAL) -> TileGrid:
    """Place ``r * r`` square patches of one tile, given in row-major order, on a regular grid.

    Every stride from half the patch side to the side minus one is tried; the one where
    neighbouring patches differ least on their shared pixels wins. Raises ``ValueError``
    if the count is not a square above 1, the patches are not square and equal-sized, or
    the best residual exceeds ``max_residual`` grey levels (the patches do not overlap on
    a grid: then there is no honest way to rebuild the tile from them).
    """
    n = len(images)
    r = int(round(np.sqrt(n)))
    if n < 4 or r * r != n:
        raise ValueError(f"a tile grid needs r x r patches (r >= 2), got {n} patches")
    greys = [_grey(im) for im in images]
    shapes = {g.shape for g in greys}
    if len(shapes) != 1 or next(iter(shapes))[0] != next(iter(shapes))[1]:
        raise ValueError(f"tile patches must be square and of one size, got shapes {sorted(shapes)}")
    p = greys[0].shape[0]
    grid = [greys[i * r : (i + 1) * r] for i in range(r)]
    strides = list(range(max(1, p // 2), p))
    res = [_overlap_residual(grid, s) for s in strides]
    best = int(np.argmin(res))
    stride = strides[best]
    if res[best] > max_residual:
        raise ValueError(
            f"the {n} patches do not overlap on a regular {r}x{r} grid: the best stride ({stride} px) leaves a mean "
            f"difference of {res[best]:.1f} grey levels on shared pixels (at most {max_residual} expected)")
    offsets = np.array([(i * stride, j * stride) for i in range(r) for j in range(r)], np.int64)
    side = (r - 1) * stride + p
    return TileGrid(offsets, (side, side), stride, float(res[best]))


def _owner_map(offsets: np.ndarray, patch: tuple[int, int], shape: tuple[int, int]) -> np.ndarray:
    """(H, W) index of the patch whose centre is nearest (Chebyshev) among those covering each pixel."""
    h, w = shape
    ph, pw = patch
    ys, xs = np.arange(h)[:, None], np.arange(w)[None, :]
    best = np.full(shape, np.inf)
    owner = np.full(shape, -1, np.int64)
    for k, (y0, x0) in enumerate(offsets):
        inside = (ys >= y0) & (ys < y0 + ph) & (xs >= x0) & (xs < x0 + pw)
        d = np.maximum(np.abs(ys - (y0 + (ph - 1) / 2)), np.abs(xs - (x0 + (pw - 1) / 2)))
        take = inside & (d < best)
        best = np.where(take, d, best)
        owner = np.where(take, k, owner)
    if (owner < 0).any():
        raise ValueError("the patches leave part of the tile uncovered")
    return owner


def _recorded_ids(patches: Sequence[Sample]) -> list[np.ndarray] | None:
    """Each patch's ``source_ids`` (its nuclei's ids in the source image, local id i+1 ->
    entry i), or None when some patch lacks them or they do not match its nuclei."""
    out = []
    for p in patches:
        ids = p.provenance.get("source_ids")
        if ids is None or len(ids) != p.layout.num_nuclei:
            return None
        out.append(np.asarray(ids, np.int64))
    return out


def _link_instances(inst: Sequence[np.ndarray], offsets: np.ndarray,
                    source_ids: Sequence[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Join the pieces of one nucleus seen by several patches.

    Nodes are (patch, local id). With ``source_ids`` (:func:`_recorded_ids`) the pieces of
    one source nucleus are joined, exactly, whether the patches overlap or only abut.
    Without, two nodes are linked when they share pixels on the overlap of their patches
    and those shared pixels are the majority of the smaller piece there.
    Returns (node offset per patch (n + 1,), component label per node).
    """
    counts = [int(m.max()) + 1 for m in inst]  # local ids 0..max (0 unused)
    base = np.concatenate([[0], np.cumsum(counts)])
    if source_ids is not None:  # background node of patch k: key -(k + 1), never joined
        keys = np.concatenate([np.r_[-(k + 1), ids] for k, ids in enumerate(source_ids)])
        return base, np.unique(keys, return_inverse=True)[1].ravel()
    rows, cols = [], []
    n = len(inst)
    for a in range(n):
        for b in range(a + 1, n):
            (ya, xa), (yb, xb) = offsets[a], offsets[b]
            ha, wa = inst[a].shape
            hb, wb = inst[b].shape
            y0, y1 = max(ya, yb), min(ya + ha, yb + hb)
            x0, x1 = max(xa, xb), min(xa + wa, xb + wb)
            if y0 >= y1 or x0 >= x1:
                continue
            ia = inst[a][y0 - ya : y1 - ya, x0 - xa : x1 - xa].ravel().astype(np.int64)
            ib = inst[b][y0 - yb : y1 - yb, x0 - xb : x1 - xb].ravel().astype(np.int64)
            both = (ia > 0) & (ib > 0)
            if not both.any():
                continue
            pairs, shared = np.unique(ia[both] * counts[b] + ib[both], return_counts=True)
            pa, pb = pairs // counts[b], pairs % counts[b]
            area_a = np.bincount(ia, minlength=counts[a])[pa]
            area_b = np.bincount(ib, minlength=counts[b])[pb]
            keep = 2 * shared > np.minimum(area_a, area_b)
            rows.append(base[a] + pa[keep])
            cols.append(base[b] + pb[keep])
    total = int(base[-1])
    r = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    c = np.concatenate(cols) if cols else np.zeros(0, np.int64)
    graph = coo_matrix((np.ones(r.size), (r, c)), shape=(total, total))
    _, labels = connected_components(graph, directed=False)
    return base, labels


def assemble_tile(patches: Sequence[Sample], grid: TileGrid, provenance: dict | None = None) -> Sample:
    """The whole tile as one Sample: image and nuclei from the patches placed by ``grid``.

    Each tile pixel is taken from the patch whose centre is nearest; a nucleus cut by
    patch borders is one nucleus of the tile (pieces joined by :func:`_link_instances`);
    its class is that of its largest piece (all pieces agree when the patches come from
    one annotation).
    """
    if len(patches) != len(grid.offsets):
        raise ValueError(f"{len(patches)} patches but the grid places {len(grid.offsets)}")
    shape = grid.shape
    ph, pw = patches[0].layout.shape
    owner = _owner_map(grid.offsets, (ph, pw), shape)
    inst = [p.layout.inst_map for p in patches]
    base, comp = _link_instances(inst, grid.offsets, _recorded_ids(patches))
    image = np.zeros((*shape, 3), np.uint8)
    nodes = np.zeros(shape, np.int64)  # global node id of each tile pixel (0 = background node)
    bg = np.zeros(shape, bool)
    for k, ((y0, x0), p) in enumerate(zip(grid.offsets, patches)):
        sel = owner[y0 : y0 + ph, x0 : x0 + pw] == k
        image[y0 : y0 + ph, x0 : x0 + pw][sel] = p.image[sel]
        local = p.layout.inst_map[sel].astype(np.int64)
        nodes[y0 : y0 + ph, x0 : x0 + pw][sel] = base[k] + local
        bg[y0 : y0 + ph, x0 : x0 + pw][sel] = local == 0
    tile_inst = np.where(bg, 0, comp[nodes] + 1)
    tile_inst, old = relabel_contiguous(tile_inst)
    # class of each tile nucleus: the class of its largest piece among all patches
    node_class = np.zeros(int(base[-1]), np.int64)
    node_area = np.zeros(int(base[-1]), np.int64)
    for k, p in enumerate(patches):
        m = p.layout.inst_map.ravel()
        area = np.bincount(m, minlength=int(base[k + 1] - base[k]))
        node_area[base[k] + 1 : base[k + 1]] = area[1:]
        node_class[base[k] + 1 : base[k + 1]] = p.layout.classes[: int(base[k + 1] - base[k]) - 1]
    classes = np.zeros(old.size, np.int64)
    best_area = np.full(old.size, -1)
    lut = {int(c): i for i, c in enumerate(old - 1)}  # component label -> new id - 1
    for node in range(int(base[-1])):
        i = lut.get(int(comp[node]))
        if i is not None and node_area[node] > best_area[i]:
            best_area[i], classes[i] = node_area[node], node_class[node]
    layout = Layout.from_inst_map(tile_inst, classes, patches[0].layout.class_set)
    prov = {"assembled_from": len(patches), "stride": grid.stride, "grid_residual": round(grid.residual, 3)}
    sources = {tuple(p.provenance["source_shape"]) if "source_shape" in p.provenance else None for p in patches}
    if len(sources) == 1 and None not in sources:  # the tile's padding is not scored (tiling.source_extent)
        prov["source_shape"] = list(sources.pop())
    prov.update(provenance or {})
    return Sample(layout, image, prov)


_INDEX = re.compile(r"_(\d+)\.[^./\\]+$")


def tile_groups(source: Sequence[Sample]) -> dict[str, list[int]]:
    """Indices of the samples of each tile (provenance ``"tile"``, else ``"source"``: the
    image the patch came from), ordered by the patch number at the end of their source file
    name (``train_1_007.jpg`` -> 7), else as given."""
    groups: dict[str, list[tuple[int, int]]] = {}
    for i in range(len(source)):
        prov = source[i].provenance
        tile = prov.get("tile") or prov.get("source")
        if not tile:
            raise ValueError(f"sample {i} has neither 'tile' nor 'source' in its provenance: "
                             "cannot tell which patches form one image")
        m = _INDEX.search(str(prov.get("source", "")))
        groups.setdefault(str(tile), []).append((int(m.group(1)) if m else i, i))
    return {t: [i for _, i in sorted(v)] for t, v in sorted(groups.items())}


def recorded_offsets(patches: Sequence[Sample]) -> np.ndarray | None:
    """(n, 2) int (y0, x0) origins from the patches' provenance, or ``None`` when some
    patch lacks them or they do not place the patches at distinct positions."""
    try:
        off = np.array([(int(p.provenance["y0"]), int(p.provenance["x0"])) for p in patches], np.int64)
    except (KeyError, TypeError, ValueError):
        return None
    if len({tuple(o) for o in off.tolist()}) != len(patches):
        return None
    return off


def tile_geometry(patches: Sequence[Sample], max_residual: float = MAX_GRID_RESIDUAL) -> TileGrid:
    """Where the patches of one tile lie: the recorded origins (:func:`recorded_offsets`),
    else a regular grid found from the pixels (:func:`infer_grid`, which raises
    ``ValueError`` when the patches do not overlap on one)."""
    off = recorded_offsets(patches)
    if off is None:
        return infer_grid([p.image for p in patches], max_residual)
    shapes = {p.layout.shape for p in patches}
    if len(shapes) != 1:
        raise ValueError(f"the patches of a tile must share one size, got {sorted(shapes)}")
    ph, pw = next(iter(shapes))
    shape = (int(off[:, 0].max()) + ph, int(off[:, 1].max()) + pw)
    steps = np.diff(np.unique(off[:, 0]))
    return TileGrid(off, shape, int(steps.min()) if steps.size else ph, 0.0)


def tile_samples(source: Sequence[Sample], max_residual: float = MAX_GRID_RESIDUAL) -> list[Sample]:
    """Every tile of ``source`` reassembled (:func:`tile_geometry` + :func:`assemble_tile`),
    in tile-name order; each Sample's provenance names its tile and patch indices.
    Raises ``ValueError`` naming the first tile whose geometry cannot be found."""
    out = []
    for tile, idx in tile_groups(source).items():
        patches = [source[i] for i in idx]
        try:
            grid = tile_geometry(patches, max_residual)
        except ValueError as e:
            raise ValueError(f"tile {tile!r}: {e}") from None
        out.append(assemble_tile(patches, grid, {"tile": tile, "patches": idx}))
    return out


def evaluate_tiles(
    source: Sequence[Sample],
    segment: Callable[[list[np.ndarray]], list[Layout]],
    empty: float = EMPTY_SCORE,
    radius: float = 12.0,
) -> dict[str, Any]:
    """Whole-image figures of a segmenter on the tiles of ``source``.

    ``segment(images)`` maps uint8 RGB images (any size) to predicted Layouts. Mode
    ``"stitched"``: every tile is reassembled (:func:`tile_samples`), segmented whole and
    scored with :func:`nucsynth.metrics.evaluate_set` (one image per tile). Mode
    ``"tile-pooled"`` (some tile's patches cannot be placed): patches are segmented
    one by one and each tile's counts pooled; ``mean`` then holds per-tile Dice, DQ, SQ
    and PQ averaged over tiles. Detection and class F1 pool all nuclei either way.
    Returns ``{"mode", "reason", "n_tiles", "mean", "aggregate", "detection", "per_tile"}``.
    """
    try:
        tiles = tile_samples(source)
        reason = "patch geometry recorded or found: tiles reassembled and segmented whole"
    except ValueError as e:
        tiles, reason = None, f"tiles cannot be reassembled ({e}); each tile's patches pooled instead"
    if tiles is not None:
        truths, preds = source_pairs(tiles, segment([t.image for t in tiles]))
        res = evaluate_set(truths, preds, radius=radius, empty=empty)
        per_tile = [{"tile": t.provenance["tile"], **{k: m[k] for k in ("dice", "aji", "dq", "sq", "pq", "n_true", "n_pred")}}
                    for t, m in zip(tiles, res["per_image"])]
        return {"mode": "stitched", "reason": reason, "n_tiles": len(tiles), "mean": res["mean"],
                "aggregate": res["aggregate"], "detection": res["detection"], "per_tile": per_tile}
    groups = tile_groups(source)
    all_t, all_p, per_tile = [], [], []
    for tile, idx in groups.items():
        truths, preds = source_pairs([source[i] for i in idx], segment([source[i].image for i in idx]))
        res = evaluate_set(truths, preds, radius=radius, empty=empty)
        tp, fp, fn, iou = (sum(m[k] for m in res["per_image"]) for k in ("tp", "fp", "fn", "iou_sum"))
        d = _pooled_dice(truths, preds)
        pqd = {k: v for k, v in pq_from_counts(tp, fp, fn, iou, empty).items() if k in ("dq", "sq", "pq")}
        per_tile.append({"tile": tile, "patches": len(idx), "dice": d, **pqd, "n_true": sum(t.num_nuclei for t in truths),
                         "n_pred": sum(p.num_nuclei for p in preds)})
        all_t += truths
        all_p += preds
    keys = ("dice", "dq", "sq", "pq")
    mean = {k: float(np.mean([r[k] for r in per_tile])) for k in keys}
    whole = evaluate_set(all_t, all_p, radius=radius, empty=empty)
    return {"mode": "tile-pooled", "reason": reason, "n_tiles": len(per_tile), "mean": mean,
            "aggregate": whole["aggregate"], "detection": whole["detection"], "per_tile": per_tile}


def _pooled_dice(truths: Sequence[Layout], preds: Sequence[Layout]) -> float:
    """Binary Dice over all pixels of several images (as if they were one image)."""
    inter = sum(int(((t.inst_map > 0) & (p.inst_map > 0)).sum()) for t, p in zip(truths, preds))
    total = sum(int((t.inst_map > 0).sum() + (p.inst_map > 0).sum()) for t, p in zip(truths, preds))
    return 2 * inter / total if total else float("nan")
