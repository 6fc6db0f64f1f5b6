"""MoNuSeg (Kumar et al. 2017): Aperio ImageScope XML polygons + 1000x1000 RGB TIFF images.

Folder layout (as distributed)::

    <folder>/Annotations/<name>.xml
    <folder>/Tissue_Images/<name>.tif      (also accepted: Images/, or next to the XML)

Each XML holds ``Annotations/Annotation/Regions/Region`` elements, one Region per
nucleus, each with ``Vertices/Vertex`` elements whose ``X`` (column) and ``Y`` (row)
attributes are pixel coordinates (fractional values allowed). Coordinates: **(x, y)** in
the file, read as pixel-centre coordinates and converted to the engine's (y, x).

Rasterization (see :mod:`nucsynth.io._polygons`): a pixel belongs to a nucleus when its
centre lies inside the polygon; where polygons overlap, the later Region wins; a Region
that covers no pixel centre (degenerate two-vertex "polygons" occur in the training set)
or whose pixels were all overwritten still gets one pixel at a rounded vertex, so every
XML gives exactly as many nuclei as it has Regions (Regions wholly off the image are
the only exception and are reported in provenance ``"off_canvas"``). A Region with a vertex
whose X or Y is missing, not a number, NaN or infinite is refused, naming the Region and its
``Id`` (``bad_vertices="skip"`` leaves such Regions out with a warning naming them instead).

Classes: instance labels only, so every nucleus gets class 1 of
:data:`nucsynth.layout.NUCLEUS_CLASSES`. Provenance ``"tile"`` is the image name (one
source image per XML), ``"microns_per_pixel"`` comes from the XML root when present.
"""

from __future__ import annotations

import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from nucsynth.io._common import IMAGE_SUFFIXES, layout_from_inst_map, make_sample, read_image
from nucsynth.io._polygons import rasterize_polygons
from nucsynth.io.errors import FormatError
from nucsynth.layout import NUCLEUS_CLASSES, Sample, relabel_contiguous

__all__ = ["read_monuseg", "parse_aperio_xml"]

_IMAGE_DIRS = ("Tissue_Images", "Tissue Images", "Images", "images")


def _vertex(y: str | None, x: str | None) -> tuple[float, float] | None:
    """(y, x) of a Vertex, or None when a coordinate is missing, not a number, NaN or infinite."""
    try:
        v = (float(y), float(x))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v).all() else None


