"""QuPath GeoJSON (Bankhead et al. 2017): nucleus polygons with a classification.

Reads a ``FeatureCollection`` (or a bare list of Features, as older QuPath versions
export). Each Feature with a ``Polygon`` or ``MultiPolygon`` geometry is one nucleus, in
file order (ids 1..N); a ``Point`` geometry is a nucleus given by its centroid only (a
point layout). For QuPath *cell* objects the ``nucleusGeometry`` member (top level or in
``properties``) is used instead of the cell outline.

Coordinates: GeoJSON positions are **(x, y)**. QuPath puts the origin at the top-left
*corner* of the top-left pixel, so pixel (row r, col c) spans x in [c, c+1), y in
[r, r+1) and its centre is (c + 0.5, r + 0.5). The reader subtracts 0.5 to reach the
engine's pixel-centre (y, x) frame and the writer adds it back
(``pixel_corner_origin=False`` turns this off for tools that use pixel centres).
Rasterization follows :mod:`nucsynth.io._polygons`: pixel centre inside, later feature
wins on overlap, degenerate polygons keep one pixel, holes are honoured.

Classes: ``properties.classification.name`` is looked up (case-insensitively) in
``class_set``; a name it lacks is an error. Without ``class_set`` the class set stored by
:func:`write_geojson` is used, or else one is built from the names in order of first
appearance (colours from ``classification.color``, an [r, g, b] list or a packed RGB int).
Unclassified features get class 0 (unknown).

The writer emits one ``detection`` Feature per nucleus whose outline is the 0.5 iso-line
of its mask (so reading it back gives the same pixels), ``MultiPolygon`` for nuclei in
several pieces, ``Point`` for nuclei without pixels, and keeps the class set and canvas
size in a ``"nucsynth"`` member of the collection so a round trip is exact.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy import ndimage as ndi

from nucsynth.io._common import read_image, write_text_atomic
from nucsynth.io._polygons import mask_outlines, rasterize_polygons
from nucsynth.io.errors import FormatError
from nucsynth.layout import ClassSet, Layout, LayoutError, Sample

__all__ = ["read_geojson", "write_geojson"]

_DEFAULT_COLOURS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255), (255, 128, 0), (128, 0, 255))


def _colour(value: Any, k: int) -> tuple[int, int, int]:
    if isinstance(value, (list, tuple)) and len(value) >= 3:
        return tuple(int(v) & 0xFF for v in value[:3])  # type: ignore[return-value]
    if isinstance(value, (int, np.integer)):
        v = int(value) & 0xFFFFFF  # QuPath packs (A)RGB into a (possibly negative) int
        return ((v >> 16) & 0xFF, (v >> 8) & 0xFF, v & 0xFF)
    return _DEFAULT_COLOURS[k % len(_DEFAULT_COLOURS)]


def _features(path: Path, doc: Any) -> list[dict[str, Any]]:
    if isinstance(doc, list):
        feats = doc
    elif isinstance(doc, dict) and doc.get("type") == "FeatureCollection":
        feats = doc.get("features")
        if not isinstance(feats, list):
            raise FormatError(path, "FeatureCollection has no 'features' list")
    elif isinstance(doc, dict) and doc.get("type") == "Feature":
        feats = [doc]
    else:
        raise FormatError(path, "expected a GeoJSON FeatureCollection, a Feature, or a list of Features")
    for k, f in enumerate(feats):
        if not isinstance(f, dict) or f.get("type") != "Feature":
            raise FormatError(path, f"item {k} is not a GeoJSON Feature")
    return feats


def _ring(path: Path, coords: Any, k: int, off: float) -> np.ndarray:
    try:
        arr = np.asarray(coords, dtype=np.float64)
    except (TypeError, ValueError):
        raise FormatError(path, f"feature {k}: ring coordinates are not numeric [x, y] pairs") from None
    if arr.ndim != 2 or arr.shape[1] < 2 or not np.all(np.isfinite(arr)):
        raise FormatError(path, f"feature {k}: a ring must be a list of finite [x, y] positions, got shape {arr.shape}")
    return np.stack([arr[:, 1] - off, arr[:, 0] - off], axis=1)


def _geometry(path: Path, f: dict[str, Any], k: int, off: float) -> tuple[list, np.ndarray | None]:
    """(parts, point): polygon parts [(exterior, holes)] or a single (y, x) point."""
    geom = f.get("nucleusGeometry") or (f.get("properties") or {}).get("nucleusGeometry") or f.get("geometry")
    if not isinstance(geom, dict) or "type" not in geom:
        raise FormatError(path, f"feature {k} has no geometry")
    t, coords = geom["type"], geom.get("coordinates")
    if not isinstance(coords, list):
        raise FormatError(path, f"feature {k}: geometry has no coordinates list")
    if t == "Polygon":
        polys = [coords]
    elif t == "MultiPolygon":
        polys = coords
    elif t == "Point":
        p = _ring(path, [coords], k, off)[0]
        return [], p
    else:
        raise FormatError(path, f"feature {k}: geometry type {t!r} is not a nucleus (Polygon, MultiPolygon or Point)")
    parts = []
    for poly in polys:
        if not isinstance(poly, list) or not poly:
            raise FormatError(path, f"feature {k}: a polygon needs at least an exterior ring")
        rings = [_ring(path, r, k, off) for r in poly]
        parts.append((rings[0], rings[1:]))
    return parts, None


def _class_name(f: dict[str, Any]) -> tuple[str | None, Any]:
    c = (f.get("properties") or {}).get("classification")
    if isinstance(c, dict) and c.get("name"):
        return str(c["name"]), c.get("color", c.get("colorRGB"))
    if isinstance(c, str) and c:
        return c, None
    return None, None


def _resolve_classes(path: Path, doc: Any, feats: list[dict[str, Any]], class_set: ClassSet | None) -> tuple[ClassSet, np.ndarray]:
    named = [_class_name(f) for f in feats]
    if class_set is None and isinstance(doc, dict) and isinstance(doc.get("nucsynth"), dict) and "class_set" in doc["nucsynth"]:
        try:
            class_set = ClassSet.from_dict(doc["nucsynth"]["class_set"])
        except (LayoutError, TypeError, ValueError) as e:
            raise FormatError(path, f"stored class set is invalid: {e}") from None
    if class_set is None:
        names: list[str] = []
        colours: list[tuple[int, int, int]] = []
        for name, col in named:
            if name is not None and name not in names:
                names.append(name)
                colours.append(_colour(col, len(colours)))
        if not names:
            from nucsynth.layout import NUCLEUS_CLASSES

            return NUCLEUS_CLASSES, np.zeros(len(feats), np.int64)
        class_set = ClassSet(path.stem, tuple(names), tuple(colours))
    lookup = {n.lower(): i for i, n in enumerate(class_set.names, start=1)}
    classes = np.zeros(len(feats), np.int64)
    unknown: set[str] = set()
    for k, (name, _) in enumerate(named):
        if name is None:
            continue
        if name.lower() not in lookup:
            unknown.add(name)
        else:
            classes[k] = lookup[name.lower()]
    if unknown:
        raise FormatError(path, f"classification names {sorted(unknown)} are not in the class set {class_set.name!r} {list(class_set.names)}")
    return class_set, classes


def read_geojson(
    path: str | Path,
    image: np.ndarray | str | Path | None = None,
    shape: tuple[int, int] | None = None,
    class_set: ClassSet | None = None,
    pixel_corner_origin: bool = True,
) -> Sample | Layout:
    """Nuclei of a QuPath GeoJSON file: a Sample when ``image`` is given, else a Layout.

    The canvas is the image's size, else ``shape``, else the stored size written by
    :func:`write_geojson`, else just large enough for every feature (from the origin).
    A feature wholly off the canvas is an error.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no GeoJSON file at {path}")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(path, f"not valid JSON (truncated?): {e}") from None
    feats = _features(path, doc)
    off = 0.5 if pixel_corner_origin else 0.0
    geoms = [_geometry(path, f, k, off) for k, f in enumerate(feats)]
    cs, classes = _resolve_classes(path, doc, feats, class_set)
    img = None
    if image is not None:
        img = read_image(image) if isinstance(image, (str, Path)) else np.asarray(image)
        shape = img.shape[:2]
    elif shape is None and isinstance(doc, dict) and isinstance(doc.get("nucsynth"), dict) and "shape" in doc["nucsynth"]:
        shape = tuple(int(v) for v in doc["nucsynth"]["shape"])  # type: ignore[assignment]
    if shape is None:
        pts = [np.vstack([e for e, _ in parts]) if parts else p[None] for parts, p in geoms]
        top = np.vstack(pts).max(axis=0) if pts else np.zeros(2)
        shape = (max(1, int(np.floor(top[0] + 0.5)) + 1), max(1, int(np.floor(top[1] + 0.5)) + 1))
    h, w = int(shape[0]), int(shape[1])
    inst, drawn = rasterize_polygons([parts for parts, _ in geoms], (h, w))
    n = len(feats)
    cnt = np.bincount(inst.ravel(), minlength=n + 1)[1:].astype(np.float64)
    ys, xs = np.indices((h, w))
    sy = np.bincount(inst.ravel(), weights=ys.ravel(), minlength=n + 1)[1:]
    sx = np.bincount(inst.ravel(), weights=xs.ravel(), minlength=n + 1)[1:]
    cen = np.zeros((n, 2))
    for k, (parts, p) in enumerate(geoms):
        if p is not None:
            cen[k] = p
        elif not drawn[k]:
            raise FormatError(path, f"feature {k} lies wholly outside the {h}x{w} canvas")
        else:
            cen[k] = (sy[k] / cnt[k], sx[k] / cnt[k])
    try:
        layout = Layout(inst, classes, cen, cs)
        if img is None:
            return layout
        return Sample(layout, img, {"source": str(image) if not isinstance(image, np.ndarray) else None,
                                    "labels": str(path), "format": "geojson", "tile": path.stem})
    except LayoutError as e:
        raise FormatError(path, str(e)) from None


