"""Measure the nucleus layout statistics that the layout generator uses.

A thin caller of :func:`nucsynth.generate.fit.fit_source_stats` (the one place of the
definitions; see that module): reads a dataset store (``--split``, default ``train``) or any
dataset folder nucsynth reads (e.g. CoNSeP ``Images/`` + ``Labels/*.mat``) and prints, per
class, area quartiles and a log-normal fit, shape (axis ratio, eccentricity, solidity), the
class mix, nuclei per 256 x 256 px, nearest-neighbour spacing and the share of same-class
nearest neighbours. The built-in constants of ``engine/nucsynth/generate/stats.py`` are
this script's output on the CoNSeP training patches; ``--json FILE`` also writes the
statistics file that ``random_layout(stats=...)`` and ``nucsynth demo`` use (the same file
as ``nucsynth stats``).

Usage::

    python scripts/measure_layout_stats.py ../shared/data/consep256/Train
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nucsynth.generate.fit import fit_source_stats, stats_table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source", type=Path, help="a dataset store or a dataset folder (e.g. CoNSeP Images/ + Labels/)")
    ap.add_argument("--split", default=None, help="split of a store (default: train; 'all' = every patch)")
    ap.add_argument("--json", type=Path, default=None, help="also write the statistics to this JSON file")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    args = ap.parse_args(argv)
    try:
        stats = fit_source_stats(args.source, args.split)
        print(stats_table(stats))
        if args.json is not None:
            stats.save(args.json, overwrite=args.overwrite, option="--json")
    except (ValueError, OSError) as e:
        print(f"measure_layout_stats: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
