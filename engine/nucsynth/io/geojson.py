"""QuPath GeoJSON (Bankhead et al. 2017): nuclei, their classes, and what else QuPath exports.

Reads a ``FeatureCollection`` (or a bare list of Features, as older QuPath versions
export; a UTF-8 byte-order mark is accepted). QuPath's object model is followed, by the
``objectType`` property (``object_type`` in QuPath 0.2):

- ``detection``: a nucleus (its Polygon / MultiPolygon);
- ``cell``: a nucleus given by its ``nucleusGeometry`` (the Feature's geometry is the whole
  cell); a cell without one is skipped;
- ``annotation``: a region drawn by hand, skipped by default (``annotations="regions"``
  returns them as :class:`Region` objects, ``annotations="nuclei"`` reads nuclei drawn by
  hand as annotations); a file holding only such annotations is refused with that advice;
- any ``Point`` / ``MultiPoint`` (QuPath's counting tool writes one MultiPoint annotation
  per class): every position is a nucleus given by its centre only (a point layout);
- ``tile``, TMA cores and other objects: skipped. A Feature without an object type (plain
  GeoJSON, or this module's writer) is a nucleus.

Nuclei keep file order (ids 1..N). :func:`read_qupath` returns the counts of every kind
(``summary``); :func:`read_geojson` warns with them (:class:`SkippedObjectsWarning`) when
something was skipped.

Coordinates: GeoJSON positions are **(x, y)**. QuPath puts the origin at the top-left
*corner* of the top-left pixel, so pixel (row r, col c) spans x in [c, c+1), y in
[r, r+1) and its centre is (c + 0.5, r + 0.5). The reader subtracts 0.5 to reach the
engine's pixel-centre (y, x) frame and the writer adds it back
(``pixel_corner_origin=False`` turns this off for tools that use pixel centres).
Rasterization follows :mod:`nucsynth.io._polygons`: pixel centre inside, later feature
wins on overlap, degenerate polygons keep one pixel, holes are honoured. Without an image
or ``shape`` the canvas spans the origin to the farthest nucleus and is refused beyond
:data:`MAX_AUTO_CANVAS` pixels (slide coordinates need the image or a canvas).

Classes: the class QuPath displays, derived classes included: ``classification.names``
(QuPath >= 0.4, ``["Tumor", "Positive"]``) or a ``name`` with a ``parentClass`` chain (older
exports) both read as ``"Tumor: Positive"``. It is looked up (case-insensitively) in
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
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy import ndimage as ndi

from nucsynth.io._common import read_image, write_text_atomic
from nucsynth.io._polygons import mask_outlines, rasterize_polygons
from nucsynth.io.errors import FormatError
from nucsynth.layout import ClassSet, Layout, LayoutError, Sample

__all__ = ["read_geojson", "read_qupath", "write_geojson", "QuPathRead", "Region", "SkippedObjectsWarning", "MAX_AUTO_CANVAS"]

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
        raise FormatError(path, f"feature {k}: coordinates are not numeric [x, y] pairs") from None
    if arr.ndim != 2 or arr.shape[1] < 2 or not np.all(np.isfinite(arr)):
        raise FormatError(path, f"feature {k}: expected finite [x, y] positions, got shape {arr.shape}")
    return np.stack([arr[:, 1] - off, arr[:, 0] - off], axis=1)


# QuPath objectType (0.3+) / object_type (0.2) values whose geometry is a nucleus outline.
_NUCLEUS_OBJECTS = ("detection", "cell")


def _object_type(f: dict[str, Any]) -> str | None:
    props = f.get("properties") or {}
    t = props.get("objectType", props.get("object_type"))
    return str(t).lower() if t is not None else None


def _polygon_parts(path: Path, geom: dict[str, Any], k: int, off: float) -> list:
    """Parts [(exterior, holes)] of a Polygon / MultiPolygon, rings in (y, x)."""
    coords = geom.get("coordinates")
    if not isinstance(coords, list):
        raise FormatError(path, f"feature {k}: geometry has no coordinates list")
    polys = [coords] if geom["type"] == "Polygon" else coords
    parts = []
    for poly in polys:
        if not isinstance(poly, list) or not poly:
            raise FormatError(path, f"feature {k}: a polygon needs at least an exterior ring")
        rings = [_ring(path, r, k, off) for r in poly]
        parts.append((rings[0], rings[1:]))
    return parts


def _class_name(c: Any) -> str | None:
    """QuPath's displayed class name: derived classes joined by ': ' ("Tumor: Positive"),
    from a ``names`` list (QuPath >= 0.4) or a ``parentClass`` chain (older exports)."""
    if isinstance(c, str):
        return c or None
    if not isinstance(c, dict):
        return None
    names = c.get("names")
    if isinstance(names, list) and names:
        return ": ".join(str(n) for n in names)
    chain: list[str] = []
    node: Any = c
    while isinstance(node, dict) and node.get("name") and len(chain) < 32:
        chain.append(str(node["name"]))
        node = node.get("parentClass")
    if not chain:
        return None
    # An old export may already hold the full name in ``name``; never repeat the parent.
    full = chain[0]
    for parent in chain[1:]:
        if not full.startswith(parent + ":"):
            full = f"{parent}: {full}"
    return full


@dataclass(frozen=True)
class Region:
    """A QuPath annotation read as a region: its name, class name and outline parts
    ``[(exterior, holes)]`` in the engine's (y, x) pixel-centre frame."""

    name: str | None
    class_name: str | None
    parts: list

    def mask(self, shape: tuple[int, int]) -> np.ndarray:
        """bool (H, W): the pixels whose centre lies inside the region."""
        inst, _ = rasterize_polygons([self.parts], shape)
        return inst > 0


