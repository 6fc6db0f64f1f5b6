"""Metrics: hand-built cases against the definitions, and PQ against stardist on real CoNSeP."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import scipy.io as sio
from scipy import ndimage as ndi

from nucsynth import metrics as M
from nucsynth.layout import CONSEP_CLASSES, Layout, relabel_contiguous


# stardist matches IoU >= thresh on float32 scores; HoVer-Net's PQ needs IoU > 0.5. The next
# float32 above 0.5 separates them exactly (a real IoU I/U above 0.5 exceeds it by >= 1/(2U)).
STRICT_HALF = float(np.nextafter(np.float32(0.5), np.float32(1.0)))


# ---------------------------------------------------------------------------- helpers
def two_boxes(ids=(1, 2)) -> np.ndarray:
    """Two touching 4x5 boxes (20 px each) on a 10x12 canvas."""
    m = np.zeros((10, 12), np.int64)
    m[0:4, 0:5] = ids[0]
    m[0:4, 5:10] = ids[1]
    return m


def load_consep(folder: Path, step: int = 1) -> list[tuple[np.ndarray, np.ndarray]]:
    """(inst_map, classes) of every ``step``-th CoNSeP label file (CoNSeP .mat layout)."""
    out = []
    for path in sorted((folder / "Labels").glob("*.mat"))[::step]:
        d = sio.loadmat(path)
        out.append((d["inst_map"].astype(np.int32), d["inst_type"].ravel().astype(np.int64)))
    return out


def erode_instances(inst: np.ndarray) -> np.ndarray:
    """Remove each instance's border pixels (instances shrink, touching ones come apart)."""
    lay = Layout.from_inst_map(relabel_contiguous(inst)[0])
    out = lay.inst_map.copy()
    out[lay.edge_map() > 0] = 0
    return out


