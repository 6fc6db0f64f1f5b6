"""The region of a layout that an edit changed: what masked re-rendering regenerates.

After a user edits a rendered layout (adds, deletes, reshapes or re-classes nuclei), only
the changed pixels and a margin around them need new tissue; the rest of the last render
is kept by the sampler's masked re-rendering (``SemanticModel.sample(..., mask=...)``).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from nucsynth.layout import Layout

__all__ = ["REGION_MARGIN", "edited_region"]

#: px the changed pixels are grown by, so regenerated nuclei blend into their surroundings
REGION_MARGIN = 8


def edited_region(before: Layout, after: Layout, margin: int = REGION_MARGIN) -> np.ndarray:
    """bool (H, W) mask, True where ``after`` differs from ``before`` (class, nucleus mask or
    instance edge), grown by ``margin`` px (0 = the changed pixels only).

    The two layouts must share a canvas size (a resized layout has to be rendered anew).
    """
    if before.shape != after.shape:
        raise ValueError(f"the layout changed size ({before.shape} -> {after.shape}): render it anew")
    if int(margin) < 0:
        raise ValueError(f"margin must be >= 0 px, got {margin}")
    diff = (before.type_map() != after.type_map()) | (before.edge_map() != after.edge_map())
    diff |= (before.inst_map > 0) != (after.inst_map > 0)
    if margin > 0 and diff.any():
        diff = ndi.binary_dilation(diff, iterations=int(margin))
    return diff
