"""``nucsynth check STORE [--repair]``: verify a dataset store patch by patch.

Reads every committed patch and table of the store, compares them with the stored
checksums and lists each damaged patch with what is wrong (chunk file missing, chunk that
cannot be decoded, checksum mismatch). It also reports what killed runs left next to the
store (partial stores, an old store moved aside) and inside it (temporary chunk files).

``--repair`` asks for confirmation (``--yes`` skips the question), then rewrites the store
without the damaged patches (the old store stays in place until the new one is
complete), removes the leftovers of killed runs and puts back a store a killed
replacement had moved aside. Exit code: 0 intact (or repaired), 1 damage found and not
repaired, 2 bad input (no store, store being written, ...).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

NAME = "check"
HELP = "Verify a dataset store patch by patch (checksums); --repair drops damaged patches after confirming."


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``nucsynth check``."""
    p.add_argument("store", type=Path, help="dataset store (.zarr folder)")
    p.add_argument("--repair", action="store_true",
                   help="rewrite the store without its damaged patches and remove leftovers of killed runs")
    p.add_argument("--yes", action="store_true", help="with --repair: do not ask for confirmation")
    p.add_argument("--wait", action="store_true", help="with --repair: wait for a running writer instead of refusing")


def _confirm(question: str) -> bool:
    if not sys.stdin.isatty():
        raise ValueError("--repair needs confirmation: answer on a terminal or pass --yes")
    answer = input(f"{question} [y/N] ").strip().lower()
    return answer in ("y", "yes")


def run(args: argparse.Namespace) -> int:
    """Check (and repair); returns the exit code."""
    from nucsynth import outputs
    from nucsynth.io.store import DatasetStore, repair_store

    path: Path = args.store
    around = outputs.tidy(path, remove=False, report=None)
    stale = [lo for lo in outputs.leftovers(path) if not lo.alive]  # remains of killed runs
    if not path.exists():
        if args.repair and any("moved aside" in line for line in around):
            outputs.tidy(path, remove=True, report=lambda m: print(m))
        else:
            for line in around:
                print(line)
            raise FileNotFoundError(f"no dataset store at {path}")
    store = DatasetStore.open(path)

    def progress(done: int, total: int) -> None:
        if done == total or done % 1024 == 0:
            print(f"  checked {done}/{total} patches", file=sys.stderr, flush=True)

    report = store.check(progress=progress)
    for line in report.lines() + around:
        print(line)
    needs_rewrite = bool(report.damaged or report.unverified or report.version < 2)
    if not args.repair:
        return 0 if report.ok and not stale else 1
    if not needs_rewrite and not report.partial_files and not stale:
        return 0
    if needs_rewrite:
        keep = report.count - len(report.damaged)
        question = (f"rewrite {path} keeping {keep} of {report.count} patches"
                    f"{f' (dropping {len(report.damaged)} damaged)' if report.damaged else ''}?")
        if not (args.yes or _confirm(question)):
            print("nothing changed")
            return 1
        left = repair_store(path, report.damaged, wait=args.wait)
        print(f"repaired {path}: {left} patches kept, {len(report.damaged)} dropped")
    else:
        for f in report.partial_files:
            f.unlink(missing_ok=True)
        if report.partial_files:
            print(f"removed {len(report.partial_files)} temporary file(s) of killed writes inside {path}")
    outputs.tidy(path, remove=True, report=lambda m: print(m))
    after = DatasetStore.open(path).check()
    if not after.ok:
        for line in after.lines():
            print(line)
        return 1
    return 0