@dataclass
class QuPathRead:
    """What :func:`read_qupath` found: the result (a Sample with ``image``, else a Layout),
    a count of every kind of object (``summary``), and the annotations read as regions
    (only with ``annotations="regions"``)."""

    result: Sample | Layout
    summary: dict[str, int]
    regions: list[Region] = field(default_factory=list)

    def summary_text(self) -> str:
        """One line: the nuclei read and, by kind, the objects that were not."""
        aside = ("nuclei", "annotations read as regions")
        used = {k: v for k, v in self.summary.items() if not k.startswith("skipped ") and k not in aside and v}
        skipped = {k[8:]: v for k, v in self.summary.items() if k.startswith("skipped ") and v}
        txt = f"{self.summary['nuclei']} nuclei (" + ", ".join(f"{v} {k}" for k, v in used.items()) + ")"
        if self.summary.get("annotations read as regions"):
            txt += f"; {self.summary['annotations read as regions']} annotations read as regions"
        if skipped:
            txt += "; not nuclei, skipped: " + ", ".join(f"{v} {k}" for k, v in skipped.items())
        return txt


_ANNOTATION_MODES = ("skip", "nuclei", "regions")
# Without an image or shape the canvas spans the origin to the farthest nucleus; beyond this
# many pixels (an int32 map of 256 MB) that is a slide, not a patch: ask for the canvas instead.
MAX_AUTO_CANVAS = 2**26


