"""Patch tiling and magnification change of Samples (image + Layout).

Tiling (:func:`tile_sample`) cuts a Sample into windows of ``size`` pixels every ``stride``
pixels. What happens at the last row / column of windows is the *pad policy*:

- ``"reflect"``: windows start every ``stride`` pixels until the whole image is covered; the
  part of the last window that falls off the image is filled by mirroring the image
  (no visible seam for a model), and the labels are mirrored with it, so that image and
  labels agree everywhere a model trains: a mirrored nucleus is a nucleus of the patch
  (its own id, its original's class), and one that touches the border continues into its
  mirror image as one nucleus.
- ``"constant"``: as ``"reflect"`` but the image is padded with a constant colour ``fill``
  (default 255, white like glass background); labels padded with 0.
- ``"none"``: only windows that fit entirely inside the image are cut; the last window of a
  row/column is moved flush with the border so that, with ``stride <= size``, everything
  that fits is covered (an image smaller than ``size`` gives no patch).

Nuclei cut by a window border keep their visible part; ids are relabelled contiguous and
centroids recomputed from the visible pixels (the semantics of :meth:`Layout.crop`).

Padded pixels are not data: every patch records its source image's ``source_shape``
(with ``y0``, ``x0`` and ``size``), and :func:`crop_to_source` / :func:`source_pairs` cut a
patch's truth and a prediction back to the pixels that came from the source image, which
is what evaluation and fitted statistics score (a mirrored nucleus is no ground truth).

:func:`rescale_sample` changes magnification (e.g. 40x -> 20x is ``factor=0.5``): the image
is resampled with anti-aliasing, labels by nearest neighbour; nuclei that vanish are dropped
and ids relabelled.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from skimage.measure import label as connected_label
from skimage.transform import resize

from nucsynth.layout import Layout, Sample, relabel_contiguous

__all__ = ["PAD_POLICIES", "tile_starts", "tile_sample", "source_extent", "crop_to_source", "source_pairs",
           "rescale_sample", "change_magnification"]

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
    (non-overlapping tiles). ``pad`` is ``"reflect"`` (image and labels mirrored),
    ``"constant"`` (image filled with ``fill``, labels background) or ``"none"`` (see the
    module doc). Each patch's provenance copies the sample's and records ``source``,
    ``tile`` (the source tile name, so that splits can keep a tile's patches together),
    ``y0``, ``x0`` (window origin in the given sample), ``size`` ([h, w]), ``pad``,
    ``source_shape`` ([H, W] of the given sample: with the origin it says which pixels of
    the patch are padding, :func:`source_extent`) and ``source_ids`` (the id in the given
    sample of each patch nucleus 1..N, so that the pieces of a nucleus cut by abutting
    windows can be joined when the image is stitched back, :mod:`nucsynth.evaluate.stitch`).
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
            layout = _mirrored_layout(layout, widths)
        else:
            image = np.pad(image, widths + ((0, 0),), mode="constant", constant_values=fill)
            layout = Layout(np.pad(layout.inst_map, widths), layout.classes, layout.centroids, layout.class_set)
    base = dict(sample.provenance)
    base["source"] = sample.provenance.get("source")
    base["tile"] = _tile_name(sample.provenance)
    out = []
    for y0 in ys:
        for x0 in xs:
            ids = np.unique(layout.inst_map[y0 : y0 + th, x0 : x0 + tw])
            prov = dict(base, y0=int(y0), x0=int(x0), size=[th, tw], pad=pad, source_shape=[h, w],
                        source_ids=ids[ids > 0].tolist())
            patch = Sample(layout.crop(y0, x0, th, tw), np.ascontiguousarray(image[y0 : y0 + th, x0 : x0 + tw]), prov)
            out.append((int(y0), int(x0), patch))
    return out


def _mirrored_layout(layout: Layout, widths: tuple[tuple[int, int], tuple[int, int]]) -> Layout:
    """``layout`` padded by ``widths`` with mirrored labels, as ``np.pad(mode="reflect")``
    pads the image: the source pixels keep their ids; a mirrored piece connected to its
    original (a nucleus touching the border) is the same nucleus; every other mirrored
    piece is a new nucleus (ids N+1, ...) of its original's class."""
    h, w = layout.shape
    inst = np.pad(layout.inst_map, widths, mode="reflect")
    pieces = connected_label(inst, background=0, connectivity=1)  # equal-id 4-connected pieces
    in_source = np.zeros(int(pieces.max()) + 1, bool)
    in_source[np.unique(pieces[:h, :w])] = True
    mirrored = (inst > 0) & ~in_source[pieces]
    new_pieces = np.unique(pieces[mirrored])
    original_id = np.zeros(in_source.size, np.int64)
    original_id[pieces.ravel()] = inst.ravel()  # every pixel of a piece holds the same id
    n = layout.num_nuclei
    new_id = np.zeros(in_source.size, np.int64)
    new_id[new_pieces] = np.arange(n + 1, n + 1 + new_pieces.size)
    out = np.where(mirrored, new_id[pieces], inst)
    classes = np.concatenate([layout.classes, layout.classes[original_id[new_pieces] - 1]]).astype(np.int64)
    return Layout.from_inst_map(out, classes, layout.class_set)


def source_extent(provenance: Mapping[str, Any], shape: tuple[int, int]) -> tuple[int, int] | None:
    """Rows and columns ``(h, w)``, from the top-left corner of a ``shape`` patch, that come
    from its source image; None when all of it does or its provenance does not say (no
    ``source_shape``: a patch written before it was recorded, or a rendered image).

    Raises ValueError when the provenance places the patch entirely off its source.
    """
    src = provenance.get("source_shape")
    if src is None:
        return None
    y0, x0 = int(provenance.get("y0", 0)), int(provenance.get("x0", 0))
    h, w = min(int(shape[0]), int(src[0]) - y0), min(int(shape[1]), int(src[1]) - x0)
    if h < 1 or w < 1:
        raise ValueError(f"provenance places this {tuple(shape)} patch at ({y0}, {x0}), outside its "
                         f"{tuple(src)} source image")
    return None if (h, w) == tuple(shape) else (h, w)


def crop_to_source(layout: Layout, provenance: Mapping[str, Any]) -> Layout:
    """``layout`` (the truth of a patch, or a prediction on its image) without the patch's
    padded rows and columns (:func:`source_extent`); unchanged when it has none."""
    extent = source_extent(provenance, layout.shape)
    return layout if extent is None else layout.crop(0, 0, *extent)


def source_pairs(samples: Sequence[Sample], predictions: Sequence[Layout]) -> tuple[list[Layout], list[Layout]]:
    """Truths and predictions of ``samples`` cut to their source pixels (:func:`crop_to_source`):
    what every evaluation scores, so that padding never counts as tissue."""
    if len(samples) != len(predictions):
        raise ValueError(f"{len(samples)} samples but {len(predictions)} predictions")
    truths = [crop_to_source(s.layout, s.provenance) for s in samples]
    preds = [crop_to_source(p, s.provenance) for s, p in zip(samples, predictions)]
    return truths, preds


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
