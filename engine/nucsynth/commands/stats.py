"""``nucsynth stats``: fit the layout generator's statistics to a dataset store.

``nucsynth stats STORE [--split train] --out FILE.json`` measures nucleus size and shape per
class, density, spacing, class mix and coverage (:mod:`nucsynth.generate.fit`) and writes
them as JSON: the file ``random_layout(stats=LayoutStats.load(FILE))`` draws from, and what
``nucsynth train`` writes beside its checkpoints as ``layout_stats.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

NAME = "stats"
HELP = "Fit the layout generator's nucleus statistics (size, shape, density, spacing, class mix) to a store."


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``nucsynth stats``."""
    p.add_argument("store", type=Path, help="a dataset store (.zarr) or any dataset folder nucsynth reads")
    p.add_argument("--split", default=None, help="split of a store (default: train; 'all' = every patch)")
    p.add_argument("--out", type=Path, required=True, help="statistics file to write (.json)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")


def run(args: argparse.Namespace) -> int:
    """Fit and write; returns the exit code."""
    from nucsynth import outputs
    from nucsynth.generate.fit import fit_source_stats, stats_table

    outputs.check_not_input(args.out, {"STORE": args.store})
    outputs.check_output(args.out, args.overwrite)  # refuse before the work, not after

    def progress(done: int, total: int) -> None:
        if done == total or done % 100 == 0:
            print(f"measuring patch {done}/{total}", file=sys.stderr, flush=True)

    stats = fit_source_stats(args.store, args.split, progress=progress)
    print(stats_table(stats))
    stats.save(args.out, overwrite=args.overwrite)
    print(f"statistics: {args.out}")
    return 0
