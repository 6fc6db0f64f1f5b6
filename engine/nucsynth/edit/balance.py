"""DiffMix balancing maps: replace abundant-class nuclei by rare-class nucleus shapes.

Oh et al. 2023, "DiffMix: diffusion model-based data synthesis for nuclei segmentation and
classification in imbalanced pathology image datasets" (following GradMix, Doan et al.
2022). For each layout:

1. candidates = nuclei of the abundant classes (every known class but the rare one) whose
   centroid lies at least ``border`` px from each canvas edge;
2. a random ``pick_fraction`` of them is processed in ascending size;
3. the target is dilated by ``dilate`` px; a rare nucleus from the pool fits when the
   dilated target area is at least ``area_ratio`` times its area;
4. the target is removed and the rare shape written centred on the target's centroid,
   under the target's id, its class set to the rare class.

Unlike a plain overwrite, the pasted shape must lie inside the target's dilated footprint
minus every other nucleus, so no nucleus is ever overlapped or clipped; when a fitting shape
does not lie inside, the next fitting shape (random order) is tried, and the target is kept
when none does. Balancing stops when the rare class reaches ``target_share`` of the nuclei
(``None``: as many replacements as fit, as in the paper). Ids stay 1..N (each replacement
reuses the target's id) and every nucleus not replaced is unchanged.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage as ndi
from skimage.morphology import disk

from nucsynth.layout import ClassSet, Layout, LayoutError, Sample

__all__ = [
    "BalanceReport",
    "BalanceWarning",
    "Replacement",
    "balance_layout",
    "balance_layout_report",
    "balance_dataset",
    "collect_rare_pool",
    "rare_class_of",
]


class BalanceWarning(UserWarning):
    """The requested share of the rare class could not be reached."""


@dataclass(frozen=True)
class Replacement:
    """One replaced nucleus: its id, the pool entry used and where the entry's mask was put.

    ``top_left`` is the canvas position (y, x) of the pool mask's pixel (0, 0), so mask
    pixel (r, c) lands on canvas pixel (y + r, x + c).
    """

    nucleus_id: int
    old_class: int
    pool_index: int
    top_left: tuple[int, int]


@dataclass
class BalanceReport:
    """What one balancing run achieved."""

    rare_class: int
    num_nuclei: int
    rare_before: int
    rare_after: int
    target_share: float | None
    candidates: int
    processed: int
    no_fit: int
    replacements: list[Replacement] = field(default_factory=list)

    @property
    def share_before(self) -> float:
        return self.rare_before / self.num_nuclei if self.num_nuclei else 0.0

    @property
    def share_after(self) -> float:
        return self.rare_after / self.num_nuclei if self.num_nuclei else 0.0

    @property
    def reached(self) -> bool:
        """Whether the target share was reached (always True when no target was set)."""
        return self.target_share is None or self.rare_after >= _needed(self.target_share, self.num_nuclei)

    def __str__(self) -> str:
        want = "as many as fit" if self.target_share is None else f"target {self.target_share:.1%}"
        txt = (
            f"rare class {self.rare_class}: {self.rare_before} -> {self.rare_after} of {self.num_nuclei} nuclei "
            f"({self.share_before:.1%} -> {self.share_after:.1%}; {want}); "
            f"{len(self.replacements)} replaced, {self.candidates} candidates, {self.processed} processed, "
            f"{self.no_fit} without a fitting rare shape"
        )
        if not self.reached:
            txt += (
                " - target NOT reached: too few abundant nuclei away from the border or no pool shapes small "
                "enough (try a larger pick_fraction, a smaller border, or more and smaller pool shapes)"
            )
        return txt


def _needed(share: float, n: int) -> int:
    # Rare nuclei needed for `share`; the epsilon guards against float error (0.3 * 10 = 3.0000000000000004).
    return int(math.ceil(share * n - 1e-9))


def rare_class_of(class_set_rare: int | None, rare_class: int | None) -> int:
    """The rare class to use: ``rare_class`` if given, else the class set's; error if neither."""
    k = rare_class if rare_class is not None else class_set_rare
    if k is None:
        raise LayoutError("no rare class: the class set defines none, pass rare_class=K explicitly")
    return int(k)


