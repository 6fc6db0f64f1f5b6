"""The DiffMix rare pool: which rare-class nucleus shapes balancing may paste.

One rule for every front-end (CLI, batch dock, designer): the whole rare-class nuclei of the
source layouts themselves (:func:`nucsynth.edit.balance.collect_rare_pool`), topped up to at
least ``least`` shapes with shapes drawn from the rare class' size and shape statistics
measured on real data (:mod:`nucsynth.generate.stats`). A source with many rare nuclei (a
CoNSeP training set has 432) uses only its own; a single patch with one or none still gets a
varied pool. ``least=0`` keeps the source's shapes only (DiffMix's own rule).
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from nucsynth.layout import Layout, Sample

__all__ = ["POOL_LEAST", "rare_pool"]

#: the least number of rare-class shapes offered to balancing (source shapes first)
POOL_LEAST = 64


def rare_pool(layouts: Iterable[Layout | Sample], seed: int = 0, least: int = POOL_LEAST) -> list[np.ndarray]:
    """Boolean masks (cropped to their bounding box) of rare-class nucleus shapes: those of
    ``layouts``, then ``max(0, least - found)`` drawn from the rare class' statistics with
    ``seed``. Raises ValueError when the class set has no rare class, or when nothing could
    be found or drawn (``least=0`` and no rare nucleus in the source)."""
    from nucsynth.edit.balance import collect_rare_pool

    lays = [s.layout if isinstance(s, Sample) else s for s in layouts]
    if not lays:
        raise ValueError("rare pool: no layouts given")
    if int(least) < 0:
        raise ValueError(f"rare pool: least must be >= 0, got {least}")
    cs = lays[0].class_set
    if cs.rare is None:
        raise ValueError(f"class set {cs.name!r} names no rare class: DiffMix balancing needs one")
    pool = collect_rare_pool(lays)
    if len(pool) < least:
        from nucsynth.generate.layouts import nucleus_shape
        from nucsynth.generate.stats import stats_for_class

        rng = np.random.default_rng(seed)
        stats = stats_for_class(cs, cs.rare)
        pool += [nucleus_shape(stats, rng) for _ in range(int(least) - len(pool))]
    if not pool:
        raise ValueError(f"rare pool: the source holds no whole {cs.names[cs.rare - 1]!r} nucleus and least=0 "
                         "allows no drawn shapes")
    return pool
