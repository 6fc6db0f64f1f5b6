"""Nuclei segmentation, detection and classification metrics (HoVer-Net conventions).

Every instance metric is computed from ONE pairwise table: ids of both maps are relabelled
to 1..n internally (so ids need not be contiguous), then a single ``np.bincount`` over
``true_id * (n_pred + 1) + pred_id`` gives all intersections, and the row / column sums of
the same table give the instance areas. Exact definitions, including the conventions for
empty truth or prediction, are in ``docs/metrics.md``; in short:

- per-image scores (Dice, AJI, AJI+, DQ, SQ, PQ, mDice) return ``empty`` (default
  :data:`EMPTY_SCORE` = 0.0, what the HoVer-Net code gives; 1.0 reads "nothing to find and
  nothing found" as perfect, NaN drops such images from means) when truth and prediction
  are both empty, and 0.0 when exactly one of them is empty; ``evaluate_set`` reports how
  many images were empty;
- set-level ratios (aggregated PQ, per-class PQ, F_d, accuracy, F_c) are NaN when their
  denominator is zero (e.g. a class absent from both truth and prediction): "no evidence",
  never a misleading 0; class means skip NaN.

References: Graham et al. 2019 (HoVer-Net: AJI/PQ/F_d/F_c as used in the field),
Kirillov et al. 2019 (panoptic quality), Kumar et al. 2017 (AJI).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

from nucsynth.layout import Layout

__all__ = [
    "EMPTY_SCORE",
    "Overlap",
    "overlap_table",
    "dice",
    "aji",
    "aji_plus",
    "pq",
    "pq_from_counts",
    "mdice",
    "instance_metrics",
    "class_pq",
    "match_centroids",
    "detection_classification",
    "touching_instances",
    "evaluate_set",
]

InstanceInput = np.ndarray | Layout

# Score of an image whose truth and prediction are both empty. 0.0 follows the HoVer-Net
# code (its 1e-6 guards give 0), so per-image means are comparable with published figures.
EMPTY_SCORE = 0.0


# ---------------------------------------------------------------------------- the table
def _as_inst(x: Any, what: str) -> np.ndarray:
    """An integer (H, W) instance map from an array or a Layout."""
    if isinstance(x, Layout):
        return x.inst_map
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{what} must be a 2-D instance map (H, W), got shape {arr.shape}")
    if arr.dtype.kind == "b":
        return arr.astype(np.int64)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{what} must hold integer instance ids, got dtype {arr.dtype}")
    if arr.size and arr.min() < 0:
        raise ValueError(f"{what} has negative ids (min {arr.min()}); ids must be >= 0 (0 = background)")
    return arr


def _relabel(inst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ids present -> 1..n in increasing order of the old id; returns (map int64, old ids)."""
    flat = inst.ravel().astype(np.int64, copy=False)
    top = int(flat.max()) if flat.size else 0
    if top <= 4 * flat.size + 1024:  # a dense lookup table is cheaper than sorting
        present = np.bincount(flat, minlength=top + 1) > 0
        present[0] = False
        lut = np.cumsum(present)
        lut[~present] = 0
        return lut[flat].reshape(inst.shape), np.flatnonzero(present)
    uniq, inv = np.unique(flat, return_inverse=True)
    if uniq[0] == 0:
        return inv.reshape(inst.shape).astype(np.int64), uniq[1:]
    return (inv + 1).reshape(inst.shape).astype(np.int64), uniq


