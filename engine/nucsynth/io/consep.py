"""CoNSeP / HoVer-Net label folders: ``Images/<name>.<png|jpg|tif>`` + ``Labels/<name>.mat``.

Each ``.mat`` (MATLAB v5, read with :func:`scipy.io.loadmat`) holds

- ``inst_map`` int (H, W): 0 background, nucleus ids 1..N (gaps are relabelled);
- ``inst_type`` int (N, 1): class of nucleus i+1 (if absent, each nucleus takes the
  majority class of its pixels in ``type_map``; one of the two is required);
- ``inst_centroid`` float (N, 2): centroid of nucleus i+1 as **(x, y)** = (column, row);
  converted to the engine's (y, x). Recomputed from pixels when ids had gaps.
- ``type_map`` int (H, W): class per pixel (only used when ``inst_type`` is absent).

Class mapping (Graham et al. 2019): the released CoNSeP labels hold 7 classes; the HoVer-Net
paper merges them to 4 (:data:`nucsynth.layout.CONSEP_CLASSES`: 1 other, 2 inflammatory,
3 epithelial, 4 spindle-shaped) via the ``"consep7"`` merge of :mod:`nucsynth.io.classes`.
``merge_classes`` chooses:

- ``True`` (default): a folder whose labels use ids above 4 is the 7-class original and is
  merged to 4 classes; a folder with ids 1..4 only is already merged and read as-is.
  The decision is made once for the whole folder (a single file may lack some classes).
- ``False``: never merge; a folder with ids above 4 is read with
  :data:`~nucsynth.io.classes.CONSEP7_CLASSES`.
- a merge name (``"consep7"``, ``"glysac"``): apply that merge to every file (GLySAC uses
  this same .mat layout).
- ``class_set`` given with a boolean ``merge_classes``: raw ids are read against it as-is
  (no merge); with a merge name it must equal that merge's target set.

The merge applied (or ``None``) is recorded in provenance ``"class_merge"``. Provenance
``"tile"`` is the source tile: ``train_10_003`` -> ``train_10`` (see
:func:`nucsynth.io._common.tile_of`), so splits can keep a tile's patches together.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nucsynth.io._common import (
    check_class_ids,
    find_image,
    inst_map_2d,
    int_vector,
    layout_from_inst_map,
    load_mat,
    make_sample,
    read_image,
    tile_of,
    xy_to_yx,
)
from nucsynth.io.classes import CONSEP7_CLASSES, ClassMerge, get_merge
from nucsynth.io.errors import FormatError
from nucsynth.layout import CONSEP_CLASSES, ClassSet, Layout, Sample, relabel_contiguous

__all__ = ["read_consep", "read_consep_file"]


@dataclass
class _RawLabels:
    path: Path
    inst_map: np.ndarray
    classes: np.ndarray  # class of id i+1, raw ids
    centroids_yx: np.ndarray | None  # only when ids are contiguous 1..N


def _majority_types(path: Path, inst_map: np.ndarray, type_map: Any) -> np.ndarray:
    """Class of each id 1..max: the most frequent ``type_map`` value over its pixels."""
    tmap = inst_map_2d(path, type_map, "type_map")
    if tmap.shape != inst_map.shape:
        raise FormatError(path, f"type_map is {tmap.shape} but inst_map is {inst_map.shape}")
    n = int(inst_map.max())
    t = int(tmap.max()) + 1
    if t > 256:
        raise FormatError(path, f"type_map holds class id {t - 1}; class ids are small integers (0 background)")
    counts = np.bincount(inst_map.ravel().astype(np.int64) * t + tmap.ravel(), minlength=(n + 1) * t)
    return counts.reshape(n + 1, t)[1:].argmax(axis=1).astype(np.int64)


def _read_raw(path: Path) -> _RawLabels:
    mat = load_mat(path, ["inst_map"])
    inst = inst_map_2d(path, mat["inst_map"])
    n = int(inst.max())
    if "inst_type" in mat:
        classes = int_vector(path, mat["inst_type"], "inst_type")
        if classes.size < n:
            raise FormatError(path, f"inst_type has {classes.size} entries but inst_map holds ids up to {n}")
        classes = classes[:n]
    elif "type_map" in mat:
        inst, _ = relabel_contiguous(inst)  # ids have no meaning beyond the map here; keeps tables small
        n = int(inst.max())
        classes = _majority_types(path, inst, mat["type_map"])
    else:
        keys = sorted(k for k in mat if not k.startswith("__"))
        raise FormatError(path, f"needs 'inst_type' or 'type_map' for the nucleus classes; found {keys}")
    if classes.size and classes.min() < 0:
        raise FormatError(path, f"class ids must be >= 0, found {classes.min()}")
    cen = None
    # ids 1..n all present (more ids than pixels cannot be; the check keeps bincount linear in pixels)
    contiguous = n <= inst.size and bool(np.all(np.bincount(inst.ravel(), minlength=n + 1)[1:] > 0))
    if "inst_centroid" in mat and contiguous:
        cen = xy_to_yx(path, mat["inst_centroid"], "inst_centroid", n)
    return _RawLabels(path, inst, classes, cen)


def _resolve_merge(
    raws: list[_RawLabels], merge_classes: bool | str | ClassMerge, class_set: ClassSet | None
) -> tuple[ClassMerge | None, ClassSet]:
    """The merge to apply and the resulting class set (see the module doc)."""
    top = max((int(r.classes.max()) for r in raws if r.classes.size), default=0)
    if isinstance(merge_classes, str):
        merge_classes = get_merge(merge_classes)
    if isinstance(merge_classes, ClassMerge):
        if top > merge_classes.max_source_id:
            worst = next(r for r in raws if r.classes.size and r.classes.max() == top)
            raise FormatError(
                worst.path, f"class id {top} is outside 0..{merge_classes.max_source_id} of the {merge_classes.name!r} merge"
            )
        if class_set is not None and class_set != merge_classes.target:
            raise ValueError(
                f"merge {merge_classes.name!r} produces the class set {merge_classes.target.name!r}, "
                f"not the requested {class_set.name!r}"
            )
        return merge_classes, merge_classes.target
    if class_set is not None:
        return None, class_set  # ids are read against the given set, never merged
    if top <= CONSEP_CLASSES.num_classes:
        return None, class_set or CONSEP_CLASSES
    if merge_classes is True:
        merge = get_merge("consep7")
        if top > merge.max_source_id:
            worst = next(r for r in raws if r.classes.size and r.classes.max() == top)
            raise FormatError(worst.path, f"class id {top} is neither a 4-class nor a 7-class CoNSeP id")
        return merge, merge.target
    return None, CONSEP7_CLASSES


def _to_sample(
    raw: _RawLabels, image_path: Path, merge: ClassMerge | None, class_set: ClassSet, source_bits: int | None = None
) -> Sample:
    classes = merge.apply(raw.classes) if merge is not None else raw.classes
    check_class_ids(raw.path, classes, class_set, "inst_type")
    if raw.centroids_yx is not None:
        try:
            layout = Layout(raw.inst_map, classes, raw.centroids_yx, class_set)
        except ValueError as e:
            raise FormatError(raw.path, str(e)) from None
    else:
        layout = layout_from_inst_map(raw.path, raw.inst_map, classes, class_set)
    prov = {
        "source": str(image_path),
        "labels": str(raw.path),
        "format": "consep",
        "tile": tile_of(raw.path.stem),
        "class_merge": merge.name if merge is not None else None,
    }
    return make_sample(raw.path, layout, read_image(image_path, source_bits), prov)


def read_consep_file(
    mat_path: str | Path,
    image_path: str | Path | None = None,
    merge_classes: bool | str | ClassMerge = True,
    class_set: ClassSet | None = None,
    source_bits: int | None = None,
) -> Sample:
    """One HoVer-Net ``.mat`` + its image (default: ``../Images/<stem>.*`` next to ``Labels/``).

    With ``merge_classes=True`` a single file is taken as 7-class only if it holds ids > 4;
    pass ``merge_classes="consep7"`` when you know the file is from the 7-class release.
    ``source_bits``: see :func:`nucsynth.io._common.read_image` (16-bit images).
    """
    mat_path = Path(mat_path)
    raw = _read_raw(mat_path)
    img = Path(image_path) if image_path is not None else find_image(mat_path.parent.parent / "Images", mat_path.stem, mat_path)
    merge, cs = _resolve_merge([raw], merge_classes, class_set)
    return _to_sample(raw, img, merge, cs, source_bits)


def read_consep(
    folder: str | Path,
    merge_classes: bool | str | ClassMerge = True,
    class_set: ClassSet | None = None,
    source_bits: int | None = None,
) -> list[Sample]:
    """All samples of a CoNSeP-style folder (``Images/`` + ``Labels/*.mat``), sorted by name
    (or the one sample of a single ``.mat`` file given instead of the folder).

    See the module doc for ``merge_classes`` and ``class_set``; ``source_bits`` converts
    16-bit images (:func:`nucsynth.io._common.read_image`), which are refused without it. Every label needs its image
    (same stem); a missing one is a :class:`FormatError` naming the label file.
    """
    folder = Path(folder)
    if folder.is_file():  # a single .mat: its image is looked up in ../Images
        return [read_consep_file(folder, merge_classes=merge_classes, class_set=class_set, source_bits=source_bits)]
    labels_dir, images_dir = folder / "Labels", folder / "Images"
    if not labels_dir.is_dir() or not images_dir.is_dir():
        raise FormatError(folder, "a CoNSeP folder needs the sub-folders Images/ and Labels/")
    mats = sorted(labels_dir.glob("*.mat"))
    if not mats:
        raise FormatError(labels_dir, "no .mat label files found")
    pairs = [(m, find_image(images_dir, m.stem, m)) for m in mats]  # fail fast on a missing image
    raws = [_read_raw(m) for m, _ in pairs]
    merge, cs = _resolve_merge(raws, merge_classes, class_set)
    return [_to_sample(raw, img, merge, cs, source_bits) for raw, (_, img) in zip(raws, pairs)]
