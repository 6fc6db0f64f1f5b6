"""HV watershed: ``nucsynth.postprocess.hv_watershed`` against HoVer-Net-style OpenCV post-processing.

Usage::

    python benchmarks/bench_watershed.py [--limit N] [--repeats 3] [--sharp]

On the exact maps of every real CoNSeP training patch (``prob`` = the true nuclei mask,
``hv`` = ``Layout.hv_maps()`` of the true instances), both post-processings run on the same
maps, interleaved patch by patch (the order alternates between repeats), single-threaded.
Prints the time per patch of each (median over the passes), the ratios ours / reference
of wall time and of CPU time (the thread's own, less disturbed by other processes on a
shared machine), the PQ of both against the truth, and how many patches give identical
instance maps.

The reference is written here from the description of HoVer-Net's post-processing in the
HoVer-Net paper (Graham et al. 2019): OpenCV min-max normalization, 21-tap Sobel filters,
3x3 Gaussian blur and elliptic opening, scipy labelling and hole filling, removal of
objects under 10 px, scikit-image's marker watershed. Both return instance maps
(ours returns a Layout, whose construction is included in its time).

Needs ``opencv-python-headless`` and the real data (``../shared/data``, or the folder in
``NUCSYNTH_SHARED_DATA``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import scipy.io as sio
from scipy import ndimage as ndi

DATA = Path(os.environ.get("NUCSYNTH_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def _drop_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Objects of fewer than ``min_size`` pixels set to 0 (what HoVer-Net asks of
    ``remove_small_objects``; scikit-image 0.26 changed that function's threshold)."""
    sizes = np.bincount(labels.ravel())
    out = labels.copy()
    out[sizes[labels] < min_size] = 0
    return out


def reference_postprocess(prob: np.ndarray, hv: np.ndarray, sobel_ksize: int = 21, marker_threshold: float = 0.4,
                          open_ksize: int = 5, marker_min_size: int = 10, min_size: int = 10) -> np.ndarray:
    """HoVer-Net's HV post-processing as its paper describes it, with OpenCV; (H, W) int labels."""
    import cv2
    from skimage.segmentation import watershed

    blob = _drop_small(ndi.label(prob >= 0.5)[0], min_size)
    blob = (blob > 0).astype(np.int32)
    h = cv2.normalize(hv[0].astype(np.float32), None, alpha=0, beta=1, norm_type=cv2.NORM_MINMAX, dtype=cv2.CV_32F)
    v = cv2.normalize(hv[1].astype(np.float32), None, alpha=0, beta=1, norm_type=cv2.NORM_MINMAX, dtype=cv2.CV_32F)
    sob_h = cv2.Sobel(h, cv2.CV_64F, 1, 0, ksize=sobel_ksize)
    sob_v = cv2.Sobel(v, cv2.CV_64F, 0, 1, ksize=sobel_ksize)
    sob_h = 1 - cv2.normalize(sob_h, None, alpha=0, beta=1, norm_type=cv2.NORM_MINMAX, dtype=cv2.CV_32F)
    sob_v = 1 - cv2.normalize(sob_v, None, alpha=0, beta=1, norm_type=cv2.NORM_MINMAX, dtype=cv2.CV_32F)
    overall = np.maximum(sob_h, sob_v) - (1 - blob)
    overall[overall < 0] = 0
    dist = -cv2.GaussianBlur((1.0 - overall) * blob, (3, 3), 0)
    marker = blob - (overall >= marker_threshold).astype(np.int32)
    marker[marker < 0] = 0
    marker = ndi.binary_fill_holes(marker).astype(np.uint8)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (open_ksize, open_ksize))
    marker = cv2.morphologyEx(marker, cv2.MORPH_OPEN, kernel)
    marker = _drop_small(ndi.label(marker)[0], marker_min_size)
    return watershed(dist, markers=marker, mask=blob)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--limit", type=int, default=0, help="first N patches only (default: all)")
    p.add_argument("--repeats", type=int, default=3, help="timed passes over the patches (default 3)")
    p.add_argument("--sharp", action="store_true", help="also compare with SHARP_MAP_PARAMS on both sides")
    args = p.parse_args(argv)

    import cv2

    from nucsynth import metrics as M
    from nucsynth.layout import Layout, relabel_contiguous
    from nucsynth.postprocess import SHARP_MAP_PARAMS, hv_watershed
    from nucsynth.threads import set_threads

    set_threads(1)
    labels = sorted((DATA / "consep256" / "Train" / "Labels").glob("*.mat"))
    if not labels:
        print(f"no CoNSeP patches under {DATA / 'consep256'}: nothing to measure", file=sys.stderr)
        return 1
    if args.limit:
        labels = labels[: args.limit]
    truths = [Layout.from_inst_map(d["inst_map"].astype(np.int32), d["inst_type"].ravel())
              for d in (sio.loadmat(f) for f in labels)]
    maps = [((t.inst_map > 0).astype(np.float32), t.hv_maps()) for t in truths]
    load = os.getloadavg()
    print(f"HV watershed on the exact maps of {len(truths)} CoNSeP patches (256 px), 1 thread, "
          f"OpenCV {cv2.__version__}, {args.repeats} interleaved passes; load average {load[0]:.1f} {load[1]:.1f}")
    settings = [("reference defaults", {})]
    if args.sharp:
        settings.append(("sharp-map setting", dict(SHARP_MAP_PARAMS)))
    print("| setting | ours ms/patch | reference ms/patch | ours / reference (wall) | ours / reference (CPU) "
          "| PQ ours | PQ reference | identical maps |")
    print("|---|---|---|---|---|---|---|---|")
    for name, params in settings:
        # [which][repeat, patch] wall and CPU seconds; which 0 = ours, 1 = reference
        wall = np.zeros((2, args.repeats, len(maps)))
        cpu = np.zeros((2, args.repeats, len(maps)))
        outs: list[list[np.ndarray]] = [[], []]
        for r in range(args.repeats):
            for i, (prob, hv) in enumerate(maps):
                for which in ((0, 1) if (r + i) % 2 == 0 else (1, 0)):
                    w0, c0 = time.perf_counter(), time.thread_time()
                    if which == 0:
                        out = hv_watershed(prob, hv, **params).inst_map
                    else:
                        out = reference_postprocess(prob, hv, **params)
                    cpu[which, r, i] = time.thread_time() - c0
                    wall[which, r, i] = time.perf_counter() - w0
                    if r == 0:
                        outs[which].append(out if which == 0 else relabel_contiguous(out)[0])
        ms = 1e3 * np.median(wall.sum(2), axis=1) / len(maps)  # median over repeats of the mean per patch
        cpu_ms = 1e3 * np.median(cpu.sum(2), axis=1) / len(maps)
        pq = [M.evaluate_set(truths, [Layout.from_inst_map(o) for o in outs[k]])["mean"]["pq"] for k in (0, 1)]
        same = sum(np.array_equal(a, b) for a, b in zip(*outs))
        print(f"| {name} | {ms[0]:.2f} | {ms[1]:.2f} | {ms[0] / ms[1]:.3f} | {cpu_ms[0] / cpu_ms[1]:.3f} | "
              f"{pq[0]:.4f} | {pq[1]:.4f} | {same}/{len(maps)} |", flush=True)
    load = os.getloadavg()
    print(f"load average at the end {load[0]:.1f} {load[1]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