@dataclass(frozen=True)
class Overlap:
    """Pairwise overlap of the instances of a true and a predicted map.

    Rows are true instances, columns predicted ones, both in increasing order of their
    original id (``true_ids`` / ``pred_ids``). Every instance has a positive area.
    """

    inter: np.ndarray  # (n_true, n_pred) int64 pixel counts
    true_area: np.ndarray  # (n_true,)
    pred_area: np.ndarray  # (n_pred,)
    true_ids: np.ndarray  # (n_true,) original ids
    pred_ids: np.ndarray  # (n_pred,)

    @property
    def n_true(self) -> int:
        return int(self.true_area.shape[0])

    @property
    def n_pred(self) -> int:
        return int(self.pred_area.shape[0])

    @property
    def union(self) -> np.ndarray:
        """(n_true, n_pred) pixel count of each pair's union."""
        return self.true_area[:, None] + self.pred_area[None, :] - self.inter

    @property
    def iou(self) -> np.ndarray:
        """(n_true, n_pred) intersection over union (unions are never 0: areas are > 0)."""
        return self.inter / self.union

    def subset(self, rows: np.ndarray, cols: np.ndarray) -> "Overlap":
        """The table restricted to some true (boolean ``rows``) and predicted instances."""
        return Overlap(
            self.inter[np.ix_(rows, cols)], self.true_area[rows], self.pred_area[cols],
            self.true_ids[rows], self.pred_ids[cols],
        )


def overlap_table(true: InstanceInput, pred: InstanceInput) -> Overlap:
    """All pairwise intersections and areas with one ``bincount`` (ids relabelled first)."""
    t_map, p_map = _as_inst(true, "true"), _as_inst(pred, "pred")
    if t_map.shape != p_map.shape:
        raise ValueError(f"true {t_map.shape} and pred {p_map.shape} instance maps differ in shape")
    t, t_ids = _relabel(t_map)
    p, p_ids = _relabel(p_map)
    nt, npred = t_ids.size, p_ids.size
    table = np.bincount((t * (npred + 1) + p).ravel(), minlength=(nt + 1) * (npred + 1))
    table = table.reshape(nt + 1, npred + 1)
    return Overlap(table[1:, 1:], table[1:].sum(1), table[:, 1:].sum(0), t_ids, p_ids)


def _ratio(num: float, den: float, empty: float) -> float:
    return float(num) / float(den) if den > 0 else float(empty)


# ---------------------------------------------------------------------------- per image
def _dice(ov: Overlap, empty: float) -> float:
    total = ov.true_area.sum() + ov.pred_area.sum()
    return _ratio(2 * ov.inter.sum(), total, empty)


def _aji(ov: Overlap, empty: float) -> float:
    if ov.n_true == 0 or ov.n_pred == 0:
        return _ratio(0, ov.true_area.sum() + ov.pred_area.sum(), empty)
    iou = ov.iou
    rows = np.arange(ov.n_true)
    best = iou.argmax(1)  # ties -> the lowest predicted id, as the reference code
    paired = iou[rows, best] > 0
    r, c = rows[paired], best[paired]
    used = np.zeros(ov.n_pred, bool)
    used[c] = True
    inter = ov.inter[r, c].sum()
    union = ov.union[r, c].sum() + ov.true_area[~paired].sum() + ov.pred_area[~used].sum()
    return _ratio(inter, union, empty)


def _aji_plus(ov: Overlap, empty: float) -> float:
    if ov.n_true == 0 or ov.n_pred == 0:
        return _ratio(0, ov.true_area.sum() + ov.pred_area.sum(), empty)
    iou = ov.iou
    r, c = linear_sum_assignment(-iou)  # one prediction per truth, maximal total IoU
    keep = iou[r, c] > 0
    r, c = r[keep], c[keep]
    t_free = np.ones(ov.n_true, bool)
    t_free[r] = False
    p_free = np.ones(ov.n_pred, bool)
    p_free[c] = False
    inter = ov.inter[r, c].sum()
    union = ov.union[r, c].sum() + ov.true_area[t_free].sum() + ov.pred_area[p_free].sum()
    return _ratio(inter, union, empty)


