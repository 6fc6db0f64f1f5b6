"""PanNuke (Gamper et al. 2019, 2020): one fold as three NumPy arrays.

Accepted layouts: the three files together in ``<folder>/``, or the released fold layout
``<folder>/images/fold<k>/{images,types}.npy`` + ``<folder>/masks/fold<k>/masks.npy``
(the folder must then hold exactly one fold).

- ``images.npy``: (N, 256, 256, 3) RGB, uint8 or float holding whole numbers 0-255 (the
  release stores float64); anything else is refused, never rescaled.
- ``masks.npy``: (N, 256, 256, 6): channels 0-4 hold instance ids of the nuclei of each
  class, channel 5 is the background. Channel c maps to class c+1 of
  :data:`nucsynth.layout.PANNUKE_CLASSES` (1 neoplastic, 2 inflammatory, 3 connective /
  soft tissue, 4 dead, 5 epithelial).
- ``types.npy``: (N,) tissue name per image, stored in provenance ``"tissue"``.

A nucleus is an (channel, id) pair, so equal ids in two channels are two nuclei. Pixels
claimed by two channels (rare annotation noise) go to the later channel; a nucleus left
with no pixel is dropped. Ids are numbered by channel, then by id. No centroids in the
file: they are the centres of mass. Provenance ``"tile"`` is ``<fold>/<index>``: PanNuke
gives no slide ids, so each patch is its own group for splitting.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nucsynth.io._common import layout_from_inst_map, make_sample
from nucsynth.io.errors import FormatError
from nucsynth.layout import PANNUKE_CLASSES, Sample

__all__ = ["read_pannuke"]


def _find(folder: Path, name: str) -> Path:
    direct = folder / name
    if direct.is_file():
        return direct
    hits = sorted(folder.rglob(name))
    if not hits:
        raise FormatError(folder, f"no {name} found (expected {name} in the folder or in images/fold*/, masks/fold*/)")
    if len(hits) > 1:
        raise FormatError(folder, f"{len(hits)} files named {name} found ({[str(h) for h in hits[:4]]}); point at one fold")
    return hits[0]


def _load(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise FormatError(path, f"cannot read the .npy array (truncated or not a .npy file): {e}") from None


def _as_uint8_image(path: Path, img: np.ndarray, i: int) -> np.ndarray:
    if img.dtype == np.uint8:
        return np.ascontiguousarray(img)
    arr = np.asarray(img)
    if arr.dtype.kind not in "fiu" or not np.all(np.isfinite(arr)) or arr.min() < 0 or arr.max() > 255 or not np.all(arr == np.round(arr)):
        raise FormatError(path, f"image {i} must hold whole numbers 0-255 (got dtype {arr.dtype}, range {arr.min()}..{arr.max()})")
    return arr.astype(np.uint8)


def _inst_from_channels(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Instance map (ids 1..n, gaps possible) and class of each id from the 5 class channels."""
    h, w, _ = mask.shape
    inst = np.zeros((h, w), np.int64)
    classes: list[int] = []
    for c in range(5):
        ch = np.asarray(mask[..., c]).astype(np.int64)
        ids = np.unique(ch)
        ids = ids[ids > 0]
        if ids.size == 0:
            continue
        lut = np.zeros(int(ids.max()) + 1, np.int64)
        lut[ids] = len(classes) + 1 + np.arange(ids.size)
        sel = ch > 0
        inst[sel] = lut[ch[sel]]
        classes.extend([c + 1] * ids.size)
    return inst.astype(np.int32), np.asarray(classes, np.int64)


def read_pannuke(folder: str | Path, indices: range | list[int] | None = None) -> list[Sample]:
    """Samples of one PanNuke fold (``indices`` selects a subset, default all)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no PanNuke folder at {folder}")
    ip, mp, tp = _find(folder, "images.npy"), _find(folder, "masks.npy"), _find(folder, "types.npy")
    images, masks, types = _load(ip), _load(mp), _load(tp)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise FormatError(ip, f"expected shape (N, H, W, 3), got {images.shape}")
    if masks.ndim != 4 or masks.shape[-1] != 6 or masks.shape[:3] != images.shape[:3]:
        raise FormatError(mp, f"expected shape {images.shape[:3] + (6,)} (5 class channels + background), got {masks.shape}")
    if types.shape != (images.shape[0],):
        raise FormatError(tp, f"expected {images.shape[0]} tissue names, got shape {types.shape}")
    if masks.dtype.kind not in "fiu":
        raise FormatError(mp, f"masks must be numeric, got dtype {masks.dtype}")
    fold = ip.parent.name if ip.parent != folder else folder.name
    out = []
    for i in indices if indices is not None else range(images.shape[0]):
        m = np.asarray(masks[i])
        if m.dtype.kind == "f" and (not np.all(np.isfinite(m[..., :5])) or not np.all(m[..., :5] == np.round(m[..., :5]))):
            raise FormatError(mp, f"image {i}: instance ids must be whole numbers")
        if m[..., :5].min() < 0:
            raise FormatError(mp, f"image {i}: instance ids must be >= 0")
        inst, classes = _inst_from_channels(m)
        layout = layout_from_inst_map(mp, inst, classes, PANNUKE_CLASSES)
        prov = {"source": str(ip), "labels": str(mp), "format": "pannuke", "index": int(i),
                "tile": f"{fold}/{i}", "tissue": str(types[i])}
        out.append(make_sample(ip, layout, _as_uint8_image(ip, images[i], i), prov))
    return out