def _collect(
    path: Path, feats: list[dict[str, Any]], off: float, annotations: str
) -> tuple[list[tuple[list, np.ndarray | None, Any]], list[Region], dict[str, int]]:
    """Nuclei [(polygon parts, point (y, x) or None, classification)] in file order, the
    regions (``annotations="regions"``), and the count of every kind of object."""
    nuclei: list[tuple[list, np.ndarray | None, Any]] = []
    regions: list[Region] = []
    count = {"detections": 0, "cells": 0, "points": 0, "annotations as nuclei": 0, "plain features": 0,
             "skipped annotations": 0, "annotations read as regions": 0, "skipped cells without nucleus": 0,
             "skipped other objects": 0}
    for k, f in enumerate(feats):
        kind = _object_type(f)
        props = f.get("properties") or {}
        cls = props.get("classification")
        geom = f.get("geometry")
        if kind == "cell":  # the nucleus, not the cell boundary, is what NucSynth draws
            geom = f.get("nucleusGeometry") or props.get("nucleusGeometry")
            if geom is None:
                count["skipped cells without nucleus"] += 1
                continue
        elif f.get("nucleusGeometry") or props.get("nucleusGeometry"):
            geom = f.get("nucleusGeometry") or props.get("nucleusGeometry")
        if not isinstance(geom, dict) or "type" not in geom:
            raise FormatError(path, f"feature {k} has no geometry")
        t = geom["type"]
        if t in ("Point", "MultiPoint"):  # QuPath's counting tool: every point is one nucleus
            pts = [geom.get("coordinates")] if t == "Point" else geom.get("coordinates")
            if not isinstance(pts, list):
                raise FormatError(path, f"feature {k}: {t} has no coordinates list")
            for p in _ring(path, pts, k, off) if pts else []:
                nuclei.append(([], p, cls))
            count["points"] += len(pts)
            continue
        if kind not in (None, *_NUCLEUS_OBJECTS, "annotation"):
            count["skipped other objects"] += 1  # tiles, TMA cores, root
            continue
        if t not in ("Polygon", "MultiPolygon"):
            if kind == "annotation":  # lines and other drawings are never nuclei
                count["skipped annotations"] += 1
                continue
            raise FormatError(path, f"feature {k}: geometry type {t!r} is not a nucleus (Polygon, MultiPolygon, Point or MultiPoint)")
        parts = _polygon_parts(path, geom, k, off)
        if kind == "annotation" and annotations != "nuclei":
            if annotations == "regions":
                regions.append(Region(props.get("name"), _class_name(cls), parts))
                count["annotations read as regions"] += 1
            else:
                count["skipped annotations"] += 1
            continue
        nuclei.append((parts, None, cls))
        key = {"detection": "detections", "cell": "cells", "annotation": "annotations as nuclei"}.get(kind or "", "plain features")
        count[key] += 1
    return nuclei, regions, count


def _resolve_classes(path: Path, doc: Any, clss: list[Any], class_set: ClassSet | None) -> tuple[ClassSet, np.ndarray]:
    named = [(_class_name(c), (c.get("color", c.get("colorRGB")) if isinstance(c, dict) else None)) for c in clss]
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

            return NUCLEUS_CLASSES, np.zeros(len(clss), np.int64)
        class_set = ClassSet(path.stem, tuple(names), tuple(colours))
    lookup = {n.lower(): i for i, n in enumerate(class_set.names, start=1)}
    classes = np.zeros(len(clss), np.int64)
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


def _centres(inst: np.ndarray, n: int) -> np.ndarray:
    """Centre of mass (y, x) of ids 1..n from the nucleus pixels only (memory follows them)."""
    flat = inst.ravel()
    nz = np.flatnonzero(flat)
    ids = flat[nz]
    ys, xs = np.divmod(nz, inst.shape[1])
    cnt = np.bincount(ids, minlength=n + 1)[1:].astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.stack([np.bincount(ids, weights=ys, minlength=n + 1)[1:] / cnt,
                         np.bincount(ids, weights=xs, minlength=n + 1)[1:] / cnt], axis=1)


