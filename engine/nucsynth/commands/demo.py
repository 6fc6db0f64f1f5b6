"""``nucsynth demo``: the main job on the shipped default.

Generates sample layouts from the layout statistics found beside the checkpoint
(``layout_stats.json``, written by ``nucsynth train``; else the built-in CoNSeP ones; the
samples' provenance says which), renders synthetic tissue for them with the shipped
default semantic checkpoint (or the one given) through the synthesis engine
(:mod:`nucsynth.synthesize`: bounded batches, progress per solver step, resumable), writes
the Samples to a dataset store and a PNG overview sheet (layout beside tissue).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

NAME = "demo"
HELP = "Generate sample layouts, render tissue with the shipped model, write a store and a PNG overview."
_OPTIONS = ("steps", "sampler", "guidance", "seed", "batch_size")  # the sampling flags a demo offers


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``nucsynth demo``."""
    from nucsynth.synthesize import add_option_arguments

    p.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder (default: demo_out)")
    p.add_argument("-n", "--num", type=int, default=8, help="number of layouts (default: 8)")
    p.add_argument("--size", type=int, default=None, help="canvas size in px (default: the largest canvas the model renders in one pass)")
    p.add_argument("--checkpoint", type=str, default=None, help="semantic checkpoint (default: the shipped one)")
    add_option_arguments(p, only=_OPTIONS)
    p.add_argument("--device", type=str, default=None, help="cpu, cuda, cuda:1, mps (default: best available)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing demo store in --out")


def demo_layouts(num: int, size: int, class_set: object, seed: int, stats: object = None) -> list:
    """The demo's layouts: ``random_layout`` of ``size`` px with seeds seed, seed+1, ...,
    drawn from ``stats`` (a LayoutStats; default: the built-in CoNSeP statistics)."""
    from nucsynth.generate.layouts import random_layout

    return [random_layout((size, size), class_set, seed=seed + i, stats=stats) for i in range(num)]


def run(args: argparse.Namespace) -> int:
    """Run the demo; returns the exit code."""
    from nucsynth.synthesize import SynthesisJob, get_synthesizer, options_from_args, plan_items
    from nucsynth.viz import overview_sheet, save_png

    if args.num < 1:
        raise ValueError(f"--num must be at least 1, got {args.num}")
    options = options_from_args(args)
    synth = get_synthesizer(args.checkpoint, args.device)
    if synth.family != "semantic":
        raise ValueError(f"the demo renders layouts with a semantic model; {synth.checkpoint} holds a {synth.family!r} one")
    size = args.size or synth.render_size
    opts = synth.resolve(options)
    stats, stats_origin = synth.layout_stats
    layouts = demo_layouts(args.num, size, synth.class_set, opts.seed, stats)
    items = plan_items(synth, opts, layouts)
    for it in items:
        it.provenance.update(layout_generator="random_layout", layout_stats=stats_origin)
    store_path = args.out / "demo.zarr"
    print(f"nucsynth demo: model {synth.checkpoint} ({synth.model.preset}) on {synth.device}, {args.num} layouts "
          f"of {size} px from {stats_origin} statistics, batches of {opts.batch_size}", file=sys.stderr)
    job = SynthesisJob(synth, items, opts, store_path, overwrite=args.overwrite, attrs={"created_by": "nucsynth demo"})
    last = [-1]

    def show(p: object) -> None:
        if getattr(p, "step", 0) in (0, getattr(p, "steps", 0)) or getattr(p, "done") != last[0]:
            print(f"  {p}", file=sys.stderr, flush=True)
            last[0] = getattr(p, "done")

    result = job.run(progress=show)
    from nucsynth.io.store import DatasetStore

    store = DatasetStore.open(store_path)
    samples = list(store)
    png = save_png(overview_sheet(samples), args.out / "overview.png")
    counts = store.class_counts()
    names = ["unknown", *synth.class_set.names]
    summary = ", ".join(f"{names[k]} {int(c)}" for k, c in enumerate(counts) if c or k)
    if result.written:
        print(f"rendered {result.written} samples in {result.seconds:.1f} s ({result.seconds / result.written:.2f} s each)")
    for note in result.notes:
        print(f"  {note}", file=sys.stderr)
    print(f"nuclei per class: {summary}")
    print(f"store:    {store_path}")
    print(f"overview: {png}")
    return 0
