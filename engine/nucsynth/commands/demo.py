"""``nucsynth demo``: the main job on the shipped default.

Generates sample layouts from the real-data statistics, renders synthetic tissue for them
with the shipped default semantic checkpoint (or the one given), writes the Samples to a
dataset store and a PNG overview sheet (layout beside tissue).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

NAME = "demo"
HELP = "Generate sample layouts, render tissue with the shipped model, write a store and a PNG overview."


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``nucsynth demo``."""
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder (default: demo_out)")
    p.add_argument("-n", "--num", type=int, default=8, help="number of layouts (default: 8)")
    p.add_argument("--size", type=int, default=None, help="canvas size in px (default: the checkpoint's training size)")
    p.add_argument("--seed", type=int, default=0, help="seed of layouts and sampling (default: 0)")
    p.add_argument("--checkpoint", type=str, default=None, help="semantic checkpoint (default: the shipped one)")
    p.add_argument("--steps", type=int, default=20, help="solver steps (default: 20)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's)")
    p.add_argument("--device", type=str, default=None, help="cpu, cuda, cuda:1, mps (default: best available)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing demo store in --out")


def run(args: argparse.Namespace) -> int:
    """Run the demo; returns the exit code."""
    from nucsynth.checkpoint import load_checkpoint, resolve_checkpoint
    from nucsynth.device import pick_device
    from nucsynth.generate.layouts import random_layout
    from nucsynth.io.store import DatasetStore
    from nucsynth.viz import overview_sheet, save_png

    if args.num < 1:
        raise ValueError(f"--num must be at least 1, got {args.num}")
    if args.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {args.steps}")
    store_path = args.out / "demo.zarr"
    if store_path.exists() and not args.overwrite:
        raise FileExistsError(f"{store_path} exists; pass --overwrite to replace it")

    device = pick_device(args.device)
    ckpt_path = resolve_checkpoint(args.checkpoint)
    model, _ = load_checkpoint(ckpt_path, device=device)
    size = args.size or model.image_size
    print(f"nucsynth demo: model {ckpt_path} ({model.preset}) on {device}, {args.num} layouts of {size} px", file=sys.stderr)

    layouts = [random_layout((size, size), model.class_set, seed=args.seed + i) for i in range(args.num)]
    t0 = time.perf_counter()
    kwargs = {} if args.guidance is None else {"guidance": args.guidance}
    samples = model.sample(layouts, steps=args.steps, seed=args.seed, **kwargs)
    elapsed = time.perf_counter() - t0

    store = DatasetStore.create(
        store_path,
        model.class_set,
        attrs={"created_by": "nucsynth demo", "checkpoint": str(ckpt_path), "seed": args.seed, "steps": args.steps},
        overwrite=args.overwrite,
    )
    store.append(samples, splits="synthetic")
    png = save_png(overview_sheet(samples), args.out / "overview.png")

    counts = store.class_counts()
    names = ["unknown", *model.class_set.names]
    summary = ", ".join(f"{names[k]} {int(c)}" for k, c in enumerate(counts) if c or k)
    print(f"rendered {len(samples)} samples in {elapsed:.1f} s ({elapsed / len(samples):.2f} s each)")
    print(f"nuclei per class: {summary}")
    print(f"store:    {store_path}")
    print(f"overview: {png}")
    return 0
