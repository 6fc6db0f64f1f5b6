"""The one layout-source function behind ``nucsynth synthesize``, the batch dock and the
napari reader: what a user points at (a dataset store, any readable dataset, a point CSV or
GeoJSON file) becomes Samples (with images) or Layouts, each with where it came from.

- a dataset store (optionally one ``split``) -> its Samples;
- any format :func:`nucsynth.io.read_source` detects -> its Samples;
- ``points=True`` (the joint family): a CSV file (header naming ``y``, ``x`` and ``class``,
  any order; pixel coordinates, class id or name) or a GeoJSON file (QuPath points, or
  polygons whose centroids are taken) -> one point Layout on a canvas of ``size``; a store
  or dataset -> the point layouts of its nuclei (centroids and classes);
- a GeoJSON file without ``points`` -> its Layout (and its image when one of the same stem
  lies beside it).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np

from nucsynth.layout import ClassSet, Layout, Sample

__all__ = ["LayoutSource", "POINT_SUFFIXES", "read_layout_source", "read_points_csv", "parse_size", "source_kind"]

POINT_SUFFIXES = {".csv": "csv", ".geojson": "geojson", ".json": "geojson"}
_IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")


@dataclass
class LayoutSource:
    """What a source gave: ``items`` (Samples when the source has images, else Layouts) and
    one provenance dict per item (``source``, ``source_index``, ``source_tile``)."""

    path: Path
    kind: str
    items: list[Union[Sample, Layout]] = field(default_factory=list)
    provenance: list[dict[str, Any]] = field(default_factory=list)

    @property
    def layouts(self) -> list[Layout]:
        """The Layout of every item."""
        return [s.layout if isinstance(s, Sample) else s for s in self.items]

    @property
    def images(self) -> list[np.ndarray | None]:
        """The image of every item (None where the source has none)."""
        return [s.image if isinstance(s, Sample) else None for s in self.items]

    def __len__(self) -> int:
        return len(self.items)


def parse_size(text: str | int | tuple[int, int] | None) -> tuple[int, int] | None:
    """``"H,W"`` (or ``"HxW"``, or one number for a square; or an int / pair) -> (H, W)."""
    if text is None:
        return None
    if isinstance(text, (int, np.integer)):
        text = str(int(text))
    if isinstance(text, (tuple, list)):
        text = ",".join(str(v) for v in text)
    parts = [s.strip() for s in str(text).replace("x", ",").split(",")]
    try:
        hw = [int(s) for s in parts]
    except ValueError:
        raise ValueError(f"size must be H,W in pixels (e.g. 256,256), got {text!r}") from None
    if len(hw) == 1:
        hw = hw * 2
    if len(hw) != 2 or min(hw) < 1:
        raise ValueError(f"size must be H,W with both at least 1 px, got {text!r}")
    return hw[0], hw[1]


def _class_id(value: str, class_set: ClassSet, where: str) -> int:
    """A CSV class cell: an id 0..K or a class name of ``class_set`` (any case)."""
    v = value.strip()
    if v.lstrip("-").isdigit():
        k = int(v)
        if not 0 <= k <= class_set.num_classes:
            raise ValueError(f"{where}: class id {k} is outside 0..{class_set.num_classes} "
                             f"(class set {class_set.name!r}: {list(class_set.names)})")
        return k
    lookup = {n.lower(): i for i, n in enumerate(class_set.names, start=1)}
    if v.lower() not in lookup:
        raise ValueError(f"{where}: class {v!r} is neither an id 0..{class_set.num_classes} nor one of "
                         f"{list(class_set.names)}")
    return lookup[v.lower()]


def read_points_csv(path: str | Path, shape: tuple[int, int], class_set: ClassSet) -> Layout:
    """A point Layout of canvas ``shape`` from a CSV file with a header naming the columns
    ``y``, ``x`` and ``class`` (any order): pixel coordinates (row y down, column x right;
    floats allowed) and a class id (0 = unknown) or name of ``class_set``. A point off the
    canvas is an error, never clipped; a leading BOM is accepted."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: spreadsheet exports start with a BOM
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a UTF-8 text CSV file") from None
    reader = csv.reader(text.splitlines())
    header = [h.strip().lower() for h in next(reader, [])]
    if not {"y", "x", "class"} <= set(header):
        raise ValueError(f"{path}: the first line must name the columns y, x and class "
                         f"(e.g. 'y,x,class' or 'x,y,class'); got {header}")
    iy, ix, ic = header.index("y"), header.index("x"), header.index("class")
    cen, cls = [], []
    for row in reader:
        if not any(c.strip() for c in row):
            continue
        where = f"{path} line {reader.line_num}"
        if len(row) < len(header):
            raise ValueError(f"{where}: expected {len(header)} values ({','.join(header)}), got {len(row)}")
        try:
            y, x = float(row[iy]), float(row[ix])
        except ValueError:
            raise ValueError(f"{where}: y and x must be numbers, got {row[iy]!r}, {row[ix]!r}") from None
        if not (0 <= y <= shape[0] - 1 and 0 <= x <= shape[1] - 1):
            raise ValueError(f"{where}: point (y={y}, x={x}) lies outside the {shape[0]}x{shape[1]} canvas "
                             "(set the canvas with --size H,W)")
        cen.append((y, x))
        cls.append(_class_id(row[ic], class_set, where))
    if not cen:
        raise ValueError(f"{path} holds no points (expected a header y,x,class and one line per nucleus)")
    return Layout.from_points(shape, np.asarray(cen, float), np.asarray(cls, np.int64), class_set)


