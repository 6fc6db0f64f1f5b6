"""What checking every patch against its checksums costs when reading a store.

    python benchmarks/bench_store_verify.py [--patches 64] [--size 256] [--repeats 5] [--threads 1]

Builds a store of ``--patches`` patches (CoNSeP 256 px patches from ../shared/data when
present, else random images with disc nuclei), then reads it whole by iteration, with the
checksum verification every read does and without it, interleaved ``--repeats`` times, and
prints the median times and their ratio, plus the time of ``DatasetStore.check()``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CONSEP = ROOT.parent / "shared" / "data" / "consep256" / "Train"


def _samples(n: int, size: int) -> tuple[list, str]:
    from nucsynth.layout import CONSEP_CLASSES, Layout, Sample

    if CONSEP.is_dir() and size == 256:
        from nucsynth.io import read_consep

        return read_consep(CONSEP)[:n], f"CoNSeP patches from {CONSEP}"
    rng = np.random.default_rng(0)
    yy, xx = np.indices((size, size))
    out = []
    for i in range(n):
        inst = np.zeros((size, size), np.int32)
        for j, (cy, cx) in enumerate(rng.integers(8, size - 8, (20, 2)), start=1):
            inst[((yy - cy) ** 2 + (xx - cx) ** 2 <= 25) & (inst == 0)] = j
        ids = np.unique(inst[inst > 0])
        inst = (np.searchsorted(ids, inst) + 1).astype(np.int32) * (inst > 0)
        lay = Layout.from_inst_map(inst, rng.integers(1, 5, len(ids)), CONSEP_CLASSES)
        out.append(Sample(lay, rng.integers(0, 256, (size, size, 3), dtype=np.uint8), {"index": i}))
    return out, "random patches"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--patches", type=int, default=64)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch / BLAS threads (default 1)")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from nucsynth.io.store import DatasetStore

    samples, what = _samples(args.patches, args.size)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "s.zarr"
        with DatasetStore.create(path, samples[0].layout.class_set) as st:
            st.append(samples)
        st = DatasetStore.open(path)
        plain = DatasetStore._sample

        def unverified(self, j, image, inst, cs, verify=True):  # the read without the check
            return plain(self, j, image, inst, cs, verify=False)

        times: dict[str, list[float]] = {"verified": [], "unverified": [], "check": []}
        for _ in range(args.repeats):
            for name in ("verified", "unverified"):
                DatasetStore._sample = plain if name == "verified" else unverified
                t0 = time.perf_counter()
                n = sum(1 for _ in st)
                times[name].append(time.perf_counter() - t0)
            DatasetStore._sample = plain
            t0 = time.perf_counter()
            assert st.check().ok
            times["check"].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{n} {what}, {args.size} px, {args.threads} thread(s), median of {args.repeats} interleaved runs")
    print(f"read all, verified:   {med['verified'] * 1e3:8.1f} ms ({med['verified'] / n * 1e3:.2f} ms/patch)")
    print(f"read all, unverified: {med['unverified'] * 1e3:8.1f} ms ({med['unverified'] / n * 1e3:.2f} ms/patch)")
    print(f"verified / unverified: {med['verified'] / med['unverified']:.3f}")
    print(f"check():              {med['check'] * 1e3:8.1f} ms ({med['check'] / n * 1e3:.2f} ms/patch)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
