"""``nucsynth synthesize``: render layouts with a trained model into a dataset store.

A thin front-end of :mod:`nucsynth.synthesize` (the engine every front-end shares): the
sampling flags are generated from :class:`nucsynth.synthesize.SynthesisOptions`, the
layouts come from :func:`nucsynth.io.sources.read_layout_source`.

What it renders depends on the checkpoint's family:

- ``semantic`` (SDM / NASDM / DiffMix): ``--layouts`` label maps, by ``--mode``: ``layout``
  (as they are; with ``--strength`` the source image is partially noised, SDEdit-style),
  ``balance`` (DiffMix balancing maps, rare-class shapes from the source's own pool topped
  up to ``--pool-size``) or ``enlarge`` (DiffMix enlarging maps); the DiffMix modes start
  from the source's real images noised to ``--strength`` (default 0.55).
- ``joint`` (co-synthesis): ``--layouts`` is a point source: a CSV file (header ``y,x,class``
  in any order; one canvas of ``--size H,W``, default the model's training size), a GeoJSON
  file, or a store / dataset (the centroids of its nuclei).
- ``structure`` (NuDiff stage 1): ``--count N`` new layouts of ``--size H,W``, rendered by the
  stage-2 image model ``--image-checkpoint``.

Resumable: the store is built in the hidden ``.NAME.partial`` beside ``--out`` and renamed
into place when complete. Killed or interrupted, the same command continues where it
stopped (other settings are refused, naming what differs). ``--workers N`` renders on a
local dask cluster, ``--scheduler ADDRESS`` on an existing one (docs/cli.md).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

NAME = "synthesize"
HELP = ("Render layouts (semantic: as they are, DiffMix-balanced or -enlarged; joint: from points; "
        "structure: --count new ones) with a trained model into a store; re-run to resume.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``nucsynth synthesize``."""
    from nucsynth.synthesize import add_option_arguments

    p.add_argument("--checkpoint", default=None,
                   help="checkpoint or run folder (default: $NUCSYNTH_CHECKPOINT, then the shipped model)")
    p.add_argument("--layouts", type=Path, default=None,
                   help="semantic: a dataset store or any readable source; joint: points as CSV (y,x,class), "
                        "GeoJSON, or a store's centroids; not for structure")
    p.add_argument("--split", default=None,
                   help="split of a store to render (default: its train split when it has one; 'all' = every patch)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N source patches")
    p.add_argument("--count", type=int, default=None, help="structure: how many new layouts to generate")
    p.add_argument("--size", default=None,
                   help="H,W canvas in px of structure layouts and of CSV / GeoJSON points "
                        "(default: the model's training size)")
    p.add_argument("--image-checkpoint", default=None,
                   help="structure: the NuDiff stage-2 semantic checkpoint (condition 'structure') rendering the images")
    p.add_argument("--text-encoder", type=Path, default=None,
                   help="joint models with an open_clip text tower: the local PLIP / QuiltNet folder or weights file "
                        "(default: the path recorded at training)")
    p.add_argument("--class-map", default=None,
                   help="how classes of --layouts named differently from the model's map onto them, e.g. "
                        "'dead=other,connective=spindle' (same-named classes match by name in any order)")
    g = p.add_argument_group("sampling (defaults: nucsynth.synthesize.SynthesisOptions)")
    add_option_arguments(g)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: best available)")
    p.add_argument("--workers", type=int, default=None,
                   help="render on a local dask cluster of N worker processes (one per GPU or CPU slot)")
    p.add_argument("--scheduler", default=None,
                   help="render on an existing dask cluster: its scheduler address (tcp://host:8786) or "
                        "scheduler file (.json)")
    p.add_argument("--out", type=Path, required=True, help="output dataset store (.zarr)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out (kept until the new one is complete), or restart a partial run "
                        "made with other settings")


# Arguments that only some families take: attribute -> (flag, families, what it is for).
_FAMILY_ARGS = {
    "layouts": ("--layouts", ("semantic", "joint"), "the layouts (semantic) or points (joint) to render"),
    "count": ("--count", ("structure",), "how many new layouts a structure model generates"),
    "size": ("--size", ("structure", "joint"), "the canvas of generated layouts and of CSV / GeoJSON points"),
    "split": ("--split", ("semantic", "joint"), "the split of a source store"),
    "limit": ("--limit", ("semantic", "joint"), "how many source patches to use"),
}


