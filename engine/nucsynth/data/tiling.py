"""Patch tiling and magnification change of Samples (image + Layout).

Tiling (:func:`tile_sample`) cuts a Sample into windows of ``size`` pixels every ``stride``
pixels. What happens at the last row / column of windows is the *pad policy*:

- ``"reflect"``: windows start every ``stride`` pixels until the whole image is covered; the
  part of the last window that falls off the image is filled by mirroring the image
  (no visible seam for a model). Labels are **not** mirrored: a mirrored nucleus would be a
  fake nucleus with no ground truth, so padded label pixels are background (0). The image
  there may show mirrored nuclei that are unlabelled: use ``"none"`` when that matters.
- ``"constant"``: as ``"reflect"`` but the image is padded with a constant colour ``fill``
  (default 255, white like glass background); labels padded with 0.
- ``"none"``: only windows that fit entirely inside the image are cut; the last window of a
  row/column is moved flush with the border so that, with ``stride <= size``, everything
  that fits is covered (an image smaller than ``size`` gives no patch).

Nuclei cut by a window border keep their visible part; ids are relabelled contiguous and
centroids recomputed from the visible pixels (the semantics of :meth:`Layout.crop`).

:func:`rescale_sample` changes magnification (e.g. 40x -> 20x is ``factor=0.5``): the image
is resampled with anti-aliasing, labels by nearest neighbour; nuclei that vanish are dropped
and ids relabelled.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from skimage.transform import resize

from nucsynth.layout import Layout, Sample, relabel_contiguous

__all__ = ["PAD_POLICIES", "tile_starts", "tile_sample", "rescale_sample", "change_magnification"]

PAD_POLICIES = ("reflect", "constant", "none")


def _pair(v: int | tuple[int, int], what: str) -> tuple[int, int]:
    """An int or (h, w) pair of positive ints."""
    pair = (v, v) if np.isscalar(v) else tuple(v)  # type: ignore[arg-type]
    if len(pair) != 2 or not all(isinstance(p, (int, np.integer)) and not isinstance(p, bool) for p in pair):
        raise ValueError(f"{what} must be a positive int or a pair (h, w) of positive ints, got {v!r}")
    if min(pair) < 1:
        raise ValueError(f"{what} must be >= 1, got {v!r}")
    return int(pair[0]), int(pair[1])


def tile_starts(length: int, size: int, stride: int, pad: str = "reflect") -> list[int]:
    """Window starts along one axis of ``length`` pixels (see the module doc for ``pad``).

    With padding, windows start at 0, stride, 2*stride, ... until one reaches the end.
    Without (``"none"``), only full windows are kept and the last one is moved flush with
    the border when the stride grid would leave a strip uncovered.
    """
    if pad not in PAD_POLICIES:
        raise ValueError(f"pad must be one of {PAD_POLICIES}, got {pad!r}")
    if pad == "none":
        if length < size:
            return []
        starts = list(range(0, length - size + 1, stride))
        if starts[-1] + size < length:
            starts.append(length - size)
        return starts
    starts = [0]
    while starts[-1] + size < length:
        starts.append(starts[-1] + stride)
    return starts


def _tile_name(prov: dict[str, Any]) -> str:
    """The source-tile name that patches inherit (used to split by tile, never by patch)."""
    if prov.get("tile"):
        return str(prov["tile"])
    if prov.get("source"):
        return Path(str(prov["source"])).stem
    return "sample"


def tile_sample(
    sample: Sample,
    size: int | tuple[int, int],
    stride: int | tuple[int, int] | None = None,
    pad: str = "reflect",
    fill: int = 255,
) -> list[tuple[int, int, Sample]]:
    """Cut ``sample`` into patches; returns ``(y0, x0, patch)`` in row-major order.

    ``size`` and ``stride`` are an int or ``(h, w)``; ``stride`` defaults to ``size``
    (non-overlapping tiles). ``pad`` is ``"reflect"``, ``"constant"`` (image filled with
    ``fill``) or ``"none"``; padded label pixels are always background. Each patch's
    provenance copies the sample's and records ``source``, ``tile`` (the source tile name,
    so that splits can keep a tile's patches together), ``y0``, ``x0`` (window origin in the
    given sample), ``size`` ([h, w]) and ``pad``.
    """
    th, tw = _pair(size, "size")
    sh, sw = _pair(stride if stride is not None else (th, tw), "stride")
    if not 0 <= fill <= 255:
        raise ValueError(f"fill must be a 0-255 grey level, got {fill}")
    h, w = sample.layout.shape
    ys = tile_starts(h, th, sh, pad)
    xs = tile_starts(w, tw, sw, pad)
    if not ys or not xs:
        return []
    need_h, need_w = ys[-1] + th, xs[-1] + tw
    image, layout = sample.image, sample.layout
    if need_h > h or need_w > w:
        widths = ((0, need_h - h), (0, need_w - w))
        if pad == "reflect":
            image = np.pad(image, widths + ((0, 0),), mode="reflect")
        else:
            image = np.pad(image, widths + ((0, 0),), mode="constant", constant_values=fill)
        layout = Layout(np.pad(layout.inst_map, widths), layout.classes, layout.centroids, layout.class_set)
    base = dict(sample.provenance)
    base["source"] = sample.provenance.get("source")
    base["tile"] = _tile_name(sample.provenance)
    out = []
    for y0 in ys:
        for x0 in xs:
            prov = dict(base, y0=int(y0), x0=int(x0), size=[th, tw], pad=pad)
            patch = Sample(layout.crop(y0, x0, th, tw), np.ascontiguousarray(image[y0 : y0 + th, x0 : x0 + tw]), prov)
            out.append((int(y0), int(x0), patch))
    return out


def rescale_sample(sample: Sample, factor: float) -> Sample:
    """Resample ``sample`` by ``factor`` (0.5 halves each side, e.g. 40x -> 20x).

    The image is resampled bilinearly with Gaussian anti-aliasing when shrinking
    (:func:`skimage.transform.resize`); the instance map by nearest neighbour, so no label is
    invented. Nuclei with no pixel left are dropped, ids relabelled contiguous, centroids
    recomputed. Provenance records the cumulative ``scale`` and, when the sample's
    ``magnification`` is known, the new one.
    """
    if not np.isfinite(factor) or factor <= 0:
        raise ValueError(f"rescale factor must be a positive finite number, got {factor}")
    h, w = sample.layout.shape
    shape = (max(1, int(round(h * factor))), max(1, int(round(w * factor))))
    img = resize(sample.image, shape + (3,), order=1, anti_aliasing=factor < 1, preserve_range=True)
    # Bilinear + Gaussian interpolation stays within the input range; rounding can only
    # touch 0 or 255 by float error, which the clip absorbs.
    img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    inst = resize(sample.layout.inst_map, shape, order=0, anti_aliasing=False, preserve_range=True).astype(np.int32)
    new, old_ids = relabel_contiguous(inst)
    lay = sample.layout
    classes = lay.classes[old_ids - 1] if old_ids.size else np.zeros(0, np.int64)
    layout = Layout.from_inst_map(new, classes, lay.class_set)
    prov = dict(sample.provenance)
    prov["scale"] = float(prov.get("scale", 1.0)) * float(factor)
    if prov.get("magnification") is not None:
        prov["magnification"] = float(prov["magnification"]) * float(factor)
    return Sample(layout, img, prov)


def change_magnification(sample: Sample, source_mag: float, target_mag: float) -> Sample:
    """Rescale from ``source_mag`` (e.g. 40) to ``target_mag`` (e.g. 20) objective power."""
    if not (source_mag > 0 and target_mag > 0):
        raise ValueError(f"magnifications must be positive, got {source_mag} -> {target_mag}")
    out = rescale_sample(sample, target_mag / source_mag)
    out.provenance["magnification"] = float(target_mag)
    return out
