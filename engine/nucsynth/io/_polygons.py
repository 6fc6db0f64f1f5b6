"""Polygon <-> instance map conversions shared by the MoNuSeg XML and GeoJSON readers/writer.

Convention: polygon vertices are (y, x) in the engine's pixel-centre frame (pixel (r, c)
has its centre at (r, c)). A pixel belongs to a polygon when its centre lies inside
(:func:`skimage.draw.polygon`). Later polygons overwrite earlier ones where they overlap.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from skimage.draw import polygon as draw_polygon
from skimage.measure import find_contours

__all__ = ["rasterize_polygons", "mask_outlines"]


def _fallback_pixel(poly: np.ndarray, shape: tuple[int, int], inst: np.ndarray, areas: np.ndarray) -> tuple[int, int] | None:
    """A pixel for a polygon that covers no pixel centre: its rounded vertices (then its
    rounded vertex mean), the first that is background, else one owned by a nucleus that
    keeps at least one other pixel. None when the polygon lies wholly off the canvas."""
    h, w = shape
    cands = np.rint(np.vstack([poly, poly.mean(axis=0, keepdims=True)])).astype(np.int64)
    inside = (cands[:, 0] >= 0) & (cands[:, 0] < h) & (cands[:, 1] >= 0) & (cands[:, 1] < w)
    cands = cands[inside]
    if cands.size == 0:
        return None
    for y, x in cands:
        if inst[y, x] == 0:
            return int(y), int(x)
    for y, x in cands:
        if areas[inst[y, x]] > 1:
            return int(y), int(x)
    return None


Part = tuple[np.ndarray, Sequence[np.ndarray]]  # (exterior ring, hole rings), (y, x) vertices


def _draw_part(inst: np.ndarray, part: Part, value: int) -> None:
    """Set the pixels whose centre lies inside the exterior and outside every hole."""
    ext, holes = part
    if len(ext) < 3:
        return
    rr, cc = draw_polygon(ext[:, 0], ext[:, 1], shape=inst.shape)
    if rr.size == 0:
        return
    if len(holes):
        y0, x0 = rr.min(), cc.min()
        keep = np.zeros((rr.max() - y0 + 1, cc.max() - x0 + 1), bool)
        keep[rr - y0, cc - x0] = True
        for hole in holes:
            if len(hole) >= 3:
                hr, hc = draw_polygon(hole[:, 0] - y0, hole[:, 1] - x0, shape=keep.shape)
                keep[hr, hc] = False
        sel = keep[rr - y0, cc - x0]
        rr, cc = rr[sel], cc[sel]
    inst[rr, cc] = value


def rasterize_polygons(nuclei: Sequence[Sequence[Part]], shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Instance map (int32) with nucleus i drawn as id i+1; returns (inst_map, drawn).

    ``nuclei[i]`` is a list of parts ``(exterior, holes)``, each ring an (n, 2) array of
    (y, x) vertices (closing vertex optional); several parts make a multi-part nucleus.
    Overlaps: the later nucleus wins. A nucleus that covers no pixel centre (tiny or
    degenerate, e.g. a two-vertex polygon) or whose pixels were all taken by later nuclei
    still gets one pixel (see ``_fallback_pixel``), so the number of nuclei equals the
    number of polygons. ``drawn[i]`` is False only for a nucleus lying wholly off the canvas
    (its id then has no pixels).
    """
    h, w = shape
    inst = np.zeros((h, w), np.int32)
    for i, parts in enumerate(nuclei, start=1):
        for part in parts:
            _draw_part(inst, part, i)
    n = len(nuclei)
    areas = np.bincount(inst.ravel(), minlength=n + 1)
    drawn = areas[1:] > 0
    for i in np.flatnonzero(~drawn) + 1:
        verts = [np.asarray(ext, np.float64).reshape(-1, 2) for ext, _ in nuclei[i - 1]]
        if not verts or sum(len(v) for v in verts) == 0:
            continue
        pix = _fallback_pixel(np.vstack(verts), (h, w), inst, areas)
        if pix is not None:
            areas[inst[pix]] -= 1
            inst[pix] = i
            areas[i] = 1
            drawn[i - 1] = True
    return inst, drawn


def mask_outlines(mask: np.ndarray) -> list[tuple[np.ndarray, list[np.ndarray]]]:
    """Outlines of a binary mask as polygons: a list of (exterior, holes), rings in (y, x).

    Rings are the 0.5 iso-lines of the mask (marching squares, 4-connected foreground):
    they pass half-way between pixel centres, so rasterizing them back by the
    pixel-centre rule of :func:`rasterize_polygons` gives the mask exactly.
    """
    padded = np.pad(mask.astype(np.float32), 1)
    rings = [c - 1.0 for c in find_contours(padded, 0.5) if len(c) >= 4]
    # Shoelace sign separates exteriors from holes (find_contours orients them oppositely).
    def area(r: np.ndarray) -> float:
        y, x = r[:, 0], r[:, 1]
        return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))

    signed = [(r, area(r)) for r in rings]
    if not signed:
        return []
    ext_sign = np.sign(max(signed, key=lambda t: abs(t[1]))[1])
    exteriors = [r for r, a in signed if np.sign(a) == ext_sign]
    holes = [r for r, a in signed if np.sign(a) != ext_sign]
    out: list[tuple[np.ndarray, list[np.ndarray]]] = [(e, []) for e in exteriors]
    for hole in holes:  # attach each hole to the exterior that contains its first vertex
        from skimage.measure import points_in_poly

        for e, hs in out:
            if points_in_poly(hole[:1, ::-1], e[:, ::-1])[0]:
                hs.append(hole)
                break
    return out
