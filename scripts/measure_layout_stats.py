"""Measure the nucleus layout statistics that the layout generator uses.

Reads CoNSeP / HoVer-Net label files (``Labels/*.mat`` with ``inst_map`` and ``inst_type``)
directly with scipy and prints, per class:

- area in pixels: quartiles and a log-normal fit (mean and std of log area);
- shape: axis ratio (major / minor axis of the moment ellipse), eccentricity and solidity;
- class mix (share of all nuclei) and nuclei per 256 x 256 px patch (density);
- nearest-neighbour centroid spacing (to any nucleus) and the share of nearest neighbours
  of the same class (a measure of clustering).

Shape and size statistics use only nuclei that do not touch the patch border (a cut
nucleus is not a whole nucleus). The printed block is pasted into
``engine/nucsynth/generate/stats.py``.

Usage::

    python scripts/measure_layout_stats.py ../shared/data/consep256/Train
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import scipy.io as sio
from scipy.spatial import cKDTree
from skimage.measure import regionprops

CLASS_NAMES = ("other", "inflammatory", "epithelial", "spindle")


def read_labels(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(inst_map int32 (H, W), classes int64 (N,)) of one CoNSeP label file."""
    m = sio.loadmat(str(path))
    for key in ("inst_map", "inst_type"):
        if key not in m:
            raise ValueError(f"{path}: no {key!r} array (keys: {sorted(k for k in m if not k.startswith('__'))})")
    inst = np.asarray(m["inst_map"]).astype(np.int32)
    classes = np.asarray(m["inst_type"]).reshape(-1).astype(np.int64)
    if inst.ndim != 2 or inst.max() > classes.size:
        raise ValueError(f"{path}: inst_map {inst.shape} with max id {inst.max()} but {classes.size} inst_type rows")
    return inst, classes


def measure(folder: Path) -> dict[str, np.ndarray | list]:
    """Per-nucleus and per-patch measurements over every label file in ``folder/Labels``."""
    files = sorted((folder / "Labels").glob("*.mat"))
    if not files:
        raise FileNotFoundError(f"no .mat label files under {folder / 'Labels'}")
    rows = []  # class, area, axis ratio, eccentricity, solidity, touches border, nn dist, nn same class
    per_patch = []  # nuclei per class in each patch
    patch_px = []
    coverage = []  # share of pixels inside nuclei, per patch
    for f in files:
        inst, classes = read_labels(f)
        h, w = inst.shape
        patch_px.append(h * w)
        coverage.append(float((inst > 0).mean()))
        props = regionprops(inst)
        if not props:
            per_patch.append(np.zeros(len(CLASS_NAMES), int))
            continue
        cen = np.array([p.centroid for p in props])
        lab = np.array([p.label for p in props])
        cls = classes[lab - 1]
        if len(props) > 1:
            d, j = cKDTree(cen).query(cen, k=2)
            nn, same = d[:, 1], (cls[j[:, 1]] == cls)
        else:
            nn, same = np.full(1, np.nan), np.zeros(1, bool)
        for p, c, dn, sm in zip(props, cls, nn, same):
            y0, x0, y1, x1 = p.bbox
            border = y0 == 0 or x0 == 0 or y1 == h or x1 == w
            minor = max(p.axis_minor_length, 1e-6)
            rows.append((c, p.area, p.axis_major_length / minor, p.eccentricity, p.solidity, border, dn, sm))
        per_patch.append(np.bincount(cls, minlength=len(CLASS_NAMES) + 1)[1:])
    return {
        "rows": np.array(rows, dtype=float),
        "per_patch": np.array(per_patch),
        "patch_px": np.array(patch_px),
        "coverage": np.array(coverage),
    }


def _q(a: np.ndarray, digits: int = 1) -> str:
    q = np.percentile(a, [25, 50, 75])
    return " / ".join(f"{v:.{digits}f}" for v in q)


def report(m: dict) -> str:
    rows, per_patch = m["rows"], m["per_patch"]
    scale = (256 * 256) / m["patch_px"].mean()
    lines = [f"patches: {len(per_patch)}, nuclei: {len(rows)}, nuclei per 256 px patch: "
             f"mean {per_patch.sum(1).mean() * scale:.1f}, sd {per_patch.sum(1).std() * scale:.1f}, "
             f"quartiles {_q(per_patch.sum(1) * scale)}"]
    total = len(rows)
    whole = rows[:, 5] == 0
    lines.append("class: count share | area q25/q50/q75 | log-area mu sigma | axis ratio q25/q50/q75 | "
                 "eccentricity median | solidity median | nn dist q25/q50/q75 | nn same-class share")
    for k, name in [*enumerate(CLASS_NAMES, start=1), (0, "all")]:
        sel = rows[:, 0] == k if k else np.ones(total, bool)
        sw = sel & whole
        area = rows[sw, 1]
        la = np.log(area)
        nn = rows[sel, 6]
        nn = nn[np.isfinite(nn)]
        lines.append(
            f"{k} {name}: {int(sel.sum())} {sel.sum() / total:.4f} | {_q(area)} | {la.mean():.3f} {la.std():.3f} | "
            f"{_q(rows[sw, 2], 2)} | {np.median(rows[sw, 3]):.3f} | {np.median(rows[sw, 4]):.3f} | {_q(nn)} | "
            f"{rows[sel, 7].mean():.3f}"
        )
    nn_all = rows[np.isfinite(rows[:, 6]), 6]
    lines.append(f"all: nn dist quartiles {_q(nn_all)}, 1st percentile {np.percentile(nn_all, 1):.1f}; "
                 f"nucleus pixel coverage per patch quartiles {_q(100 * m['coverage'])} %")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path, help="a CoNSeP-style folder holding Labels/*.mat")
    args = ap.parse_args(argv)
    print(report(measure(args.folder)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
