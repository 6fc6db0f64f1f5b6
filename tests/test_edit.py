"""DiffMix balancing and enlarging maps, GradMix blending: property and example tests."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import ndimage as ndi

from nucsynth.edit.balance import (
    BalanceWarning,
    balance_dataset,
    balance_layout,
    balance_layout_report,
    collect_rare_pool,
)
from nucsynth.edit.enlarge import enlarge_layout, shift_nucleus
from nucsynth.edit.gradmix import RarePatch, collect_rare_patches, gradmix_balance, gradmix_blend
from nucsynth.generate.layouts import random_layout
from nucsynth.generate.tissue import procedural_sample
from nucsynth.layout import Layout, LayoutError

from conftest import disk_layout_arrays

SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _disc(r: int) -> np.ndarray:
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return yy**2 + xx**2 <= r * r


POOL = [_disc(r) for r in (3, 4, 4, 5, 6)]


def _valid(lay: Layout) -> None:
    """Ids contiguous 1..N with pixels for each nucleus that has them, one connected region each."""
    assert lay.inst_map.max() <= lay.num_nuclei
    for i, sl in enumerate(ndi.find_objects(lay.inst_map), start=1):
        if sl is not None:
            assert ndi.label(lay.inst_map[sl] == i)[1] == 1, f"nucleus {i} is split"


def _unchanged(before: Layout, after: Layout, ids) -> None:
    for i in ids:
        assert np.array_equal(before.inst_map == i, after.inst_map == i)
        assert before.classes[i - 1] == after.classes[i - 1]
        assert np.array_equal(before.centroids[i - 1], after.centroids[i - 1])


# ------------------------------------------------------------------------------ balancing
@SETTINGS
@given(seed=st.integers(0, 10_000), share=st.floats(0.05, 0.3), density=st.floats(30, 70))
def test_balance_reaches_share_without_overlaps(seed, share, density):
    lay = random_layout((192, 192), density=density, seed=seed)
    out, rep = balance_layout_report(lay, POOL, target_share=share, seed=seed, border=10)
    _valid(out)
    assert out.num_nuclei == lay.num_nuclei and out.shape == lay.shape
    rare = out.class_set.rare
    replaced = {r.nucleus_id for r in rep.replacements}
    # Untouched nuclei are exactly as before; replaced ones became rare; nothing was overlapped.
    _unchanged(lay, out, [i for i in range(1, lay.num_nuclei + 1) if i not in replaced])
    for i in replaced:
        assert out.classes[i - 1] == rare
        new = out.inst_map == i
        assert new.any()
        # The paste stays within the target's footprint dilated by 2 px.
        old = ndi.binary_dilation(lay.inst_map == i, structure=_disc(2))
        assert not (new & ~old).any()
    assert (out.classes == rare).sum() == rep.rare_after
    needed = int(np.ceil(share * lay.num_nuclei - 1e-9))
    picked = int(round(0.8 * rep.candidates))
    if rep.reached:
        assert rep.share_after >= share - 1e-9
        assert rep.rare_after == max(needed, rep.rare_before)  # stops as soon as the share is reached
    else:
        # Short only when every picked candidate was tried, and the report says so.
        assert rep.processed == picked and picked - rep.no_fit < needed - rep.rare_before
        assert "NOT reached" in str(rep)


def test_balance_follows_the_paper_rules():
    inst, classes = disk_layout_arrays(
        shape=(100, 100),
        centres=((50, 50, 6), (50, 68, 8), (10, 10, 6), (65, 40, 9), (30, 40, 3)),
        classes=(2, 3, 4, 2, 1),
    )
    lay = Layout.from_inst_map(inst, classes)
    pool = [_disc(3), _disc(8)]
    out, rep = balance_layout_report(lay, pool, seed=0, pick_fraction=1.0)
    # Nucleus 3 is within 30 px of the border; the rare nucleus 5 is no candidate.
    assert rep.candidates == 3
    assert {r.nucleus_id for r in rep.replacements} == {1, 2, 4}
    # Only the r=3 disc fits (dilated target area >= 2.3 x rare area); it lands on the target's centroid.
    assert all(r.pool_index == 0 for r in rep.replacements)
    assert np.allclose(out.centroids[[0, 1, 3]], lay.centroids[[0, 1, 3]])
    assert list(out.classes) == [1, 1, 4, 1, 1]
    assert np.array_equal(out.inst_map == 3, inst == 3)
    # Ascending size: the smallest target (id 1, r=6) first when only one replacement is wanted.
    one, rep1 = balance_layout_report(lay, pool, target_share=0.4, seed=0, pick_fraction=1.0)
    assert [r.nucleus_id for r in rep1.replacements] == [1]


def test_balance_never_overlaps_a_neighbour_inside_the_dilation():
    # Target (class 2) with a neighbour 1 px away: a rare disc that would cover the gap is refused.
    inst = np.zeros((80, 80), np.int32)
    yy, xx = np.mgrid[0:80, 0:80]
    inst[(yy - 40) ** 2 + (xx - 40) ** 2 <= 49] = 1
    inst[30:51, 48:52] = 2
    lay = Layout.from_inst_map(inst, [2, 3])
    out, rep = balance_layout_report(lay, [_disc(4)], seed=0, pick_fraction=1.0, border=5)
    assert np.array_equal(out.inst_map == 2, inst == 2)
    if rep.replacements:
        assert not ((out.inst_map == 1) & (inst == 2)).any()


def test_balance_reports_shortfall():
    lay = random_layout((128, 128), density=40, seed=2)
    with pytest.warns(BalanceWarning, match="NOT reached"):
        out = balance_layout(lay, POOL, target_share=0.95, seed=0)
    assert (out.classes == 1).sum() < 0.95 * out.num_nuclei
    # No warning when the share is already reached: nothing changes.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same = balance_layout(lay, POOL, target_share=0.0, seed=0)
    assert same.equals(lay)


def test_balance_deterministic_and_bad_input():
    lay = random_layout((160, 160), seed=4)
    assert balance_layout(lay, POOL, seed=3).equals(balance_layout(lay, POOL, seed=3))
    with pytest.raises(ValueError, match="pool is empty"):
        balance_layout(lay, [])
    with pytest.raises(ValueError, match="binary mask"):
        balance_layout(lay, [np.full((3, 3), 2)])
    with pytest.raises(ValueError, match="empty mask"):
        balance_layout(lay, [np.zeros((3, 3), bool)])
    with pytest.raises(ValueError, match="target_share"):
        balance_layout(lay, POOL, target_share=1.5)
    with pytest.raises(ValueError, match="pick_fraction"):
        balance_layout(lay, POOL, pick_fraction=2)
    from nucsynth.layout import NUCLEUS_CLASSES

    one = Layout.from_inst_map(lay.inst_map, np.ones(lay.num_nuclei, int), NUCLEUS_CLASSES)
    with pytest.raises(LayoutError, match="no rare class"):
        balance_layout(one, POOL)


def test_collect_rare_pool_and_dataset():
    lays = [random_layout((128, 128), density=60, class_shares=[1, 1, 1, 1], seed=s) for s in range(3)]
    pool = collect_rare_pool(lays)
    n_rare_whole = 0
    for lay in lays:
        for i, sl in enumerate(ndi.find_objects(lay.inst_map), start=1):
            if lay.classes[i - 1] == 1 and sl[0].start > 0 and sl[1].start > 0 and sl[0].stop < 128 and sl[1].stop < 128:
                n_rare_whole += 1
    assert len(pool) == n_rare_whole > 0
    assert all(m.dtype == bool and m.any() for m in pool)
    assert len(collect_rare_pool(lays, include_cut=True)) == sum(int((lay.classes == 1).sum()) for lay in lays)
    out, reports = balance_dataset(lays, target_share=0.5, border=5)
    assert len(out) == 3 and all(r.rare_after >= r.rare_before for r in reports)
    for a, b in zip(lays, out):
        _valid(b)
        assert (b.classes == 1).sum() >= (a.classes == 1).sum()


# ------------------------------------------------------------------------------ enlarging
@SETTINGS
@given(seed=st.integers(0, 10_000), fraction=st.floats(0.0, 1.0), max_shift=st.integers(1, 5),
       density=st.floats(20, 120))
def test_enlarge_properties(seed, fraction, max_shift, density):
    lay = random_layout((128, 128), density=density, seed=seed)
    out = enlarge_layout(lay, fraction=fraction, max_shift=max_shift, seed=seed)
    _valid(out)
    assert out.num_nuclei == lay.num_nuclei and np.array_equal(out.classes, lay.classes)
    assert np.array_equal(out.areas(), lay.areas())  # no pixel lost: inside the patch, no overlap
    h, w = lay.shape
    for i, (a, b) in enumerate(zip(ndi.find_objects(lay.inst_map), ndi.find_objects(out.inst_map)), start=1):
        da, db = a[0].start - b[0].start, a[1].start - b[1].start
        shift = (b[0].start - a[0].start, b[1].start - a[1].start)
        assert max(abs(da), abs(db)) <= max_shift
        # Same shape, translated; centroid moved by the same offset.
        assert np.array_equal(lay.inst_map[a] == i, out.inst_map[b] == i)
        assert np.allclose(out.centroids[i - 1] - lay.centroids[i - 1], shift)
        if shift != (0, 0):  # border nuclei never move
            assert a[0].start > 0 and a[1].start > 0 and a[0].stop < h and a[1].stop < w


def test_enlarge_moves_nuclei_and_is_deterministic():
    lay = random_layout((128, 128), density=30, seed=1)
    out = enlarge_layout(lay, fraction=1.0, seed=7)
    moved = np.any(out.centroids != lay.centroids, axis=1)
    assert moved.sum() >= 0.5 * lay.num_nuclei
    assert enlarge_layout(lay, fraction=1.0, seed=7).equals(out)
    assert enlarge_layout(lay, fraction=0.0, seed=7).equals(lay)
    with pytest.raises(ValueError, match="fraction"):
        enlarge_layout(lay, fraction=1.5)
    with pytest.raises(ValueError, match="max_shift"):
        enlarge_layout(lay, max_shift=0)


def test_shift_nucleus_rules():
    inst = np.zeros((10, 10), np.int32)
    inst[2:4, 2:4] = 1
    inst[2:4, 5:7] = 2
    assert not shift_nucleus(inst.copy(), 1, 0, 2)  # would land on nucleus 2
    t = inst.copy()
    assert shift_nucleus(t, 1, 0, 1)  # touching nucleus 2 is allowed (no shared pixel)
    assert (t == 1).sum() == 4 and t[2, 4] == 1 and t[2, 5] == 2
    assert not shift_nucleus(inst.copy(), 1, -3, 0)  # would leave the canvas


# ------------------------------------------------------------------------------ GradMix
@pytest.fixture(scope="module")
def samples():
    donors = [procedural_sample((128, 128), seed=s, density=70, class_shares=[1, 1, 1, 1]) for s in range(1, 4)]
    return [procedural_sample((128, 128), seed=0, density=70)] + donors


def test_gradmix_balance(samples):
    target, donors = samples[0], samples[1:]
    out = gradmix_balance(target, donors, target_share=0.3, seed=1, border=10)
    lab, rep = balance_layout_report(
        target.layout, [p.mask for p in collect_rare_patches(donors, margin=4)], 0.3, 1, border=10
    )
    assert out.layout.equals(lab)  # the label side is exactly DiffMix balancing
    assert out.provenance["edit"] == "gradmix" and out.provenance["rare_after"] == rep.rare_after
    assert rep.replacements
    new, old = out.layout.inst_map, target.layout.inst_map
    replaced = [r.nucleus_id for r in rep.replacements]
    others = (old > 0) & ~np.isin(old, replaced)
    assert np.array_equal(out.image[others], target.image[others])  # other nuclei untouched
    grey = out.image.astype(float).mean(axis=2)
    assert grey[new > 0].mean() < grey[new == 0].mean() - 30  # pasted nuclei are dark too
    # Pixels of a removed nucleus that no paste covers were repainted: brighter than before.
    cleared = np.isin(old, replaced) & (new == 0)
    assert grey[cleared].mean() > target.image[cleared].astype(float).mean(axis=1).mean() + 30
    again = gradmix_balance(target, donors, target_share=0.3, seed=1, border=10)
    assert np.array_equal(again.image, out.image)


def test_gradmix_blend_colour_shift_and_ring():
    image = np.full((40, 40, 3), 200, np.uint8)
    mask = np.zeros((16, 16), bool)
    mask[5:11, 5:11] = True
    src = np.full((16, 16, 3), 100, np.uint8)
    src[mask] = 40
    out = gradmix_blend(image, np.zeros((40, 40), bool), RarePatch(mask, src), (10, 10),
                        nuclear_colour=np.array([80.0, 80.0, 80.0]), ring_width=4, median_size=1)
    assert np.all(out[15:21, 15:21] == 60)  # 40 moved halfway to 80
    # The ring goes from near the source context (100) next to the nucleus to the target (200).
    assert out[18, 21, 0] < out[18, 23, 0] < out[18, 24, 0] < 200
    assert np.all(out[:5] == 200)  # far away: unchanged
    protected = np.zeros((40, 40), bool)
    protected[18, 21] = True
    out2 = gradmix_blend(image, protected, RarePatch(mask, src), (10, 10), np.array([80.0] * 3))
    assert np.all(out2[18, 21] == 200)
    with pytest.raises(ValueError, match="does not overlap"):
        gradmix_blend(image, protected, RarePatch(mask, src), (50, 50), np.array([80.0] * 3))