def collect_rare_pool(
    layouts: Iterable[Layout | Sample],
    rare_class: int | None = None,
    include_cut: bool = False,
    class_set: ClassSet | None = None,
) -> list[np.ndarray]:
    """Boolean masks (cropped to the bounding box) of every rare-class nucleus in ``layouts``.

    Nuclei touching the canvas border are left out unless ``include_cut`` (a cut nucleus is
    not a whole nucleus shape). ``rare_class`` is a class of ``class_set`` (default: the
    first layout's class set) and defaults to its ``rare``. Every layout's classes are
    matched to that set by name (:meth:`Layout.to_class_set`), so layouts of another class
    set never lend their own "rare" class; one naming other classes raises
    :class:`~nucsynth.layout.ClassSetMismatch` (map it first with ``to_class_set(cs, mapping)``).
    """
    pool = []
    for item in layouts:
        lay = item.layout if isinstance(item, Sample) else item
        class_set = class_set or lay.class_set
        lay = lay.to_class_set(class_set)
        k = rare_class_of(class_set.rare, rare_class)
        h, w = lay.shape
        for i, sl in enumerate(ndi.find_objects(lay.inst_map), start=1):
            if sl is None or lay.classes[i - 1] != k:
                continue
            if not include_cut and (sl[0].start == 0 or sl[1].start == 0 or sl[0].stop == h or sl[1].stop == w):
                continue
            pool.append(lay.inst_map[sl] == i)
    return pool


def _check_pool(rare_pool: Sequence[np.ndarray]) -> list[np.ndarray]:
    if len(rare_pool) == 0:
        raise ValueError(
            "the rare pool is empty: balancing needs rare-class nucleus shapes "
            "(collect them with nucsynth.edit.balance.collect_rare_pool)"
        )
    out = []
    for j, m in enumerate(rare_pool):
        a = np.asarray(m)
        if a.ndim != 2 or a.dtype.kind not in "biu" or not np.isin(a, (0, 1)).all():
            raise ValueError(f"rare pool entry {j} must be a 2-D binary mask, got shape {a.shape} dtype {a.dtype}")
        if not a.any():
            raise ValueError(f"rare pool entry {j} is an empty mask (no nucleus pixels)")
        out.append(a.astype(bool))
    return out


def _check_params(target_share, pick_fraction, dilate, area_ratio, border) -> None:
    if target_share is not None and not (0.0 <= float(target_share) <= 1.0):
        raise ValueError(f"target_share must be in [0, 1] (a share of all nuclei) or None, got {target_share}")
    if not 0.0 <= pick_fraction <= 1.0:
        raise ValueError(f"pick_fraction must be in [0, 1], got {pick_fraction}")
    if dilate < 0 or border < 0 or area_ratio <= 0:
        raise ValueError(f"dilate and border must be >= 0 and area_ratio > 0, got {dilate}, {border}, {area_ratio}")


