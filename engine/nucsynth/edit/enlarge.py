"""DiffMix enlarging maps: move randomly chosen nuclei by a few pixels.

Oh et al. 2023 (DiffMix) make extra label maps by shifting randomly chosen nuclei by a small
random offset (0-3 px in x and y), with no overlaps and every nucleus kept inside the patch.

Rules used here:

- a shift is an integer offset (dy, dx) drawn uniformly from [-max_shift, max_shift]^2
  without (0, 0);
- a shift is rejected when any moved pixel would leave the canvas or land on a pixel of
  another nucleus ("overlap" = a shared pixel; nuclei may touch, i.e. become 4-neighbours,
  as they do in real tissue: instance maps keep touching nuclei apart by their ids);
- after a rejected offset another one is drawn, up to ``tries`` times; then the nucleus
  stays in place;
- nuclei that touch the canvas border are never moved (they are cut by the border, and
  moving them would show the straight cut edge inside the patch or push pixels out);
- shapes, classes and ids are kept; a moved nucleus' centroid moves by exactly its offset.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from nucsynth.layout import Layout

__all__ = ["enlarge_layout", "shift_nucleus"]


def shift_nucleus(inst: np.ndarray, nucleus_id: int, dy: int, dx: int) -> bool:
    """Move nucleus ``nucleus_id`` of ``inst`` (in place) by (dy, dx) if that is allowed.

    Allowed = every moved pixel stays on the canvas and lands on background or on the
    nucleus' own old pixels. Returns whether it moved.
    """
    ys, xs = np.nonzero(inst == nucleus_id)
    return _shift_pixels(inst, nucleus_id, ys, xs, dy, dx)


def _shift_pixels(inst: np.ndarray, nucleus_id: int, ys: np.ndarray, xs: np.ndarray, dy: int, dx: int) -> bool:
    if ys.size == 0:
        return False
    ny, nx = ys + dy, xs + dx
    h, w = inst.shape
    if ny.min() < 0 or nx.min() < 0 or ny.max() >= h or nx.max() >= w:
        return False
    dest = inst[ny, nx]
    if np.any((dest != 0) & (dest != nucleus_id)):
        return False
    inst[ys, xs] = 0
    inst[ny, nx] = nucleus_id
    return True


def enlarge_layout(
    layout: Layout, fraction: float = 0.5, max_shift: int = 3, seed: int = 0, tries: int = 10
) -> Layout:
    """A DiffMix enlarging map: ``fraction`` of the nuclei, chosen at random, shifted by random
    integer offsets in [-max_shift, max_shift] (see the module docstring for the rules).

    Point-only nuclei (no pixels) and nuclei touching the border are not moved. Deterministic
    for a given seed.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1] (share of nuclei to move), got {fraction}")
    if int(max_shift) != max_shift or max_shift < 1:
        raise ValueError(f"max_shift must be a whole number of pixels >= 1, got {max_shift}")
    if tries < 1:
        raise ValueError(f"tries must be >= 1, got {tries}")
    max_shift = int(max_shift)
    rng = np.random.default_rng(seed)
    inst = layout.inst_map.copy()
    cen = layout.centroids.copy()
    h, w = layout.shape
    slices = ndi.find_objects(inst)
    movable = []
    for i, sl in enumerate(slices, start=1):
        if sl is not None and sl[0].start > 0 and sl[1].start > 0 and sl[0].stop < h and sl[1].stop < w:
            movable.append(i)
    k = int(round(fraction * len(movable)))
    chosen = rng.choice(np.asarray(movable, np.int64), size=k, replace=False) if k else []
    side = 2 * max_shift + 1
    for i in chosen:
        sl = slices[i - 1]  # nuclei are moved one at a time, so nucleus i is still where it was
        ys, xs = np.nonzero(inst[sl] == i)
        ys, xs = ys + sl[0].start, xs + sl[1].start
        for _ in range(tries):
            code = int(rng.integers(side * side - 1))
            code += code >= (side * side) // 2  # skip the (0, 0) offset in the middle
            dy, dx = code // side - max_shift, code % side - max_shift
            if _shift_pixels(inst, int(i), ys, xs, dy, dx):
                cen[i - 1] += (dy, dx)
                break
    return Layout(inst, layout.classes.copy(), cen, layout.class_set)