def merge_touching(inst: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Merge about half of the touching neighbour pairs (b takes a's id)."""
    out = inst.copy()
    a, b = inst[:, 1:], inst[:, :-1]
    sel = (a != b) & (a > 0) & (b > 0)
    pairs = np.unique(np.stack([a[sel], b[sel]], 1), axis=0)
    for x, y in pairs[rng.random(len(pairs)) < 0.5]:
        out[out == y] = x
    return out


def split_instances(inst: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Cut about a third of the instances in two at their mean column."""
    out = inst.copy()
    nxt = int(inst.max()) + 1
    for i in np.unique(inst)[1:]:
        if rng.random() < 0.35:
            yy, xx = np.nonzero(inst == i)
            right = xx > xx.mean()
            out[yy[right], xx[right]] = nxt
            nxt += 1
    return out


def shuffle_ids(inst: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Give the ids a random non-contiguous numbering (0 stays background)."""
    ids = np.unique(inst)[1:]
    lut = np.zeros(int(inst.max()) + 1, np.int64)
    lut[ids] = rng.choice(10 * len(ids) + 50, size=len(ids), replace=False) + 1
    return lut[inst]


# ---------------------------------------------------------------------------- hand-built
def test_identical_maps_with_other_ids_score_one():
    t = two_boxes((1, 2))
    p = two_boxes((70, 3))  # non-contiguous, order swapped
    m = M.instance_metrics(t, p)
    for key in ("dice", "aji", "aji_plus", "dq", "sq", "pq", "mdice"):
        assert m[key] == pytest.approx(1.0), key
    assert (m["tp"], m["fp"], m["fn"]) == (2, 0, 0)


def test_huge_ids_use_the_sorting_path():
    t = two_boxes((5, 100))
    p = two_boxes((9_000_000, 2))
    assert M.pq(t, p)["pq"] == pytest.approx(1.0)
    ov = M.overlap_table(t, p)
    assert ov.true_ids.tolist() == [5, 100] and ov.pred_ids.tolist() == [2, 9_000_000]
    assert ov.inter.tolist() == [[0, 20], [20, 0]]


def test_touching_nuclei_merged_by_prediction():
    t = two_boxes()
    p = (t > 0).astype(np.int64) * 4  # one instance of 40 px over both
    m = M.instance_metrics(t, p)
    assert m["dice"] == pytest.approx(1.0)
    # IoU of each truth with the merge is exactly 0.5: not > 0.5, so no match.
    assert (m["tp"], m["fp"], m["fn"]) == (0, 1, 2)
    assert m["dq"] == 0 and m["sq"] == 0 and m["pq"] == 0
    assert m["aji"] == pytest.approx((20 + 20) / (40 + 40))  # the merge is reused
    assert m["aji_plus"] == pytest.approx(20 / (40 + 20))  # unique: B's area added unpaired
    assert m["mdice"] == pytest.approx(2 * 20 / (20 + 40))


def test_pq_partial_overlap_and_false_positive():
    t = np.zeros((10, 12), np.int64)
    t[0:4, 0:5] = 1  # 20 px
    p = np.zeros_like(t)
    p[0:3, 0:5] = 8  # 15 px inside: IoU 0.75
    p[8:10, 10:12] = 3  # 4 px false positive
    r = M.pq(t, p)
    assert (r["tp"], r["fp"], r["fn"]) == (1, 1, 0)
    assert r["dq"] == pytest.approx(1 / 1.5)
    assert r["sq"] == pytest.approx(0.75)
    assert r["pq"] == pytest.approx(0.5)
    assert M.dice(t, p) == pytest.approx(2 * 15 / (20 + 19))
    # AJI: truth paired with id 8 (15/20); the unused false positive joins the union.
    assert M.aji(t, p) == pytest.approx(15 / (20 + 4))
    assert M.mdice(t, p) == pytest.approx(2 * 15 / 35)


def test_aji_reuses_predictions_aji_plus_does_not():
    t = np.zeros((10, 20), np.int64)
    t[0:4, 0:5] = 1  # 20 px
    t[0:4, 6:8] = 2  # 8 px
    p = np.zeros_like(t)
    p[0:4, 0:8] = 5  # 32 px: covers all of 1 and 2
    p[0:4, 8:9] = 6  # 4 px next to truth 2, touching nothing true
    # AJI: 1 -> 5 (IoU 20/32), 2 -> 5 (IoU 8/32); id 6 unused.
    assert M.aji(t, p) == pytest.approx((20 + 8) / (32 + 32 + 4))
    # AJI+: only 1 <-> 5; truth 2 (8 px) and prediction 6 (4 px) unpaired.
    assert M.aji_plus(t, p) == pytest.approx(20 / (32 + 8 + 4))


def test_empty_truth_and_empty_prediction():
    z = np.zeros((10, 12), np.int64)
    t = two_boxes()
    both = M.instance_metrics(z, z)
    assert M.EMPTY_SCORE == 0.0  # the HoVer-Net code's choice is the default
    assert all(both[k] == 0.0 for k in ("dice", "aji", "aji_plus", "dq", "sq", "pq", "mdice"))
    assert M.pq(z, z, empty=1.0)["pq"] == 1.0  # "nothing to find, nothing found" is available
    s = M.evaluate_set([Layout.from_inst_map(z), Layout.from_inst_map(t)], [Layout.from_inst_map(z), Layout.from_inst_map(t)])
    assert (s["n_empty"], s["n_empty_truth"], s["mean"]["pq"]) == (1, 1, 0.5)
    assert M.evaluate_set([Layout.from_inst_map(z)], [Layout.from_inst_map(z)], empty=1.0)["mean"]["pq"] == 1.0
    for true, pred, counts in ((z, t, (0, 2, 0)), (t, z, (0, 0, 2))):
        m = M.instance_metrics(true, pred)
        assert all(m[k] == 0.0 for k in ("dice", "aji", "aji_plus", "dq", "sq", "pq", "mdice"))
        assert (m["tp"], m["fp"], m["fn"]) == counts


def test_low_match_threshold_uses_unique_hungarian_pairs():
    t = two_boxes()
    p = (t > 0).astype(np.int64)
    r = M.pq(t, p, match_iou=0.3)
    assert (r["tp"], r["fp"], r["fn"]) == (1, 0, 1)
    assert r["sq"] == pytest.approx(0.5)


def test_bad_inputs_are_refused_clearly():
    with pytest.raises(ValueError, match="differ in shape"):
        M.pq(np.zeros((4, 4), int), np.zeros((4, 5), int))
    with pytest.raises(ValueError, match="integer"):
        M.dice(np.zeros((4, 4)), np.zeros((4, 4), int))
    with pytest.raises(ValueError, match="negative"):
        M.aji(-np.ones((4, 4), int), np.zeros((4, 4), int))
    with pytest.raises(ValueError, match="Layout"):
        M.detection_classification([np.zeros((4, 4), int)], [np.zeros((4, 4), int)])


def _point_layout(points, classes, shape=(64, 64)) -> Layout:
    return Layout.from_points(shape, np.asarray(points, float), np.asarray(classes), CONSEP_CLASSES)


def test_detection_and_class_f1_with_one_class_missing():
    t = _point_layout([(10, 10), (30, 30), (50, 50)], [1, 2, 3])
    p = _point_layout([(12, 10), (30, 45), (50, 52)], [1, 2, 2])
    r = M.detection_classification(t, p, radius=12)
    assert (r["tp"], r["fp"], r["fn"]) == (2, 1, 1)  # (30,45) is 15 px away: unpaired
    assert r["f_d"] == pytest.approx(4 / 6)
    assert r["acc"] == pytest.approx(0.5)
    f1 = r["f1"]
    assert f1["other"] == pytest.approx(1.0)
    assert f1["inflammatory"] == 0.0  # one wrong "2" in a pair + one unpaired on each side
    assert f1["epithelial"] == 0.0
    assert math.isnan(f1["spindle"])  # class absent from truth and prediction


def test_class_f1_formula_with_counts():
    # Class 2: TP_c = 2, FP_c = 1 (true 3 predicted 2), FN_c = 1 (true 2 predicted 1),
    # FP_d,c = 1 unpaired prediction of class 2, FN_d,c = 0.
    t = _point_layout([(5, 5), (5, 25), (5, 45), (25, 5), (25, 25)], [2, 2, 3, 2, 1])
    p = _point_layout([(5, 5), (5, 25), (5, 45), (25, 5), (25, 25), (50, 50)], [2, 2, 2, 1, 1, 2])
    r = M.detection_classification([t], [p])
    assert r["f1"]["inflammatory"] == pytest.approx(4 / (4 + 2 + 2 + 1 + 0))
    assert r["acc"] == pytest.approx(3 / 5)
    assert r["f_d"] == pytest.approx(10 / 11)


def test_centroid_matching_prefers_more_pairs_within_radius():
    # Nearest-first pairing would take (0, 1) and leave both others out of range.
    r, c = M.match_centroids([(0, 0), (0, 10)], [(0, 9), (0, 20)], radius=12)
    assert sorted(zip(r.tolist(), c.tolist())) == [(0, 0), (1, 1)]


def test_class_pq_and_evaluate_set_with_a_missing_class():
    inst = two_boxes()
    t = Layout.from_inst_map(inst, [2, 3])
    p = Layout.from_inst_map(inst, [2, 2])  # class swap on the second box
    cpq = M.class_pq(t, p)
    assert cpq["inflammatory"]["tp"] == 1 and cpq["inflammatory"]["fp"] == 1
    assert cpq["inflammatory"]["pq"] == pytest.approx(1 / 1.5)
    assert cpq["epithelial"]["pq"] == 0.0
    assert math.isnan(cpq["other"]["pq"]) and math.isnan(cpq["spindle"]["pq"])
    s = M.evaluate_set([t, t], [p, t])
    assert s["mean"]["pq"] == pytest.approx(1.0)  # instances are right in both images
    assert s["class_pq"]["inflammatory"]["pq"] == pytest.approx(2 / 2.5)
    assert s["class_pq"]["epithelial"]["pq"] == pytest.approx(1 / 1.5)
    assert s["mpq"] == pytest.approx((2 / 2.5 + 1 / 1.5) / 2)  # NaN classes skipped
    assert s["detection"]["acc"] == pytest.approx(3 / 4)


def test_touching_instances():
    m = two_boxes((3, 9))
    m[8, 11] = 4
    assert M.touching_instances(m).tolist() == [3, 9]


# ---------------------------------------------------------------------------- real data
@pytest.mark.realdata
def test_pq_matches_stardist_on_perturbed_consep(consep_dir):
    matching = pytest.importorskip("stardist.matching", reason="stardist (independent PQ reference) not installed")
    rng = np.random.default_rng(0)
    data = load_consep(consep_dir, step=18)  # 24 patches spread over the tiles
    trues, preds, ref_sums = [], [], np.zeros(4)
    for inst, classes in data:
        perturbed = {
            "erode": erode_instances(inst),
            "dilate": ndi.grey_dilation(inst, size=3),
            "merge": merge_touching(inst, rng),
            "split": split_instances(inst, rng),
            "shift": np.roll(inst, (2, -3), axis=(0, 1)),
        }
        for name, pred in perturbed.items():
            pred = shuffle_ids(pred, rng)
            ours = M.pq(inst, pred)
            ref = matching.matching(inst, pred, thresh=STRICT_HALF)
            if inst.max() == 0 and pred.max() == 0:
                # stardist's safe division gives 0 here, as does our default (HoVer-Net's convention).
                assert ours["pq"] == 0.0 and ref.panoptic_quality == 0.0
                assert M.pq(inst, pred, empty=1.0)["pq"] == 1.0
                continue
            assert ours["tp"] == ref.tp and ours["fp"] == ref.fp and ours["fn"] == ref.fn, name
            assert abs(ours["pq"] - ref.panoptic_quality) < 1e-6, name
            assert abs(ours["sq"] - ref.mean_matched_score) < 1e-6, name
            trues.append(inst)
            preds.append(pred)
            ref_sums += (ref.tp, ref.fp, ref.fn, ref.mean_matched_score * ref.tp)
    # the set-level PQ as stardist's matching_dataset pools it: summed counts and IoUs
    tp, fp, fn, iou_sum = ref_sums
    lay_t = [Layout.from_inst_map(*relabel_contiguous(t)[:1]) for t in trues]
    lay_p = [Layout.from_inst_map(relabel_contiguous(p)[0]) for p in preds]
    ours = M.evaluate_set(lay_t, lay_p)
    assert abs(ours["aggregate"]["pq"] - iou_sum / (tp + fp / 2 + fn / 2)) < 1e-6


@pytest.mark.realdata
def test_class_pq_matches_stardist_per_class_with_class_swaps(consep_dir):
    matching = pytest.importorskip("stardist.matching", reason="stardist (independent PQ reference) not installed")
    rng = np.random.default_rng(1)
    for inst, classes in load_consep(consep_dir, step=27):
        if inst.max() == 0:
            continue
        swapped = classes.copy()
        flip = rng.random(classes.size) < 0.2
        swapped[flip] = rng.integers(1, 5, flip.sum())
        pred_inst = split_instances(erode_instances(inst), rng)
        # each predicted instance takes the (swapped) class of the largest true id under it
        new, old = relabel_contiguous(pred_inst)
        src = ndi.labeled_comprehension(inst, new, np.arange(1, old.size + 1), np.max, int, 0)
        pred_cls = np.where(src > 0, swapped[np.maximum(src, 1) - 1], 1)
        t = Layout.from_inst_map(inst, classes)
        p = Layout.from_inst_map(new, pred_cls)
        ours = M.class_pq(t, p)
        for c, name in enumerate(CONSEP_CLASSES.names, start=1):
            tc = np.where(t.type_map() == c, t.inst_map, 0)
            pc = np.where(p.type_map() == c, p.inst_map, 0)
            if tc.max() == 0 and pc.max() == 0:
                assert math.isnan(ours[name]["pq"])
                continue
            ref = matching.matching(tc, pc, thresh=STRICT_HALF)
            assert abs(ours[name]["pq"] - ref.panoptic_quality) < 1e-6, name
