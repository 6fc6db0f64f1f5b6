"""Stain normalization speed: fit time and per-patch transform time, Macenko and Vahadane.

Target: one CoNSeP 256 px patch; sources: 256 px patches cut from the MoNuSeg training
images (both from ../shared/data, or NUCSYNTH_SHARED_DATA). Without the real data the
script says so and uses procedural H&E-like images instead (timings stay comparable: the
cost depends on the pixel count, not the content).

    python benchmarks/bench_stain.py [--patches 40] [--repeats 3]

The per-patch time includes estimating the patch's own stains (the default use); the
target is fitted once. Target figure: Vahadane under 0.2 s per 256 px patch on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from nucsynth.data.stain import make_normalizer, od_to_rgb

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("NUCSYNTH_SHARED_DATA", ROOT.parent / "shared" / "data"))


def _read_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _procedural(seed: int, size: int = 256) -> np.ndarray:
    """Beer-Lambert rendering of random H and E concentrations (stroma + dark discs)."""
    rng = np.random.default_rng(seed)
    stains = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]]) + rng.normal(0, 0.05, (2, 3))
    yy, xx = np.indices((size, size))
    c = np.stack([rng.uniform(0, 0.15, (size, size)), rng.uniform(0.2, 1.0, (size, size))], -1)
    for _ in range(40):
        cy, cx, r = rng.uniform(0, size, 2).tolist() + [rng.uniform(4, 9)]
        m = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        c[m] = [rng.uniform(0.6, 1.5), 0.1]
    return od_to_rgb(c @ np.abs(stains))


def load(patches: int) -> tuple[np.ndarray, list[np.ndarray], str]:
    """Target patch, source patches and a description of where they come from."""
    target_path = DATA / "consep256" / "Train" / "Images" / "train_10_005.jpg"
    mon = sorted((DATA / "monuseg" / "Train" / "Tissue_Images").glob("*.tif"))
    if not target_path.exists() or not mon:
        print(f"real data not found under {DATA}: using procedural H&E-like images")
        return _procedural(0), [_procedural(s + 1) for s in range(patches)], "procedural"
    sources = []
    for path in mon:
        img = _read_rgb(path)
        for y in range(0, img.shape[0] - 255, 256):
            for x in range(0, img.shape[1] - 255, 256):
                sources.append(img[y : y + 256, x : x + 256])
    step = max(1, len(sources) // patches)
    return _read_rgb(target_path), sources[::step][:patches], f"CoNSeP target {target_path.name}, MoNuSeg sources"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patches", type=int, default=40, help="number of 256 px source patches")
    ap.add_argument("--repeats", type=int, default=3, help="fits timed per method (best kept)")
    args = ap.parse_args()
    target, sources, what = load(args.patches)
    print(f"data: {what}; {len(sources)} source patches of {sources[0].shape[0]}x{sources[0].shape[1]} px")
    for method in ("macenko", "vahadane"):
        fits = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            norm = make_normalizer(method).fit(target)
            fits.append(time.perf_counter() - t0)
        norm.transform(sources[0])  # warm-up
        times = []
        for patch in sources:
            t0 = time.perf_counter()
            norm.transform(patch)
            times.append(time.perf_counter() - t0)
        t = np.array(times)
        print(
            f"{method:9s} fit {min(fits) * 1e3:7.1f} ms | transform per 256 px patch: "
            f"mean {t.mean() * 1e3:6.1f} ms, median {np.median(t) * 1e3:6.1f} ms, max {t.max() * 1e3:6.1f} ms"
        )


if __name__ == "__main__":
    main()