class _RegionCollector:
    """Expat target that keeps only Region vertices (3x faster than building the tree)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.polys: list[np.ndarray] = []
        self.bad: list[str] = []  # "Region <k> (Id <id>)" of regions with an unusable vertex
        self.current: list[tuple[float, float] | None] | None = None
        self.region_id: str | None = None
        self.count = 0
        self.root: str | None = None
        self.mpp: float | None = None

    def start(self, tag: str, attrib: dict[str, str]) -> None:
        if self.root is None:
            self.root = tag
            if tag != "Annotations":
                raise FormatError(self.path, f"root element is <{tag}>, expected <Annotations> (Aperio ImageScope XML)")
            try:
                self.mpp = float(attrib["MicronsPerPixel"])
            except (KeyError, ValueError):
                self.mpp = None
        if tag == "Vertex":
            if self.current is None:
                raise FormatError(self.path, "a <Vertex> appears outside any <Region>")
            self.current.append(_vertex(attrib.get("Y"), attrib.get("X")))
        elif tag == "Region":
            self.current = []
            self.region_id = attrib.get("Id")
            self.count += 1

    def end(self, tag: str) -> None:
        if tag != "Region" or self.current is None:
            return
        k = self.count
        if not self.current:
            raise FormatError(self.path, f"Region {k} has no vertices")
        if any(v is None for v in self.current):
            self.bad.append(f"Region {k} (Id {self.region_id})")
        else:
            self.polys.append(np.asarray(self.current, dtype=np.float64))
        self.current = None

    def close(self) -> list[np.ndarray]:
        return self.polys


def parse_aperio_xml(path: str | Path, bad_vertices: str = "error") -> tuple[list[np.ndarray], float | None]:
    """Region polygons of an ImageScope XML as (n, 2) arrays of (y, x), in file order,
    and the ``MicronsPerPixel`` of the root (None if absent).

    A Region with a vertex whose X or Y is missing, not a number, NaN or infinite is refused
    (``bad_vertices="error"``, a FormatError naming the regions) or left out with a warning
    naming them (``bad_vertices="skip"``): never drawn as a phantom nucleus.
    """
    if bad_vertices not in ("error", "skip"):
        raise ValueError(f"bad_vertices must be 'error' or 'skip', got {bad_vertices!r}")
    path = Path(path)
    if not path.is_file():
        raise FormatError(path, "annotation file not found")
    target = _RegionCollector(path)
    parser = ET.XMLParser(target=target)
    try:
        parser.feed(path.read_bytes())
        polys = parser.close()
    except ET.ParseError as e:
        raise FormatError(path, f"malformed or truncated XML: {e}") from None
    if target.root is None:
        raise FormatError(path, "empty XML file")
    if target.bad:
        where = ", ".join(target.bad[:5]) + (f" and {len(target.bad) - 5} more" if len(target.bad) > 5 else "")
        if bad_vertices == "error":
            raise FormatError(path, f"{where}: a vertex has a missing, non-numeric, NaN or infinite X/Y; "
                                    "fix the file or read it with bad_vertices='skip' (nucsynth prepare --bad-vertices skip) "
                                    "to leave such regions out")
        warnings.warn(f"{path}: left out {len(target.bad)} region(s) with a missing, non-numeric, NaN or "
                      f"infinite vertex: {where}", stacklevel=2)
    return polys, target.mpp


def _image_for(xml: Path, image_dir: Path | None) -> Path:
    dirs = [image_dir] if image_dir is not None else [xml.parent.parent / d for d in _IMAGE_DIRS] + [xml.parent]
    for d in dirs:
        for suf in IMAGE_SUFFIXES:
            cand = d / f"{xml.stem}{suf}"
            if cand.is_file():
                return cand
    raise FormatError(xml, f"no image named {xml.stem}.<tif|png|...> found in {[str(d) for d in dirs]}")


def read_monuseg_file(
    xml: str | Path, image: str | Path | None = None, bad_vertices: str = "error", source_bits: int | None = None
) -> Sample:
    """One XML + its image (default: looked up in ../Tissue_Images, ../Images or beside it).

    ``bad_vertices``: see :func:`parse_aperio_xml`; ``source_bits``: see
    :func:`nucsynth.io._common.read_image` (16-bit images are refused without it).
    """
    xml = Path(xml)
    polys, mpp = parse_aperio_xml(xml, bad_vertices)
    img_path = Path(image) if image is not None else _image_for(xml, None)
    img = read_image(img_path, source_bits)
    inst, drawn = rasterize_polygons([[(p, [])] for p in polys], img.shape[:2])
    off = int((~drawn).sum())
    if off:  # regions entirely off the image: drop their (pixel-less) ids
        inst, _ = relabel_contiguous(inst)
    layout = layout_from_inst_map(xml, inst, np.ones(int(inst.max()), np.int64), NUCLEUS_CLASSES)
    prov = {
        "source": str(img_path),
        "labels": str(xml),
        "format": "monuseg",
        "tile": xml.stem,
        "regions": len(polys),  # usable regions (see bad_vertices)
        "off_canvas": off,
        "microns_per_pixel": mpp,
    }
    return make_sample(xml, layout, img, prov)


def read_monuseg(
    folder_or_xml: str | Path,
    image_dir: str | Path | None = None,
    bad_vertices: str = "error",
    source_bits: int | None = None,
) -> list[Sample]:
    """All images of a MoNuSeg folder (``Annotations/*.xml``), or the one XML given.

    ``image_dir`` overrides where the images are looked up. Sorted by file name.
    ``bad_vertices`` and ``source_bits``: see :func:`read_monuseg_file`.
    """
    p = Path(folder_or_xml)
    if p.is_file():
        return [read_monuseg_file(p, _image_for(p, Path(image_dir)) if image_dir else None, bad_vertices, source_bits)]
    if not p.is_dir():
        raise FileNotFoundError(f"no MoNuSeg folder or XML at {p}")
    ann = p / "Annotations" if (p / "Annotations").is_dir() else p
    xmls = sorted(ann.glob("*.xml"))
    if not xmls:
        raise FormatError(p, "no .xml annotation files found (expected Annotations/*.xml)")
    imdir = Path(image_dir) if image_dir else None
    return [read_monuseg_file(x, _image_for(x, imdir), bad_vertices, source_bits) for x in xmls]