def balance_layout_report(
    layout: Layout,
    rare_pool: Sequence[np.ndarray],
    target_share: float | None = None,
    seed: int = 0,
    border: int = 30,
    pick_fraction: float = 0.8,
    dilate: int = 2,
    area_ratio: float = 2.3,
    rare_class: int | None = None,
) -> tuple[Layout, BalanceReport]:
    """:func:`balance_layout` that also returns a :class:`BalanceReport` (what was achieved)."""
    _check_params(target_share, pick_fraction, dilate, area_ratio, border)
    pool = _check_pool(rare_pool)
    rare = rare_class_of(layout.class_set.rare, rare_class)
    if not 1 <= rare <= layout.class_set.num_classes:
        raise LayoutError(f"rare class {rare} is outside the class set {layout.class_set.name!r}")
    rng = np.random.default_rng(seed)
    n = layout.num_nuclei
    inst = layout.inst_map.copy()
    classes = layout.classes.copy()
    cen = layout.centroids.copy()
    areas = layout.areas()
    h, w = layout.shape
    # Pool masks may carry empty margins (GradMix keeps image context around them): fit the
    # tight box of each shape, and report positions relative to the full mask.
    tight = [ndi.find_objects(m.astype(np.int8))[0] for m in pool]
    shapes = [m[t] for m, t in zip(pool, tight)]
    pool_area = np.array([m.sum() for m in shapes])
    pool_com = np.array([ndi.center_of_mass(m) for m in shapes])
    rare_before = int((classes == rare).sum())
    cy, cx = cen[:, 0], cen[:, 1]
    inside = (cy >= border) & (cy <= h - 1 - border) & (cx >= border) & (cx <= w - 1 - border)
    cand = np.flatnonzero((classes != rare) & (classes != 0) & (areas > 0) & inside)
    picked = rng.choice(cand, size=int(round(pick_fraction * cand.size)), replace=False) if cand.size else cand
    picked = picked[np.argsort(areas[picked], kind="stable")]
    need = None if target_share is None else _needed(float(target_share), n)
    report = BalanceReport(rare, n, rare_before, rare_before, target_share, int(cand.size), 0, 0)
    slices = ndi.find_objects(layout.inst_map)
    selem = disk(dilate) if dilate > 0 else np.ones((1, 1), bool)
    pad = dilate
    for idx in picked:
        if need is not None and report.rare_after >= need:
            break
        report.processed += 1
        i = int(idx) + 1
        sl = slices[idx]
        # Work in the target's bounding box grown by the dilation radius.
        y0, y1 = max(sl[0].start - pad, 0), min(sl[0].stop + pad, h)
        x0, x1 = max(sl[1].start - pad, 0), min(sl[1].stop + pad, w)
        box = inst[y0:y1, x0:x1]
        dil = ndi.binary_dilation(box == i, structure=selem)
        allowed = dil & ((box == 0) | (box == i))
        fits = np.flatnonzero(pool_area * area_ratio <= dil.sum())
        placed = None
        for j in rng.permutation(fits):
            m = shapes[j]
            top = int(round(cen[idx, 0] - pool_com[j][0])) - y0
            left = int(round(cen[idx, 1] - pool_com[j][1])) - x0
            if top < 0 or left < 0 or top + m.shape[0] > box.shape[0] or left + m.shape[1] > box.shape[1]:
                continue  # part of the shape would fall outside the footprint box
            if np.all(allowed[top : top + m.shape[0], left : left + m.shape[1]][m]):
                placed = (int(j), top, left)
                break
        if placed is None:
            report.no_fit += 1
            continue
        j, top, left = placed
        m = shapes[j]
        box[box == i] = 0
        box[top : top + m.shape[0], left : left + m.shape[1]][m] = i
        ys, xs = np.nonzero(m)
        cen[idx] = (ys.mean() + top + y0, xs.mean() + left + x0)
        origin = (top + y0 - tight[j][0].start, left + x0 - tight[j][1].start)
        report.replacements.append(Replacement(i, int(classes[idx]), j, origin))
        classes[idx] = rare
        report.rare_after += 1
    out = Layout(inst, classes, cen, layout.class_set)
    return out, report


def balance_layout(
    layout: Layout,
    rare_pool: Sequence[np.ndarray],
    target_share: float | None = None,
    seed: int = 0,
    border: int = 30,
    pick_fraction: float = 0.8,
    dilate: int = 2,
    area_ratio: float = 2.3,
    rare_class: int | None = None,
) -> Layout:
    """A DiffMix balancing map of ``layout`` (see the module docstring for the procedure).

    ``rare_pool``: binary masks of rare-class nuclei (e.g. from :func:`collect_rare_pool`);
    ``target_share``: stop once the rare class is this share of all nuclei (``None``: replace
    as many as fit); ``rare_class`` defaults to ``layout.class_set.rare``. Emits a
    :class:`BalanceWarning` describing what was achieved when the target is not reached; use
    :func:`balance_layout_report` to get the figures instead.
    """
    out, report = balance_layout_report(
        layout, rare_pool, target_share, seed, border, pick_fraction, dilate, area_ratio, rare_class
    )
    if not report.reached:
        warnings.warn(str(report), BalanceWarning, stacklevel=2)
    return out


def balance_dataset(
    layouts: Sequence[Layout],
    rare_pool: Sequence[np.ndarray] | None = None,
    target_share: float | None = None,
    seed: int = 0,
    **options,
) -> tuple[list[Layout], list[BalanceReport]]:
    """Balance every layout (each aims at ``target_share`` of its own nuclei).

    ``rare_pool`` defaults to the rare nuclei of ``layouts`` themselves. Layout ``i`` uses
    seed ``seed + i``. Returns the balanced layouts and one report per layout.
    """
    layouts = list(layouts)
    if rare_pool is None:
        rare_pool = collect_rare_pool(layouts, options.get("rare_class"))
    out, reports = [], []
    for i, lay in enumerate(layouts):
        b, r = balance_layout_report(lay, rare_pool, target_share, seed + i, **options)
        out.append(b)
        reports.append(r)
    return out, reports