def _check_family_args(args: argparse.Namespace, synth: Any) -> None:
    family = synth.family
    for attr, (flag, families, what) in _FAMILY_ARGS.items():
        if getattr(args, attr) is not None and family not in families:
            raise ValueError(f"{flag} ({what}) does not apply to checkpoint {synth.checkpoint}, a {family!r} model; "
                             f"it is for {' / '.join(families)} checkpoints")
    if family == "semantic" and args.layouts is None:
        raise ValueError("a semantic checkpoint renders label maps: give --layouts (a dataset store or a readable source)")
    if family == "joint" and args.layouts is None:
        raise ValueError("a joint checkpoint needs point layouts: --layouts POINTS.csv (y,x,class), "
                         "POINTS.geojson or a dataset store (its nuclei centroids)")
    if family == "structure" and args.count is None:
        raise ValueError("a structure checkpoint generates new layouts: give --count N (and --size H,W)")


def _check_args(args: argparse.Namespace) -> None:
    from nucsynth.io.sources import parse_size

    for name in ("limit", "count", "workers"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be at least 1, got {value}")
    if args.workers is not None and args.scheduler is not None:
        raise ValueError("give --workers N (a local cluster) or --scheduler ADDRESS (an existing one), not both")
    parse_size(args.size)


def _printer() -> Any:
    """A progress callback printing at most about once a second (and every written batch)."""
    last = [0.0, -1]

    def show(p: Any) -> None:
        now = time.perf_counter()
        if p.done != last[1] or now - last[0] >= 1.0:
            print(f"  {p}", file=sys.stderr, flush=True)
            last[0], last[1] = now, p.done

    return show


def run(args: argparse.Namespace) -> int:
    """Synthesize; returns the exit code."""
    from nucsynth.io.sources import parse_size, read_layout_source, store_split
    from nucsynth.outputs import check_not_input
    from nucsynth.synthesize import SynthesisJob, get_synthesizer, options_from_args, plan_items

    _check_args(args)
    options = options_from_args(args)
    check_not_input(args.out, {"--layouts": args.layouts, "--checkpoint": args.checkpoint,
                               "--image-checkpoint": args.image_checkpoint})
    synth = get_synthesizer(args.checkpoint, args.device, args.image_checkpoint, args.text_encoder)
    _check_family_args(args, synth)
    size = parse_size(args.size)
    source = None
    if synth.family != "structure":
        if synth.family == "joint" and size is None and args.layouts.suffix.lower() == ".csv":
            size = (synth.image_size, synth.image_size)
        split = store_split(args.layouts, args.split)
        source = read_layout_source(args.layouts, split=split, limit=args.limit, points=synth.family == "joint",
                                    size=size, class_set=synth.class_set)
        source.items = synth.in_model_classes(source.items, args.class_map)  # refused before any other work
    has_images = source is not None and all(im is not None for im in source.images)
    opts = synth.resolve(options, has_images=has_images or synth.family != "semantic")
    summary: dict[str, Any] = {}
    items = plan_items(synth, opts, source, count=args.count,
                       size=size if synth.family == "structure" else None, summary=summary)
    if "balance_reached" in summary:
        print(f"balance: target reached in {summary['balance_reached']}/{len(items)} patches "
              f"(rare pool of {summary['balance_pool']} shapes)", file=sys.stderr)
    executor = None
    if args.workers is not None or args.scheduler is not None:
        from nucsynth.distributed import DaskExecutor

        executor = DaskExecutor(workers=args.workers, scheduler=args.scheduler, device=args.device)
    attrs = {"created_by": "nucsynth synthesize", "source": None if args.layouts is None else str(args.layouts)}
    job = SynthesisJob(synth, items, opts, args.out, overwrite=args.overwrite, attrs=attrs, executor=executor)
    where = executor.describe() if executor is not None else str(synth.device)
    print(f"nucsynth synthesize: {len(items)} samples, {synth.family} model {synth.checkpoint} "
          f"({opts.mode if synth.family == 'semantic' else synth.family}, guidance {opts.guidance}) on {where}",
          file=sys.stderr)
    try:
        result = job.run(progress=_printer())
    except KeyboardInterrupt:
        print(f"interrupted: what was rendered is kept; run the same command again to continue", file=sys.stderr)
        raise
    finally:
        if executor is not None:
            executor.close()
    for note in result.notes:
        print(f"  {note}", file=sys.stderr)
    print(f"wrote {result.written} samples to {result.out} in {result.seconds:.1f} s"
          + (f" ({result.skipped} from an earlier run)" if result.skipped else ""))
    return 0
