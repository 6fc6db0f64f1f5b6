"""nucsynth.edit.region.edited_region: the region masked re-rendering regenerates."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from nucsynth.edit.region import REGION_MARGIN, edited_region
from nucsynth.layout import CONSEP_CLASSES, Layout


def _layout(inst: np.ndarray, classes) -> Layout:
    return Layout.from_inst_map(inst, np.asarray(classes), CONSEP_CLASSES)


def _two_squares() -> np.ndarray:
    inst = np.zeros((48, 48), np.int32)
    inst[5:11, 5:11] = 1
    inst[30:38, 28:36] = 2
    return inst


def test_unchanged_layout_has_no_region() -> None:
    lay = _layout(_two_squares(), [1, 2])
    mask = edited_region(lay, lay)
    assert mask.dtype == bool and mask.shape == lay.shape and not mask.any()


def test_deleted_nucleus_is_the_region_grown_by_the_margin() -> None:
    inst = _two_squares()
    before = _layout(inst, [1, 2])
    after_inst = (inst == 2).astype(np.int32)  # nucleus 1 deleted, nucleus 2 is now id 1
    after = _layout(after_inst, [2])
    exact = edited_region(before, after, margin=0)
    # the deleted pixels and their (now gone) instance edge band, nothing else
    assert exact[inst == 1].all() and not (exact & ~ndi.binary_dilation(inst == 1, iterations=1)).any()
    grown = edited_region(before, after)
    assert np.array_equal(grown, ndi.binary_dilation(exact, iterations=REGION_MARGIN))
    assert not grown[30:38, 28:36].any()  # far from the edit: kept


def test_class_change_alone_is_an_edit() -> None:
    inst = _two_squares()
    mask = edited_region(_layout(inst, [1, 2]), _layout(inst, [1, 3]), margin=0)
    assert np.array_equal(mask, inst == 2)  # same pixels and edges, new class: only that nucleus


def test_split_nucleus_changes_its_edges() -> None:
    inst = _two_squares()
    split = inst.copy()
    split[30:38, 32:36] = 3  # same pixels, now two touching nuclei
    mask = edited_region(_layout(inst, [1, 2]), _layout(split, [1, 2, 2]), margin=0)
    assert mask.any() and mask[30:38, 28:36].sum() == mask.sum()


def test_bad_input() -> None:
    lay = _layout(_two_squares(), [1, 2])
    other = _layout(np.zeros((32, 48), np.int32), [])
    with pytest.raises(ValueError, match="changed size"):
        edited_region(lay, other)
    with pytest.raises(ValueError, match="margin"):
        edited_region(lay, lay, margin=-1)
