"""GradMix pixel blending: the image-space baseline of DiffMix balancing.

Doan et al. 2022, "GradMix for nuclei segmentation and classification in imbalanced
pathology image datasets" (MICCAI). A rare-class nucleus is cut, with some context, from a
source image and pasted over a removed abundant-class nucleus of the target image:

- the pasted nuclear pixels are colour-shifted halfway towards the target's mean nuclear
  colour;
- the ring of ``ring_width`` px around the pasted nucleus mixes the source context with the
  target, weighted by the normalized distance to the nucleus (source at the nucleus, target
  at the ring's outer edge);
- a median filter smooths the ring.

The pixels of the removed nucleus that the paste does not cover are first filled with the
nearest background pixel of the target (then blended and median filtered like the ring), so
no trace of the removed nucleus is left. Pixels of other nuclei are never changed. The label
side is :func:`nucsynth.edit.balance.balance_layout_report`, so GradMix and DiffMix balance
exactly the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage as ndi

from nucsynth.edit.balance import balance_layout_report, rare_class_of
from nucsynth.layout import Sample

__all__ = ["RarePatch", "collect_rare_patches", "gradmix_blend", "gradmix_balance"]


@dataclass(frozen=True)
class RarePatch:
    """A rare nucleus with image context: ``mask`` bool (h, w) and ``image`` uint8 (h, w, 3).

    The mask holds the nucleus with ``margin`` px of context on every side.
    """

    mask: np.ndarray
    image: np.ndarray


def collect_rare_patches(
    samples: Iterable[Sample], rare_class: int | None = None, margin: int = 6
) -> list[RarePatch]:
    """Every rare-class nucleus of ``samples`` not touching the image border, with ``margin``
    px of image context (reflected where the context leaves the image)."""
    out = []
    for s in samples:
        lay = s.layout
        k = rare_class_of(lay.class_set.rare, rare_class)
        h, w = lay.shape
        img = np.pad(s.image, ((margin, margin), (margin, margin), (0, 0)), mode="reflect")
        for i, sl in enumerate(ndi.find_objects(lay.inst_map), start=1):
            if sl is None or lay.classes[i - 1] != k:
                continue
            if sl[0].start == 0 or sl[1].start == 0 or sl[0].stop == h or sl[1].stop == w:
                continue
            y0, y1, x0, x1 = sl[0].start, sl[0].stop + 2 * margin, sl[1].start, sl[1].stop + 2 * margin
            mask = np.zeros((y1 - y0, x1 - x0), bool)
            mask[margin:-margin or None, margin:-margin or None] = lay.inst_map[sl] == i
            out.append(RarePatch(mask, img[y0:y1, x0:x1].copy()))
    return out


def _place(shape_hw: tuple[int, int], patch_shape: tuple[int, int], top_left: tuple[int, int]):
    """Canvas and patch slices of a patch placed with its pixel (0, 0) at ``top_left``."""
    h, w = shape_hw
    ty, tx = top_left
    y0, x0 = max(ty, 0), max(tx, 0)
    y1, x1 = min(ty + patch_shape[0], h), min(tx + patch_shape[1], w)
    if y0 >= y1 or x0 >= x1:
        raise ValueError(f"the patch placed at {top_left} does not overlap the {h}x{w} image")
    return (slice(y0, y1), slice(x0, x1)), (slice(y0 - ty, y1 - ty), slice(x0 - tx, x1 - tx))


def gradmix_blend(
    image: np.ndarray,
    protected: np.ndarray,
    patch: RarePatch,
    top_left: tuple[int, int],
    nuclear_colour: np.ndarray,
    clear: np.ndarray | None = None,
    ring_width: int = 4,
    median_size: int = 3,
) -> np.ndarray:
    """Paste ``patch`` into ``image`` (uint8 (H, W, 3)) with its pixel (0, 0) at ``top_left``.

    ``protected``: bool (H, W), pixels that must not change (other nuclei);
    ``nuclear_colour``: the target's mean nuclear RGB (the pasted nucleus moves halfway to it);
    ``clear``: bool (H, W), pixels of a removed nucleus to repaint as background.
    Returns a new uint8 image.
    """
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    if protected.shape != image.shape[:2] or (clear is not None and clear.shape != image.shape[:2]):
        raise ValueError("protected and clear masks must have the image's (H, W) shape")
    if ring_width < 1 or median_size < 1:
        raise ValueError(f"ring_width and median_size must be >= 1, got {ring_width}, {median_size}")
    # Work in a window around the paste and the cleared pixels: every step is local.
    csl, _ = _place(image.shape[:2], patch.mask.shape, top_left)
    y0, y1, x0, x1 = csl[0].start, csl[0].stop, csl[1].start, csl[1].stop
    if clear is not None and clear.any():
        cy, cx = np.nonzero(clear)
        y0, y1, x0, x1 = min(y0, cy.min()), max(y1, cy.max() + 1), min(x0, cx.min()), max(x1, cx.max() + 1)
    pad = ring_width + median_size + 2
    win = (slice(max(y0 - pad, 0), min(y1 + pad, image.shape[0])), slice(max(x0 - pad, 0), min(x1 + pad, image.shape[1])))
    result = image.copy()
    result[win] = _blend_window(
        image[win], protected[win], patch, (top_left[0] - win[0].start, top_left[1] - win[1].start),
        nuclear_colour, None if clear is None else clear[win], ring_width, median_size,
    )
    return result


def _blend_window(
    image: np.ndarray,
    protected: np.ndarray,
    patch: RarePatch,
    top_left: tuple[int, int],
    nuclear_colour: np.ndarray,
    clear: np.ndarray | None,
    ring_width: int,
    median_size: int,
) -> np.ndarray:
    h, w = image.shape[:2]
    out = image.astype(np.float64)
    csl, psl = _place((h, w), patch.mask.shape, top_left)
    nucleus = np.zeros((h, w), bool)
    nucleus[csl] = patch.mask[psl]
    context = np.zeros((h, w), bool)
    context[csl] = True
    src = np.zeros_like(out)
    src[csl] = patch.image[psl]
    touched = np.zeros((h, w), bool)
    if clear is not None and clear.any():
        # Repaint the removed nucleus with the nearest target pixel that is neither nucleus nor cleared.
        _, (iy, ix) = ndi.distance_transform_edt(clear | protected, return_indices=True)
        out[clear] = out[iy[clear], ix[clear]]
        touched |= clear
    shift = 0.5 * (np.asarray(nuclear_colour, np.float64) - patch.image[patch.mask].mean(axis=0))
    dist = ndi.distance_transform_edt(~nucleus)
    ring = (dist > 0) & (dist <= ring_width) & context & ~protected
    alpha = 1.0 - dist[ring] / (ring_width + 1)  # normalized distance: 1 at the nucleus, -> 0 outwards
    out[ring] = alpha[:, None] * src[ring] + (1 - alpha[:, None]) * out[ring]
    out[nucleus] = src[nucleus] + shift
    smooth_zone = (ring | touched) & ~nucleus & ~protected
    if median_size > 1 and smooth_zone.any():
        med = ndi.median_filter(out, size=(median_size, median_size, 1))
        out[smooth_zone] = med[smooth_zone]
    return np.rint(np.clip(out, 0, 255)).astype(np.uint8)


def gradmix_balance(
    sample: Sample,
    rare_pool_samples: Sequence[Sample] | Sequence[RarePatch],
    target_share: float | None = None,
    seed: int = 0,
    ring_width: int = 4,
    median_size: int = 3,
    rare_class: int | None = None,
    **balance_options,
) -> Sample:
    """GradMix: balance ``sample``'s layout (DiffMix rules) and blend the rare nuclei's pixels in.

    ``rare_pool_samples``: Samples to take rare nuclei (with image context) from, or
    ready-made :class:`RarePatch` objects. ``balance_options`` go to
    :func:`~nucsynth.edit.balance.balance_layout_report` (border, pick_fraction, dilate,
    area_ratio). The provenance records the method, seed and the rare class counts.
    """
    pool = list(rare_pool_samples)
    if pool and isinstance(pool[0], Sample):
        pool = collect_rare_patches(pool, rare_class, margin=ring_width)
    layout = sample.layout
    new, report = balance_layout_report(
        layout, [p.mask for p in pool], target_share, seed, rare_class=rare_class, **balance_options
    )
    nuclei = layout.inst_map > 0
    colour = sample.image[nuclei].mean(axis=0) if nuclei.any() else np.array([128.0, 128.0, 128.0])
    img = sample.image
    for r in report.replacements:
        old = layout.inst_map == r.nucleus_id
        now = new.inst_map == r.nucleus_id
        protected = (new.inst_map != 0) & ~now
        img = gradmix_blend(img, protected, pool[r.pool_index], r.top_left, colour, old & ~now, ring_width, median_size)
    prov = dict(sample.provenance)
    prov.update(
        edit="gradmix",
        edit_seed=int(seed),
        target_share=target_share,
        rare_class=report.rare_class,
        rare_before=report.rare_before,
        rare_after=report.rare_after,
    )
    return Sample(new, img, prov)
