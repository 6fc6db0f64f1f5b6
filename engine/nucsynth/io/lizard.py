"""Lizard (Graham et al. 2021): colon images + ``.mat`` labels.

Accepted layouts: ``<folder>/Labels/<name>.mat`` (the release's ``Lizard_Labels/Labels``
also works) with ``<name>.png`` in ``<folder>/Images/`` or any folder under ``<folder>``
whose name contains ``Images`` (the release's ``Lizard_Images1/``, ``Lizard_Images2/``).

Each ``.mat`` holds ``inst_map`` (H, W) int, ``id`` (N, 1): the instance id of each
row, ``class`` (N, 1): its class, ``centroid`` (N, 2) as **(x, y)**, converted to the
engine's (y, x) (``bbox`` is ignored). Rows are matched to the map by ``id`` (not by row
order); ids are renumbered 1..N in increasing order of the old id. Map pixels whose id has
no row are an error; a row whose id has no pixel stays as a point nucleus at its centroid.

Classes: Lizard ids 1..6 map 1:1 to :data:`nucsynth.layout.LIZARD_CLASSES` (neutrophil,
epithelial, lymphocyte, plasma, eosinophil, connective). Provenance ``"tile"`` is the
image name (each Lizard image is a separate region).
"""

from __future__ import annotations

from pathlib import Path

from nucsynth.io._common import (
    check_class_ids,
    find_image,
    inst_map_2d,
    int_vector,
    layout_from_ids,
    load_mat,
    make_sample,
    read_image,
    xy_to_yx,
)
from nucsynth.io.errors import FormatError
from nucsynth.layout import LIZARD_CLASSES, Sample

__all__ = ["read_lizard", "read_lizard_file"]


def read_lizard_file(mat_path: str | Path, image_path: str | Path) -> Sample:
    """One Lizard ``.mat`` and its image."""
    mat_path = Path(mat_path)
    mat = load_mat(mat_path, ["inst_map", "id", "class", "centroid"])
    inst = inst_map_2d(mat_path, mat["inst_map"])
    ids = int_vector(mat_path, mat["id"], "id")
    classes = int_vector(mat_path, mat["class"], "class", ids.size)
    cen = xy_to_yx(mat_path, mat["centroid"], "centroid", ids.size)
    check_class_ids(mat_path, classes, LIZARD_CLASSES, "'class'")
    layout = layout_from_ids(mat_path, inst, ids, classes, LIZARD_CLASSES, cen)
    prov = {"source": str(image_path), "labels": str(mat_path), "format": "lizard", "tile": mat_path.stem}
    return make_sample(mat_path, layout, read_image(image_path), prov)


def _label_dir(folder: Path) -> Path:
    for cand in (folder / "Labels", folder / "Lizard_Labels" / "Labels", folder / "Lizard_Labels"):
        if cand.is_dir() and any(cand.glob("*.mat")):
            return cand
    raise FormatError(folder, "no Labels/*.mat found (expected Labels/ or Lizard_Labels/Labels/)")


def _image_dirs(root: Path) -> list[Path]:
    return sorted(d for d in root.rglob("*") if d.is_dir() and "images" in d.name.lower())


def _image_for(mat: Path, image_dirs: list[Path]) -> Path:
    for d in image_dirs:
        try:
            return find_image(d, mat.stem, mat)
        except FormatError:
            continue
    raise FormatError(mat, f"no image named {mat.stem}.png in {[str(d) for d in image_dirs]}")


def read_lizard(folder: str | Path) -> list[Sample]:
    """All samples of a Lizard folder, sorted by name (or the one sample of a single
    ``.mat``, whose image is looked up in the ``*Images*`` folders up to two levels above)."""
    folder = Path(folder)
    if folder.is_file():
        roots = [folder.parent.parent, folder.parent.parent.parent]
        dirs = [d for r in roots for d in _image_dirs(r)]
        return [read_lizard_file(folder, _image_for(folder, dirs))]
    if not folder.is_dir():
        raise FileNotFoundError(f"no Lizard folder at {folder}")
    labels = _label_dir(folder)
    image_dirs = _image_dirs(folder)
    if not image_dirs:
        raise FormatError(folder, "no image folder found (expected Images/ or Lizard_Images*/)")
    return [read_lizard_file(mat, _image_for(mat, image_dirs)) for mat in sorted(labels.glob("*.mat"))]
