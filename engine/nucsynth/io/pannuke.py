"""PanNuke (Gamper et al. 2019, 2020): one fold as three NumPy arrays.

Accepted layouts: the three files together in ``<folder>/``, or the released fold layout
``<folder>/images/fold<k>/{images,types}.npy`` + ``<folder>/masks/fold<k>/masks.npy``
(the folder must then hold exactly one fold).

- ``images.npy``: (N, 256, 256, 3) RGB, uint8 or float holding whole numbers 0-255 (the
  release stores float64); anything else is refused, never rescaled.
- ``masks.npy``: (N, 256, 256, 6): channels 0-4 hold instance ids of the nuclei of each
  class, channel 5 is the background. Channel c maps to class c+1 of
  :data:`nucsynth.layout.PANNUKE_CLASSES` (1 neoplastic, 2 inflammatory, 3 connective /
  soft tissue, 4 dead, 5 epithelial). A common re-save moves the background channel
  first (channels 1-5 are then the classes): the reader detects which channel is the
  background (one nonzero value, set exactly where no other channel holds a nucleus),
  reads either order correctly, records it in provenance ``"mask_channels"``
  (``"release"`` / ``"background-first"``), and refuses a file mixing the two.
  Instance ids may be any size (memory follows the pixels, not the largest id).
- ``types.npy``: (N,) tissue name per image, stored in provenance ``"tissue"``.

A nucleus is an (channel, id) pair, so equal ids in two channels are two nuclei. Pixels
claimed by two channels (rare annotation noise) go to the later channel; a nucleus left
with no pixel is dropped. Ids are numbered by channel, then by id. No centroids in the
file: they are the centres of mass. Provenance ``"tile"`` is ``<fold>/<index>``: PanNuke
gives no slide ids, so each patch is its own group for splitting.
"""

from __future__ import annotations

import warnings
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


def _inst_from_channels(mask: np.ndarray, order: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Instance map (ids 1..n) and class of each id from the 5 class channels ``order``.

    Ids are ranked per channel with ``np.unique`` (memory follows pixels, never the largest id).
    """
    h, w, _ = mask.shape
    inst = np.zeros((h, w), np.int64)
    classes: list[int] = []
    for k, c in enumerate(order):
        ch = np.asarray(mask[..., c]).astype(np.int64)
        sel = ch > 0
        if not sel.any():
            continue
        ids, rank = np.unique(ch[sel], return_inverse=True)
        inst[sel] = len(classes) + 1 + rank
        classes.extend([k + 1] * ids.size)
    return inst.astype(np.int32), np.asarray(classes, np.int64)


RELEASE = (0, 1, 2, 3, 4)  # class channels of the released masks.npy; channel 5 is the background
BACKGROUND_FIRST = (1, 2, 3, 4, 5)  # a common re-save puts the background channel first


def _is_background(m: np.ndarray, nonzero: list[np.ndarray], per_pixel: np.ndarray, c: int) -> bool:
    """Channel ``c`` is a background mask: one nonzero value, set (on >= 99% of pixels)
    exactly where none of the other five channels holds a nucleus. ``nonzero[c]`` is
    ``m[..., c] != 0`` and ``per_pixel`` their count (computed once per patch)."""
    on = nonzero[c]
    vals = m[..., c][on]
    if vals.size == 0 or not (vals == vals[0]).all():
        return False
    others = (per_pixel - on) > 0
    return float(np.mean(on != others)) >= 0.99


def _verdict(m: np.ndarray) -> str | None:
    """``"release"`` or ``"background-first"`` by which of channels 5 and 0 is the background
    mask; ``"neither"`` when none is; None when it cannot be told.

    When both fit (a class channel holding a single nucleus id mirrors the background: it
    is set exactly where no other channel, background included, is), the larger one is the
    background, since one nucleus never covers more than the rest of a patch.
    """
    nonzero = [m[..., c] != 0 for c in range(m.shape[-1])]  # per channel: reducing the last axis is slow
    per_pixel = np.sum(nonzero, axis=0, dtype=np.uint8)
    last, head = _is_background(m, nonzero, per_pixel, 5), _is_background(m, nonzero, per_pixel, 0)
    if last and head:
        a5, a0 = int(np.count_nonzero(m[..., 5])), int(np.count_nonzero(m[..., 0]))
        return None if a5 == a0 else ("release" if a5 > a0 else "background-first")
    if last != head:
        return "release" if last else "background-first"
    return "neither"


def _channel_order(path: Path, masks: np.ndarray, indices: list[int]) -> str:
    """The channel order of this file, from the first patch whose verdict is clear; the
    release order (with a warning) when no patch shows a background channel."""
    seen_neither = False
    for i in indices:
        v = _verdict(np.asarray(masks[i]))
        if v in ("release", "background-first"):
            return v
        seen_neither |= v == "neither"
    if seen_neither:
        warnings.warn(
            f"{path}: no patch has a background mask in channel 5 (or 0); reading channels 0-4 as "
            "neoplastic, inflammatory, connective, dead, epithelial (the released order)",
            stacklevel=3,
        )
    return "release"


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
    idx = [int(i) for i in (indices if indices is not None else range(images.shape[0]))]
    variant = _channel_order(mp, masks, idx)
    order = BACKGROUND_FIRST if variant == "background-first" else RELEASE
    out = []
    for i in idx:
        m = np.asarray(masks[i])
        v = _verdict(m)
        if v in ("release", "background-first") and v != variant:
            raise FormatError(mp, f"image {i} has its background in channel {5 if v == 'release' else 0}, "
                                  f"other images in channel {0 if v == 'release' else 5}: the masks mix two channel orders")
        if m.dtype.kind == "f" and (not np.all(np.isfinite(m)) or not np.all(m == np.round(m))):
            raise FormatError(mp, f"image {i}: instance ids must be whole numbers")
        if m[..., list(order)].min() < 0:
            raise FormatError(mp, f"image {i}: instance ids must be >= 0")
        inst, classes = _inst_from_channels(m, order)
        layout = layout_from_inst_map(mp, inst, classes, PANNUKE_CLASSES)
        prov = {"source": str(ip), "labels": str(mp), "format": "pannuke", "index": int(i),
                "tile": f"{fold}/{i}", "tissue": str(types[i]), "mask_channels": variant}
        out.append(make_sample(ip, layout, _as_uint8_image(ip, images[i], i), prov))
    return out