def source_kind(path: str | Path) -> str:
    """``"store"``, ``"csv"``, ``"geojson"`` or a dataset format of :data:`nucsynth.io.FORMATS`
    (FileNotFoundError / FormatError naming the path otherwise)."""
    from nucsynth.io.detect import detect_format

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"layout source {p} does not exist")
    if p.is_file() and p.suffix.lower() in POINT_SUFFIXES:
        return POINT_SUFFIXES[p.suffix.lower()]
    return detect_format(p)


def store_split(path: str | Path, split: str | None) -> str | None:
    """The split of a layout source to read, for the command line: ``split`` as given
    (``"all"`` = every patch); when none is given, a dataset store's ``train`` split if it has
    one, so held-out layouts never become synthetic training data by default (a leak the
    downstream protocol would refuse); every patch otherwise. Other sources: None."""
    if split == "all":
        return None
    if split is not None or not Path(path).exists() or source_kind(Path(path)) != "store":
        return split  # (a missing path is reported by the reader, with its own message)
    from nucsynth.io.store import DatasetStore

    return "train" if len(DatasetStore.open(path).indices("train")) else None


def read_layout_source(
    path: str | Path,
    *,
    split: str | None = None,
    limit: int | None = None,
    points: bool = False,
    size: tuple[int, int] | None = None,
    class_set: ClassSet | None = None,
) -> LayoutSource:
    """Read a layout source (see the module doc). ``split`` and ``limit`` (the first N items)
    apply to stores and datasets; ``size`` (H, W) is the canvas of a CSV / GeoJSON point file
    (required for CSV) and ``class_set`` names its classes. Errors name the path and what was
    expected."""
    p = Path(path)
    kind = source_kind(p)
    if limit is not None and int(limit) < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    if kind in ("csv", "geojson"):
        if split is not None or limit is not None:
            raise ValueError(f"split and limit apply to a dataset store or folder; {p} is one {kind.upper()} canvas")
        prov = [{"source": str(p), "source_index": 0, "source_tile": p.stem}]
        if kind == "csv":
            if size is None or class_set is None:
                raise ValueError(f"{p}: a CSV of points needs the canvas size (--size H,W) and the model's classes")
            return LayoutSource(p, kind, [read_points_csv(p, size, class_set)], prov)
        from nucsynth.generate.layouts import points_from_labels
        from nucsynth.io.geojson import read_geojson

        image = None if points else next((c for c in (p.with_suffix(e) for e in _IMAGE_SUFFIXES) if c.is_file()), None)
        got = read_geojson(p, shape=size, class_set=class_set, **({"image": image} if image is not None else {}))
        if points:
            got = points_from_labels(got.layout if isinstance(got, Sample) else got)
        return LayoutSource(p, kind, [got], prov)
    if size is not None:
        raise ValueError(f"size sets the canvas of CSV / GeoJSON points; {p} brings its own patch size")
    if kind == "store":
        from nucsynth.io.store import DatasetStore

        store = DatasetStore.open(p)
        idx = list(range(len(store))) if split is None else [int(i) for i in store.indices(split)]
        if split is not None and not idx:
            raise ValueError(f"store {p} has no patches in split {split!r} (its splits: {sorted(set(store.splits.tolist()))})")
        idx = idx[:limit] if limit else idx
        items: list[Any] = [store[i] for i in idx]
        prov = [{"source": str(p), "source_index": i, "source_tile": s.provenance.get("tile")} for i, s in zip(idx, items)]
    else:
        if split is not None:
            raise ValueError(f"split only applies to a dataset store; {p} is a {kind} dataset")
        from nucsynth.io.detect import read_source

        items = read_source(p, fmt=kind)
        items = items[:limit] if limit else items
        prov = [{"source": str(p), "source_index": i, "source_tile": s.provenance.get("tile")} for i, s in enumerate(items)]
    if not items:
        raise ValueError(f"layout source {p} holds no patches")
    if points:
        from nucsynth.generate.layouts import points_from_labels

        items = [points_from_labels(s.layout) for s in items]
    return LayoutSource(p, kind, items, prov)
