"""A plain folder of images + instance label images + a class table.

Layout::

    <folder>/images/<name>.<png|jpg|tif|...>   RGB (grey is repeated, alpha dropped)
    <folder>/labels/<name>.<tif|tiff|png>      instance map: 0 background, ids >= 1
    <folder>/classes.csv                       optional; header ``image,id,class``

The CSV is UTF-8, with or without a byte-order mark, separated by commas, semicolons or
tabs (whichever the header line uses), header names in any case: as spreadsheet programs
save it.
``image`` is the image name without suffix (``<name>``), ``id`` an instance id of its
label image, ``class`` a class name of ``class_set`` (case-insensitive) or an integer id.
Without the CSV every nucleus has class 0 (unknown). Ids with gaps are renumbered 1..N in
increasing order; classes follow their ids. A label id absent from the CSV gets class 0
when the CSV has no row at all for that image, and is an error otherwise (a half-filled
table is more likely a mistake than intent). Centroids are the centres of mass (y, x).

Class set: ``class_set`` if given; else, when the CSV uses names, the known class set
(CoNSeP 4 or 7, PanNuke, Lizard, GLySAC) holding all of them if exactly one does, else one
built from the sorted names (classes are matched by name wherever two sets meet, so the
order does not matter: :func:`nucsynth.layout.class_lut`); else (integer classes or no CSV) :data:`nucsynth.layout.NUCLEUS_CLASSES`
for class ids 0-1, and an error asking for a class set beyond that.
Provenance ``"tile"`` is the image name (or, for names like ``<tile>_<n>_<k>``, the tile:
see :func:`nucsynth.io._common.tile_of`).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from nucsynth.io._common import (
    LABEL_SUFFIXES,
    check_class_ids,
    find_image,
    layout_from_ids,
    make_sample,
    read_image,
    read_label_image,
    tile_of,
)
from nucsynth.io.errors import FormatError
from nucsynth.io.classes import CONSEP7_CLASSES, GLYSAC_CLASSES
from nucsynth.layout import CONSEP_CLASSES, LIZARD_CLASSES, NUCLEUS_CLASSES, PANNUKE_CLASSES, ClassSet, Sample

__all__ = ["read_folder"]

# A CSV whose class names all belong to exactly one of these is read in that class set.
_KNOWN_SETS = (CONSEP_CLASSES, PANNUKE_CLASSES, LIZARD_CLASSES, CONSEP7_CLASSES, GLYSAC_CLASSES)
_PALETTE = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255), (255, 128, 0), (128, 0, 255))


def _read_csv(path: Path) -> dict[str, dict[int, str]]:
    table: dict[str, dict[int, str]] = {}
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: spreadsheet programs write a byte-order mark
    except UnicodeDecodeError as e:
        raise FormatError(path, f"not a UTF-8 text file ({e}); save it as CSV UTF-8") from None
    # Spreadsheets in many locales separate fields by ';' (or tabs): the header line tells.
    head = text.split("\n", 1)[0]
    delimiter = next((d for d in (",", ";", "\t") if d in head), ",")
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    if reader.fieldnames is None or not {"image", "id", "class"} <= {h.strip().lower() for h in reader.fieldnames}:
        raise FormatError(path, f"header must hold the columns image,id,class; got {reader.fieldnames}")
    for line, row in enumerate(reader, start=2):
        row = {k.strip().lower(): (v or "").strip() for k, v in row.items() if k is not None}
        try:
            nid = int(row["id"])
        except ValueError:
            raise FormatError(path, f"line {line}: id {row['id']!r} is not an integer") from None
        if nid < 1:
            raise FormatError(path, f"line {line}: id must be >= 1, got {nid}")
        if not row["class"]:
            raise FormatError(path, f"line {line}: empty class")
        per = table.setdefault(row["image"], {})
        if nid in per:
            raise FormatError(path, f"line {line}: image {row['image']!r} id {nid} is listed twice")
        per[nid] = row["class"]
    return table


def _class_set_for(path: Path, table: dict[str, dict[int, str]], class_set: ClassSet | None) -> ClassSet:
    if class_set is not None:
        return class_set
    values = {v for per in table.values() for v in per.values()}
    names = sorted(v for v in values if not v.lstrip("-").isdigit())
    known = [cs for cs in _KNOWN_SETS if {n.lower() for n in names} <= {n.lower() for n in cs.names}]
    if names and len(known) == 1:
        return known[0]
    if names:
        return ClassSet(path.parent.name or "folder", tuple(names), tuple(_PALETTE[i % len(_PALETTE)] for i in range(len(names))))
    top = max((int(v) for v in values), default=0)
    if top > NUCLEUS_CLASSES.num_classes:
        raise FormatError(path, f"integer class ids up to {top} need a class set (pass class_set=...)")
    return NUCLEUS_CLASSES


def _class_id(path: Path, value: str, cs: ClassSet) -> int:
    if value.lstrip("-").isdigit():
        return int(value)
    lookup = {n.lower(): i for i, n in enumerate(cs.names, start=1)}
    if value.lower() not in lookup:
        raise FormatError(path, f"class {value!r} is not in the class set {cs.name!r} {list(cs.names)}")
    return lookup[value.lower()]


def read_folder(folder: str | Path, class_set: ClassSet | None = None, source_bits: int | None = None) -> list[Sample]:
    """All samples of a plain ``images/`` + ``labels/`` (+ ``classes.csv``) folder.

    ``source_bits`` converts 16-bit images (see :func:`nucsynth.io._common.read_image`);
    without it they are refused.
    """
    folder = Path(folder)
    img_dir, lab_dir, csv_path = folder / "images", folder / "labels", folder / "classes.csv"
    if not img_dir.is_dir() or not lab_dir.is_dir():
        raise FormatError(folder, "a plain folder needs the sub-folders images/ and labels/")
    labels = sorted(p for p in lab_dir.iterdir() if p.suffix.lower() in LABEL_SUFFIXES)
    if not labels:
        raise FormatError(lab_dir, "no label images (.tif, .tiff, .png) found")
    table = _read_csv(csv_path) if csv_path.is_file() else {}
    cs = _class_set_for(csv_path, table, class_set)
    stems = {p.stem for p in labels}
    stray = sorted(set(table) - stems)
    if stray:
        raise FormatError(csv_path, f"rows for images with no label file: {stray[:5]}")
    out = []
    for lab in labels:
        inst = read_label_image(lab)  # ids checked to fit int32 there
        ids = np.unique(inst)
        ids = ids[ids != 0]
        rows = table.get(lab.stem, {})
        if rows:
            missing = [int(i) for i in ids if int(i) not in rows]
            if missing:
                raise FormatError(csv_path, f"image {lab.stem!r}: instance ids {missing[:5]} have no class row")
            extra = sorted(set(rows) - set(ids.tolist()))
            if extra:
                raise FormatError(csv_path, f"image {lab.stem!r}: ids {extra[:5]} do not occur in {lab.name}")
            classes = np.array([_class_id(csv_path, rows[int(i)], cs) for i in ids], np.int64)
        else:
            classes = np.zeros(ids.size, np.int64)
        check_class_ids(csv_path, classes, cs, f"image {lab.stem!r}")
        layout = layout_from_ids(lab, inst.astype(np.int32), ids, classes, cs)
        img_path = find_image(img_dir, lab.stem, lab)
        prov = {"source": str(img_path), "labels": str(lab), "format": "folder", "tile": tile_of(lab.stem)}
        out.append(make_sample(lab, layout, read_image(img_path, source_bits), prov))
    return out
