"""Time each metric on 256 px (true, predicted) patch pairs with about 40 nuclei.

Uses the real CoNSeP labels when ../shared/data is present (patches with 30-50 nuclei),
else generated disc layouts; the prediction is the truth with eroded borders, a few
instances split and the ids shuffled (non-contiguous). Prints the median time per call.

    python benchmarks/bench_metrics.py [--pairs 20] [--repeats 20] [--watersheds]

``--watersheds`` also runs both watersheds on the truth-derived maps of every real CoNSeP
patch: HV maps -> ``hv_watershed`` (reference defaults and the sharp-map setting) and
centroids + distance map + mask -> ``point_watershed`` (vs. connected components), and
prints PQ / mDice and the time per patch.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import scipy.io as sio

from scipy import ndimage as ndi

from nucsynth import metrics as M
from nucsynth import postprocess as P
from nucsynth.layout import CONSEP_CLASSES, Layout, relabel_contiguous

DATA = Path(os.environ.get("NUCSYNTH_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def real_truths(n: int) -> list[Layout]:
    out = []
    for path in sorted((DATA / "consep256" / "Train" / "Labels").glob("*.mat")):
        d = sio.loadmat(path)
        inst = d["inst_map"].astype(np.int32)
        if 30 <= inst.max() <= 50:
            out.append(Layout.from_inst_map(inst, d["inst_type"].ravel()))
        if len(out) == n:
            break
    return out


def generated_truths(n: int, rng: np.random.Generator) -> list[Layout]:
    out = []
    yy, xx = np.indices((256, 256))
    for _ in range(n):
        inst = np.zeros((256, 256), np.int32)
        for i, (cy, cx) in enumerate(rng.uniform(8, 248, (40, 2)), start=1):
            inst[((yy - cy) ** 2 + (xx - cx) ** 2 <= rng.uniform(4, 9) ** 2) & (inst == 0)] = i
        out.append(Layout.from_inst_map(inst, rng.integers(1, 5, 40)))
    return out


def perturb(t: Layout, rng: np.random.Generator) -> Layout:
    inst = t.inst_map.copy()
    inst[t.edge_map() > 0] = 0
    nxt = t.num_nuclei + 1
    for i in rng.choice(np.arange(1, t.num_nuclei + 1), size=max(1, t.num_nuclei // 10), replace=False):
        yy, xx = np.nonzero(inst == i)
        right = xx > xx.mean() if xx.size else xx > 0
        inst[yy[right], xx[right]] = nxt
        nxt += 1
    new, old = relabel_contiguous(inst)
    classes = np.where(old <= t.num_nuclei, t.classes[np.minimum(old, t.num_nuclei) - 1], 1)
    swap = rng.random(classes.size) < 0.1
    classes[swap] = rng.integers(1, 5, swap.sum())
    return Layout.from_inst_map(new, classes, CONSEP_CLASSES)


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


SHARP = P.SHARP_MAP_PARAMS


def watershed_figures() -> None:
    truths = [
        Layout.from_inst_map(d["inst_map"].astype(np.int32), d["inst_type"].ravel())
        for d in (sio.loadmat(p) for p in sorted((DATA / "consep256" / "Train" / "Labels").glob("*.mat")))
    ]
    print(f"\nwatersheds on the truth-derived maps of {len(truths)} real CoNSeP patches")
    for name, params in (("hv_watershed, reference defaults", {}), ("hv_watershed, sharp-map setting", SHARP)):
        t0 = time.perf_counter()
        preds = [P.hv_watershed((t.inst_map > 0).astype(np.float32), t.hv_maps(), t.onehot(), **params) for t in truths]
        ms = 1e3 * (time.perf_counter() - t0) / len(truths)
        s = M.evaluate_set(truths, preds)
        print(f"  {name:34s} PQ mean/image {s['mean']['pq']:.4f}  PQ pooled {s['aggregate']['pq']:.4f}  "
              f"DQ {s['aggregate']['dq']:.4f}  SQ {s['aggregate']['sq']:.4f}  class acc {s['detection']['acc']:.4f}  "
              f"{ms:.1f} ms/patch (incl. HV maps)")
    d_pt, d_cc, t_pt, t_cc = [], [], [], []
    t0 = time.perf_counter()
    for t in truths:
        out = P.point_watershed(t.distance_map(), t.inst_map > 0, Layout.from_points(t.shape, t.centroids, t.classes))
        comp = ndi.label(t.inst_map > 0)[0]
        a, b = M.mdice(t.inst_map, out.inst_map, per_instance=True), M.mdice(t.inst_map, comp, per_instance=True)
        touch = M.touching_instances(t.inst_map) - 1
        d_pt += list(a)
        d_cc += list(b)
        t_pt += list(a[touch])
        t_cc += list(b[touch])
    ms = 1e3 * (time.perf_counter() - t0) / len(truths)
    print(f"  point_watershed mDice {np.mean(d_pt):.4f} (connected components {np.mean(d_cc):.4f}); "
          f"on the {len(t_pt)} touching nuclei {np.mean(t_pt):.4f} ({np.mean(t_cc):.4f}); {ms:.1f} ms/patch")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--watersheds", action="store_true", help="also measure both watersheds on all real patches")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    truths = real_truths(args.pairs) if (DATA / "consep256").exists() else []
    source = "real CoNSeP labels" if truths else "generated discs"
    if not truths:
        truths = generated_truths(args.pairs, rng)
    preds = [perturb(t, rng) for t in truths]
    shuffled = [np.where(p.inst_map > 0, p.inst_map * 7 + 3, 0) for p in preds]  # non-contiguous ids
    n = np.mean([t.num_nuclei for t in truths])
    print(f"{len(truths)} pairs of 256x256 {source}, {n:.1f} true nuclei per patch; median ms per pair")
    cases: dict[str, Callable[[int], object]] = {
        "overlap_table": lambda i: M.overlap_table(truths[i].inst_map, shuffled[i]),
        "dice": lambda i: M.dice(truths[i].inst_map, shuffled[i]),
        "aji": lambda i: M.aji(truths[i].inst_map, shuffled[i]),
        "aji_plus": lambda i: M.aji_plus(truths[i].inst_map, shuffled[i]),
        "pq": lambda i: M.pq(truths[i].inst_map, shuffled[i]),
        "mdice": lambda i: M.mdice(truths[i].inst_map, shuffled[i]),
        "instance_metrics (all above)": lambda i: M.instance_metrics(truths[i].inst_map, shuffled[i]),
        "class_pq": lambda i: M.class_pq(truths[i], preds[i]),
        "detection_classification": lambda i: M.detection_classification(truths[i], preds[i]),
        "evaluate_set (everything, 1 pair)": lambda i: M.evaluate_set([truths[i]], [preds[i]]),
    }
    for name, case in cases.items():
        ms = np.median([median_ms(lambda: case(i), args.repeats) for i in range(len(truths))])
        print(f"  {name:36s} {ms:7.2f} ms")
    if args.watersheds:
        if not (DATA / "consep256").exists():
            raise SystemExit(f"--watersheds needs the real CoNSeP labels at {DATA / 'consep256'}")
        watershed_figures()


if __name__ == "__main__":
    main()