def _xy(ring: np.ndarray, y0: int, x0: int, off: float) -> list[list[float]]:
    pts = [[float(x + x0 + off), float(y + y0 + off)] for y, x in ring]
    if pts[0] != pts[-1]:
        pts.append(pts[0])
    return pts


def write_geojson(obj: Layout | Sample, path: str | Path, pixel_corner_origin: bool = True) -> None:
    """Write a Layout (or a Sample's layout) as a QuPath-readable FeatureCollection.

    The file is written through a temporary name and renamed, never half-written.
    """
    layout = obj.layout if isinstance(obj, Sample) else obj
    if not isinstance(layout, Layout):
        raise TypeError(f"write_geojson takes a Layout or a Sample, got {type(obj).__name__}")
    off = 0.5 if pixel_corner_origin else 0.0
    cs = layout.class_set
    objs = ndi.find_objects(layout.inst_map, max_label=layout.num_nuclei)
    feats = []
    for i in range(1, layout.num_nuclei + 1):
        sl: Sequence[slice] | None = objs[i - 1]
        if sl is None:
            cy, cx = layout.centroids[i - 1]
            geom: dict[str, Any] = {"type": "Point", "coordinates": [float(cx + off), float(cy + off)]}
        else:
            y0, x0 = sl[0].start, sl[1].start
            parts = mask_outlines(layout.inst_map[sl] == i)
            polys = [[_xy(e, y0, x0, off)] + [_xy(hh, y0, x0, off) for hh in holes] for e, holes in parts]
            geom = {"type": "Polygon", "coordinates": polys[0]} if len(polys) == 1 else {"type": "MultiPolygon", "coordinates": polys}
        props: dict[str, Any] = {"objectType": "detection", "nucsynth_id": i}
        k = int(layout.classes[i - 1])
        if k > 0:
            props["classification"] = {"name": cs.names[k - 1], "color": list(cs.colours[k - 1])}
        feats.append({"type": "Feature", "geometry": geom, "properties": props})
    doc = {"type": "FeatureCollection", "features": feats,
           "nucsynth": {"class_set": cs.to_dict(), "shape": list(layout.shape)}}
    write_text_atomic(path, json.dumps(doc))