def _pq_match(ov: Overlap, match_iou: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Matched (rows, cols, ious): IoU > match_iou; unique by construction when >= 0.5."""
    if ov.n_true == 0 or ov.n_pred == 0:
        e = np.zeros(0, np.int64)
        return e, e, np.zeros(0)
    iou = ov.iou
    if match_iou >= 0.5:
        r, c = np.nonzero(iou > match_iou)
    else:
        r, c = linear_sum_assignment(-iou)
        keep = iou[r, c] > match_iou
        r, c = r[keep], c[keep]
    return r, c, iou[r, c]


def _pq_from_counts(tp: int, fp: int, fn: int, iou_sum: float, empty: float) -> dict[str, float]:
    if tp + fp + fn == 0:
        return {"dq": float(empty), "sq": float(empty), "pq": float(empty),
                "tp": 0, "fp": 0, "fn": 0, "iou_sum": 0.0}
    dq = tp / (tp + 0.5 * fp + 0.5 * fn)
    sq = iou_sum / tp if tp else 0.0  # mean IoU of no match: 0 (then PQ = 0 anyway)
    return {"dq": dq, "sq": sq, "pq": dq * sq, "tp": int(tp), "fp": int(fp), "fn": int(fn),
            "iou_sum": float(iou_sum)}


def pq_from_counts(tp: int, fp: int, fn: int, iou_sum: float, empty: float = EMPTY_SCORE) -> dict[str, float]:
    """DQ, SQ and PQ from match counts and the summed IoU of the matches (e.g. pooled over
    several images); ``empty`` when there is no instance on either side."""
    return _pq_from_counts(tp, fp, fn, iou_sum, empty)


def _pq(ov: Overlap, match_iou: float, empty: float) -> dict[str, float]:
    r, _, ious = _pq_match(ov, match_iou)
    tp = r.size
    return _pq_from_counts(tp, ov.n_pred - tp, ov.n_true - tp, float(ious.sum()), empty)


def _mdice_per_instance(ov: Overlap) -> np.ndarray:
    if ov.n_pred == 0:
        return np.zeros(ov.n_true)
    d = 2.0 * ov.inter / (ov.true_area[:, None] + ov.pred_area[None, :])
    return d.max(1)


def _mdice(ov: Overlap, empty: float) -> float:
    if ov.n_true == 0:
        return float(empty) if ov.n_pred == 0 else 0.0
    return float(_mdice_per_instance(ov).mean())


def dice(true: InstanceInput, pred: InstanceInput, empty: float = EMPTY_SCORE) -> float:
    """Binary (foreground) Dice 2|T & P| / (|T| + |P|); ``empty`` if both are empty."""
    return _dice(overlap_table(true, pred), empty)


def aji(true: InstanceInput, pred: InstanceInput, empty: float = EMPTY_SCORE) -> float:
    """Aggregated Jaccard Index (Kumar et al. 2017).

    Each true instance is paired with the prediction of maximum IoU (a prediction may be
    reused); sum of paired intersections over sum of paired unions plus the areas of
    unpaired true instances and of predictions never chosen.
    """
    return _aji(overlap_table(true, pred), empty)


def aji_plus(true: InstanceInput, pred: InstanceInput, empty: float = EMPTY_SCORE) -> float:
    """AJI+ (Graham et al. 2019): as AJI but pairs are unique (Hungarian on IoU)."""
    return _aji_plus(overlap_table(true, pred), empty)


def pq(true: InstanceInput, pred: InstanceInput, match_iou: float = 0.5, empty: float = EMPTY_SCORE) -> dict[str, float]:
    """Panoptic quality of one image: dict(dq, sq, pq, tp, fp, fn, iou_sum).

    Pairs with IoU > ``match_iou`` are matches (unique when match_iou >= 0.5, Hungarian
    otherwise); DQ = TP / (TP + FP/2 + FN/2), SQ = mean IoU of matches, PQ = DQ * SQ.
    """
    return _pq(overlap_table(true, pred), match_iou, empty)


def mdice(true: InstanceInput, pred: InstanceInput, empty: float = EMPTY_SCORE, per_instance: bool = False) -> Any:
    """Instance-separation mDice: the mean over true instances of the Dice of each with its
    best-matching (maximum Dice) predicted instance; 0 for a truth overlapped by nothing.

    Empty truth gives ``empty`` when the prediction is empty too, else 0. With
    ``per_instance`` the (n_true,) array of Dice values is returned instead (order: true ids).
    """
    ov = overlap_table(true, pred)
    if per_instance:
        return _mdice_per_instance(ov)
    return _mdice(ov, empty)


def instance_metrics(true: InstanceInput, pred: InstanceInput, match_iou: float = 0.5, empty: float = EMPTY_SCORE) -> dict[str, float]:
    """All per-image instance metrics from one overlap table.

    Keys: dice, aji, aji_plus, dq, sq, pq, mdice, tp, fp, fn, iou_sum, n_true, n_pred.
    """
    ov = overlap_table(true, pred)
    out: dict[str, float] = {"dice": _dice(ov, empty), "aji": _aji(ov, empty), "aji_plus": _aji_plus(ov, empty)}
    out.update(_pq(ov, match_iou, empty))
    out["mdice"] = _mdice(ov, empty)
    out["n_true"] = ov.n_true
    out["n_pred"] = ov.n_pred
    return out


# ---------------------------------------------------------------------------- classes
def _layout(x: Any, what: str) -> Layout:
    if not isinstance(x, Layout):
        raise ValueError(f"{what} must be a nucsynth Layout (class metrics need classes and centroids), got {type(x).__name__}")
    return x


def _class_counts_pq(ov: Overlap, t_cls: np.ndarray, p_cls: np.ndarray, k: int, match_iou: float) -> np.ndarray:
    """(k, 4) array of tp, fp, fn, iou_sum for classes 1..k (instances of one class only)."""
    out = np.zeros((k, 4))
    for c in range(1, k + 1):
        sub = ov.subset(t_cls == c, p_cls == c)
        r, _, ious = _pq_match(sub, match_iou)
        out[c - 1] = (r.size, sub.n_pred - r.size, sub.n_true - r.size, ious.sum())
    return out


def _instance_classes(layout: Layout, ids: np.ndarray) -> np.ndarray:
    return layout.classes[ids - 1] if ids.size else np.zeros(0, np.int64)


def class_pq(true: Layout, pred: Layout, match_iou: float = 0.5) -> dict[str, dict[str, float]]:
    """PQ per class for one image: {class name: dict(dq, sq, pq, tp, fp, fn, iou_sum)}.

    Only instances of class c take part in the PQ of class c (both sides); a class absent
    from both truth and prediction gets NaN scores. Unknown (0) instances take no part.
    The prediction's classes are matched to the truth's class set by name
    (:meth:`Layout.to_class_set`); a class set naming other classes is refused.
    """
    t, p = _layout(true, "true"), _layout(pred, "pred")
    p = p.to_class_set(t.class_set)  # classes are matched by name, never by position
    ov = overlap_table(t.inst_map, p.inst_map)
    counts = _class_counts_pq(ov, _instance_classes(t, ov.true_ids), _instance_classes(p, ov.pred_ids),
                              t.class_set.num_classes, match_iou)
    return {name: _pq_from_counts(int(tp), int(fp), int(fn), s, np.nan)
            for name, (tp, fp, fn, s) in zip(t.class_set.names, counts)}


def match_centroids(true_yx: np.ndarray, pred_yx: np.ndarray, radius: float = 12.0) -> tuple[np.ndarray, np.ndarray]:
    """Unique centroid pairs within ``radius`` px: the largest number of pairs, then the
    smallest total distance (Hungarian on distances, pairs beyond the radius priced out).
    Returns index arrays (true, pred)."""
    a = np.asarray(true_yx, float).reshape(-1, 2)
    b = np.asarray(pred_yx, float).reshape(-1, 2)
    if a.shape[0] == 0 or b.shape[0] == 0:
        e = np.zeros(0, np.int64)
        return e, e
    d = np.hypot(a[:, None, 0] - b[None, :, 0], a[:, None, 1] - b[None, :, 1])
    inside = d <= radius
    # A pair beyond the radius costs more than any full set of pairs within it.
    big = radius * (min(a.shape[0], b.shape[0]) + 1) + 1.0
    r, c = linear_sum_assignment(np.where(inside, d, big))
    keep = inside[r, c]
    return r[keep], c[keep]


def _in_class_set(ts: list[Layout], ps: list[Layout]) -> tuple[list[Layout], list[Layout]]:
    """Both lists with classes in the first truth's class set (matched by name, never by position)."""
    if not ts:
        return ts, ps
    cs = ts[0].class_set
    return [t.to_class_set(cs) for t in ts], [p.to_class_set(cs) for p in ps]


def _as_layout_list(x: Any, what: str) -> list[Layout]:
    if isinstance(x, Layout):
        return [x]
    items = list(x)
    for i, item in enumerate(items):
        _layout(item, f"{what}[{i}]")
    return items


def detection_classification(true_layouts: Any, pred_layouts: Any, radius: float = 12.0) -> dict[str, Any]:
    """Detection F_d, classification accuracy and per-class F_c over a whole set.

    Centroids are paired per image (:func:`match_centroids`), and the pairs of all images
    pooled. F_d = 2TP / (2TP + FP + FN); accuracy = share of paired nuclei whose classes
    agree; per class c (HoVer-Net), over the pairs where truth or prediction is c:
    F_c = 2(TP_c + TN_c) / (2(TP_c + TN_c) + 2FP_c + 2FN_c + FP_d,c + FN_d,c), where TN_c is
    0 by that restriction and FP_d,c / FN_d,c count unpaired predictions / truths of class c.
    Ratios with a zero denominator are NaN. Accepts one Layout or sequences of Layouts.
    Classes are compared through the first truth's class set, matched by name
    (:meth:`Layout.to_class_set`); a class set naming other classes is refused.
    """
    ts, ps = _as_layout_list(true_layouts, "true_layouts"), _as_layout_list(pred_layouts, "pred_layouts")
    ts, ps = _in_class_set(ts, ps)
    if len(ts) != len(ps):
        raise ValueError(f"{len(ts)} true layouts but {len(ps)} predicted ones: they must pair up")
    if not ts:
        raise ValueError("no layouts given: detection metrics need at least one image")
    k = ts[0].class_set.num_classes
    pt, pp, ut, up = [], [], [], []  # paired true/pred classes, unpaired true/pred classes
    for t, p in zip(ts, ps):
        if t.shape != p.shape:
            raise ValueError(f"true layout {t.shape} and predicted layout {p.shape} differ in shape")
        r, c = match_centroids(t.centroids, p.centroids, radius)
        pt.append(t.classes[r])
        pp.append(p.classes[c])
        ut.append(np.delete(t.classes, r))
        up.append(np.delete(p.classes, c))
    pt_a, pp_a, ut_a, up_a = (np.concatenate(v) for v in (pt, pp, ut, up))
    tp, fp, fn = pt_a.size, up_a.size, ut_a.size
    nan = float("nan")
    out: dict[str, Any] = {
        "f_d": _ratio(2 * tp, 2 * tp + fp + fn, nan),
        "precision": _ratio(tp, tp + fp, nan),
        "recall": _ratio(tp, tp + fn, nan),
        "acc": _ratio(int((pt_a == pp_a).sum()), tp, nan),
        "tp": tp, "fp": fp, "fn": fn,
    }
    f1: dict[str, float] = {}
    for cls, name in enumerate(ts[0].class_set.names[:k], start=1):
        sel = (pt_a == cls) | (pp_a == cls)
        a, b = pt_a[sel], pp_a[sel]
        tp_c = int(((a == cls) & (b == cls)).sum())
        tn_c = int(((a != cls) & (b != cls)).sum())  # 0 by the restriction; kept as in the formula
        fp_c = int(((a != cls) & (b == cls)).sum())
        fn_c = int(((a == cls) & (b != cls)).sum())
        fp_dc, fn_dc = int((up_a == cls).sum()), int((ut_a == cls).sum())
        num = 2 * (tp_c + tn_c)
        f1[name] = _ratio(num, num + 2 * fp_c + 2 * fn_c + fp_dc + fn_dc, nan)
    out["f1"] = f1
    return out


def touching_instances(inst_map: InstanceInput) -> np.ndarray:
    """Original ids (sorted) of instances that share a 4-neighbour border with another one."""
    m = _as_inst(inst_map, "inst_map")
    ids: list[np.ndarray] = []
    for a, b in ((m[1:, :], m[:-1, :]), (m[:, 1:], m[:, :-1])):
        sel = (a != b) & (a > 0) & (b > 0)
        ids += [a[sel], b[sel]]
    return np.unique(np.concatenate(ids)) if ids else np.zeros(0, np.int64)


# ---------------------------------------------------------------------------- a whole set
PER_IMAGE_KEYS = ("dice", "aji", "aji_plus", "dq", "sq", "pq", "mdice")


def evaluate_set(true_layouts: Sequence[Layout], pred_layouts: Sequence[Layout], radius: float = 12.0,
                 match_iou: float = 0.5, empty: float = EMPTY_SCORE) -> dict[str, Any]:
    """Every metric over a set of (true, predicted) Layouts.

    Returns ``{"n_images", "n_empty" (images with neither true nor predicted nuclei: they
    score ``empty`` in the per-image means), "n_empty_truth" (images without true nuclei),
    "empty" (that score), "mean": {dice, aji, aji_plus, dq, sq, pq, mdice} (per-image
    means), "aggregate": {dq, sq, pq} (counts summed over the set), "class_pq": {name:
    {dq, sq, pq}} (summed over the set per class, NaN for absent classes), "mpq" (mean of
    the defined class PQs), "detection": detection_classification(...), "per_image": [...]}``.
    """
    ts, ps = _as_layout_list(true_layouts, "true_layouts"), _as_layout_list(pred_layouts, "pred_layouts")
    if len(ts) != len(ps) or not ts:
        raise ValueError(f"need equally many true and predicted layouts (>= 1), got {len(ts)} and {len(ps)}")
    ts, ps = _in_class_set(ts, ps)
    k = ts[0].class_set.num_classes
    per_image: list[dict[str, float]] = []
    totals = np.zeros(4)
    class_totals = np.zeros((k, 4))
    for t, p in zip(ts, ps):
        if p.class_set.num_classes != k or t.class_set.num_classes != k:
            raise ValueError(f"all layouts must share the class set of {k} classes")
        ov = overlap_table(t.inst_map, p.inst_map)
        m: dict[str, float] = {"dice": _dice(ov, empty), "aji": _aji(ov, empty), "aji_plus": _aji_plus(ov, empty)}
        m.update(_pq(ov, match_iou, empty))
        m["mdice"] = _mdice(ov, empty)
        m["n_true"], m["n_pred"] = ov.n_true, ov.n_pred
        per_image.append(m)
        totals += (m["tp"], m["fp"], m["fn"], m["iou_sum"])
        class_totals += _class_counts_pq(ov, _instance_classes(t, ov.true_ids), _instance_classes(p, ov.pred_ids), k, match_iou)
    nan = float("nan")
    agg = _pq_from_counts(*(int(v) for v in totals[:3]), totals[3], nan)
    cls = {name: _pq_from_counts(int(tp), int(fp), int(fn), s, nan)
           for name, (tp, fp, fn, s) in zip(ts[0].class_set.names, class_totals)}
    defined = [v["pq"] for v in cls.values() if not np.isnan(v["pq"])]
    return {
        "n_images": len(ts),
        "n_empty": sum(1 for m in per_image if m["n_true"] == 0 and m["n_pred"] == 0),
        "n_empty_truth": sum(1 for m in per_image if m["n_true"] == 0),
        "empty": float(empty),
        "mean": {key: float(np.mean([m[key] for m in per_image])) for key in PER_IMAGE_KEYS},
        "aggregate": {key: agg[key] for key in ("dq", "sq", "pq")},
        "class_pq": {name: {key: v[key] for key in ("dq", "sq", "pq")} for name, v in cls.items()},
        "mpq": float(np.mean(defined)) if defined else nan,
        "detection": detection_classification(ts, ps, radius),
        "per_image": per_image,
    }