def read_qupath(
    path: str | Path,
    image: np.ndarray | str | Path | None = None,
    shape: tuple[int, int] | None = None,
    class_set: ClassSet | None = None,
    pixel_corner_origin: bool = True,
    annotations: str = "skip",
    source_bits: int | None = None,
) -> QuPathRead:
    """Nuclei of a QuPath (or any) GeoJSON export, with a summary of what else it held.

    Nuclei are detections, cells (their ``nucleusGeometry``) and features without an object
    type, in file order; every position of a ``Point`` / ``MultiPoint`` (QuPath's counting
    tool) is a point nucleus, whatever its object type. ``annotations`` (hand-drawn regions):
    ``"skip"`` (default: counted in the summary), ``"regions"`` (returned as
    :class:`Region` objects) or ``"nuclei"`` (for nuclei drawn by hand as annotations).
    Class names are QuPath's displayed names, derived classes included ("Tumor: Positive").

    The canvas is the image's size, else ``shape``, else the size stored by
    :func:`write_geojson`, else the origin to the farthest nucleus, refused beyond
    :data:`MAX_AUTO_CANVAS` pixels (slide coordinates: give the image or ``shape``).
    A polygon wholly off the canvas is an error; so is a file holding only skipped annotations
    (the error says how to read them). ``source_bits``: see :func:`nucsynth.io._common.read_image`.
    """
    path = Path(path)
    if annotations not in _ANNOTATION_MODES:
        raise ValueError(f"annotations must be one of {_ANNOTATION_MODES}, got {annotations!r}")
    if not path.is_file():
        raise FileNotFoundError(f"no GeoJSON file at {path}")
    try:
        doc = json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(path, f"not valid JSON (truncated?): {e}") from None
    feats = _features(path, doc)
    off = 0.5 if pixel_corner_origin else 0.0
    nuclei, regions, count = _collect(path, feats, off, annotations)
    if not nuclei and count["skipped annotations"]:
        raise FormatError(path, f"holds {count['skipped annotations']} annotations and no detections, cells or points; "
                                "if the annotations are nuclei drawn by hand, read them with annotations='nuclei' "
                                "(nucsynth prepare --annotations nuclei)")
    cs, classes = _resolve_classes(path, doc, [c for _, _, c in nuclei], class_set)
    img = None
    if image is not None:
        img = read_image(image, source_bits) if isinstance(image, (str, Path)) else np.asarray(image)
        shape = img.shape[:2]
    elif shape is None and isinstance(doc, dict) and isinstance(doc.get("nucsynth"), dict) and "shape" in doc["nucsynth"]:
        shape = tuple(int(v) for v in doc["nucsynth"]["shape"])  # type: ignore[assignment]
    if shape is None:
        pts = [np.vstack([e for e, _ in parts]) if parts else p[None] for parts, p, _ in nuclei]
        top = np.vstack(pts).max(axis=0) if pts else np.zeros(2)
        shape = (max(1, int(np.floor(top[0] + 0.5)) + 1), max(1, int(np.floor(top[1] + 0.5)) + 1))
        if shape[0] * shape[1] > MAX_AUTO_CANVAS:
            raise FormatError(
                path,
                f"nuclei reach (x={top[1] + off:.1f}, y={top[0] + off:.1f}) in the file: a canvas from the origin would be "
                f"{shape[0]}x{shape[1]} px; these are slide coordinates: give the image or the canvas (shape=(H, W))",
            )
    h, w = int(shape[0]), int(shape[1])
    inst, drawn = rasterize_polygons([parts for parts, _, _ in nuclei], (h, w))
    n = len(nuclei)
    cen = _centres(inst, n)
    for k, (parts, p, _) in enumerate(nuclei):
        if p is not None:
            cen[k] = p
        elif not drawn[k]:
            raise FormatError(path, f"nucleus {k + 1} (a polygon) lies wholly outside the {h}x{w} canvas")
    count = {"nuclei": n, **count}
    try:
        layout = Layout(inst, classes, cen, cs)
        result: Sample | Layout = layout
        if img is not None:
            result = Sample(layout, img, {"source": str(image) if not isinstance(image, np.ndarray) else None,
                                          "labels": str(path), "format": "geojson", "tile": path.stem,
                                          "objects": {k: v for k, v in count.items() if v}})
    except LayoutError as e:
        raise FormatError(path, str(e)) from None
    return QuPathRead(result, count, regions)


def read_geojson(
    path: str | Path,
    image: np.ndarray | str | Path | None = None,
    shape: tuple[int, int] | None = None,
    class_set: ClassSet | None = None,
    pixel_corner_origin: bool = True,
    annotations: str = "skip",
    source_bits: int | None = None,
) -> Sample | Layout:
    """Nuclei of a QuPath GeoJSON file: a Sample when ``image`` is given, else a Layout.

    See :func:`read_qupath` for the options; objects that are not nuclei (annotations,
    tiles, cells without a nucleus) are skipped with a :class:`SkippedObjectsWarning`
    giving the counts.
    """
    got = read_qupath(path, image, shape, class_set, pixel_corner_origin, annotations, source_bits)
    if any(v for k, v in got.summary.items() if k.startswith("skipped ")):
        warnings.warn(f"{path}: {got.summary_text()}", SkippedObjectsWarning, stacklevel=2)
    return got.result


class SkippedObjectsWarning(UserWarning):
    """A GeoJSON file held objects that are not nuclei (annotations, tiles, ...): they were skipped."""


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
