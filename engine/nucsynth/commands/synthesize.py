"""``nucsynth synthesize``: render layouts with a trained model into a dataset store.

Modes (semantic family):

- ``layout``: render each source layout as it is (from pure noise; with ``--strength`` the
  source image is partially noised instead, SDEdit-style);
- ``balance``: DiffMix balancing maps (abundant nuclei swapped for rare-class shapes from
  the source's own rare pool), rendered from the REAL image of each patch partially noised
  to ``--strength`` (default 0.55, as in DiffMix);
- ``enlarge``: DiffMix enlarging maps (nuclei shifted without overlaps), rendered the same way.

The output store is built under a temporary name and renamed into place when complete; an
existing ``--out`` is refused unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

NAME = "synthesize"
HELP = "Render layouts (as they are, DiffMix-balanced or -enlarged) with a trained model into a store."

MODES = ("layout", "balance", "enlarge")
DIFFMIX_STRENGTH = 0.55


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``nucsynth synthesize``."""
    p.add_argument("--checkpoint", default=None, help="checkpoint or run folder (default: $NUCSYNTH_CHECKPOINT, then the shipped model)")
    p.add_argument("--layouts", type=Path, required=True, help="source of layouts: a dataset store or any readable source")
    p.add_argument("--split", default=None, help="only this split of a store (default: all patches)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N source patches")
    p.add_argument("--mode", choices=MODES, default="layout", help="layout (default), balance or enlarge")
    p.add_argument("--steps", type=int, default=20, help="solver steps for a full chain (default: 20)")
    p.add_argument("--guidance", type=float, default=0.5,
                   help="guidance scale s in eps_c + s (eps_c - eps_u) (default 0.5 = SDM/DiffMix's 1.5)")
    p.add_argument("--sampler", choices=("dpm++2m", "ddim", "ancestral"), default="dpm++2m", help="(default: dpm++2m)")
    p.add_argument("--strength", type=float, default=None,
                   help=f"partial noising of the real image, 0-1 (default: {DIFFMIX_STRENGTH} for balance/enlarge, none for layout)")
    p.add_argument("--target-share", type=float, default=None,
                   help="balance: share of the rare class to reach per patch (default: replace as many as fit)")
    p.add_argument("--border", type=int, default=30,
                   help="balance: nuclei with a centroid closer than this to the edge are kept (default 30 px, as DiffMix)")
    p.add_argument("--enlarge-fraction", type=float, default=0.5, help="enlarge: share of nuclei moved (default 0.5)")
    p.add_argument("--max-shift", type=int, default=3, help="enlarge: largest shift in px (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of edits and sampling (default: 0)")
    p.add_argument("--batch-size", type=int, default=4, help="patches rendered at once (default: 4)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: best available)")
    p.add_argument("--out", type=Path, required=True, help="output dataset store (.zarr)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out store")


def _read_layout_source(path: Path, split: str | None, limit: int | None) -> list[Any]:
    from nucsynth.io import read_source
    from nucsynth.io.store import DatasetStore

    if not path.exists():
        raise FileNotFoundError(f"--layouts {path} does not exist")
    try:
        store = DatasetStore.open(path)
    except (ValueError, FileNotFoundError, OSError):
        store = None
    if store is not None:
        idx = range(len(store)) if split is None else store.indices(split)
        if split is not None and len(idx) == 0:
            raise ValueError(f"store {path} has no patches in split {split!r}")
        idx = list(idx)[:limit] if limit else list(idx)
        return [store[int(i)] for i in idx]
    if split is not None:
        raise ValueError(f"--split only applies to a dataset store; {path} is not one")
    samples = read_source(path)
    return samples[:limit] if limit else samples


def _edit(samples: Sequence[Any], args: argparse.Namespace) -> list[Any]:
    """The layouts to render for the chosen mode (one per source sample)."""
    lays = [s.layout for s in samples]
    if args.mode == "layout":
        return lays
    if args.mode == "enlarge":
        from nucsynth.edit import enlarge_layout

        return [enlarge_layout(l, fraction=args.enlarge_fraction, max_shift=args.max_shift, seed=args.seed + i)
                for i, l in enumerate(lays)]
    from nucsynth.edit import BalanceWarning, balance_dataset

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BalanceWarning)  # the reports below say what was reached
        out, reports = balance_dataset(lays, target_share=args.target_share, seed=args.seed, border=args.border)
    reached = sum(bool(r.reached) for r in reports)
    print(f"balance: target reached in {reached}/{len(reports)} patches", file=sys.stderr)
    return out


def _check_args(args: argparse.Namespace) -> None:
    if args.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {args.steps}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.strength is not None and not 0.0 < args.strength <= 1.0:
        raise ValueError(f"--strength must be in (0, 1], got {args.strength}")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be at least 1, got {args.limit}")
    if args.out.exists() and not args.overwrite:
        raise FileExistsError(f"{args.out} already exists; pass --overwrite to replace it")


def run(args: argparse.Namespace) -> int:
    """Synthesize; returns the exit code."""
    from nucsynth.checkpoint import load_checkpoint, resolve_checkpoint
    from nucsynth.device import pick_device
    from nucsynth.io.store import DatasetStore, move_into_place, temporary_path

    _check_args(args)
    device = pick_device(args.device)
    ckpt = resolve_checkpoint(args.checkpoint)
    model, _ = load_checkpoint(ckpt, device=device)
    if model.name != "semantic":
        raise ValueError(f"checkpoint {ckpt} holds a {model.name!r} model; synthesize renders label maps "
                         "with a 'semantic' model")
    samples = _read_layout_source(args.layouts, args.split, args.limit)
    if not samples:
        raise ValueError(f"--layouts {args.layouts} holds no samples")
    layouts = _edit(samples, args)
    strength = args.strength if args.strength is not None else (None if args.mode == "layout" else DIFFMIX_STRENGTH)
    print(f"nucsynth synthesize: {len(layouts)} patches, mode {args.mode}, model {ckpt} on {device}", file=sys.stderr)

    tmp = temporary_path(args.out)
    attrs = {"created_by": "nucsynth synthesize", "checkpoint": str(ckpt), "mode": args.mode,
             "source": str(args.layouts), "seed": args.seed, "steps": args.steps, "guidance": args.guidance,
             "sampler": args.sampler, "strength": strength}
    t0 = time.perf_counter()
    try:
        store = DatasetStore.create(tmp, model.class_set, attrs=attrs)
        for start in range(0, len(layouts), args.batch_size):
            src = samples[start : start + args.batch_size]
            batch = layouts[start : start + args.batch_size]
            init = [s.image for s in src] if strength is not None else None
            out = model.sample(batch, steps=args.steps, guidance=args.guidance, seed=args.seed + start,
                               sampler=args.sampler, init_image=init, strength=strength)
            store.append([_with_provenance(o, s, args.mode, start + i) for i, (o, s) in enumerate(zip(out, src))],
                         splits="synthetic")
            print(f"  {min(start + args.batch_size, len(layouts))}/{len(layouts)} patches", file=sys.stderr, flush=True)
        move_into_place(tmp, args.out, overwrite=args.overwrite)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"wrote {len(layouts)} samples to {args.out} in {time.perf_counter() - t0:.1f} s")
    return 0


def _with_provenance(out: Any, src: Any, mode: str, index: int) -> Any:
    from nucsynth.layout import Sample

    prov = {**out.provenance, "mode": mode, "source_index": index,
            "source": src.provenance.get("source"), "source_tile": src.provenance.get("tile")}
    return Sample(out.layout, out.image, prov)
