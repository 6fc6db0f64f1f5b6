"""A large canvas on the CPU: one 2048 x 2048 layout rendered as overlapping windows of the
model's training size (nucsynth.diffusion.windows), with the peak memory and the seam.

Usage::

    python benchmarks/bench_large_canvas.py                       # the shipped model, 2048 px, 2 steps
    python benchmarks/bench_large_canvas.py --size 1024 --steps 4 --checkpoint runs/semantic --threads 2

Prints the process's resident memory after loading (baseline) and its peak after sampling
(``ru_maxrss``: everything the process ever held, so an upper bound), the engine's estimate
of the sampling memory, the wall time per solver step, and the seam ratio: the image
gradient across window borders over the gradient inside windows, beside the same figure at
positions that are not borders (the chance level). Guidance 0 by default (one network pass
per window and step: the cheapest CPU run).
"""

from __future__ import annotations

import nucsynth  # noqa: F401  first: the engine sets OpenMP's passive wait before torch loads (a spinning pool collapses on a busy CPU)

import argparse
import resource
import sys
import time

import torch


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None, help="semantic checkpoint (default: the shipped model)")
    p.add_argument("--size", type=int, default=2048, help="canvas side in px (default 2048)")
    p.add_argument("--steps", type=int, default=2, help="solver steps (default 2)")
    p.add_argument("--guidance", type=float, default=0.0, help="guidance scale (default 0: one pass per step)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from nucsynth.diffusion.windows import DEFAULT_OVERLAP, seam_ratio, window_starts
    from nucsynth.generate.layouts import random_layout
    from nucsynth.synthesize import SynthesisOptions, get_synthesizer, plan_items

    synth = get_synthesizer(args.checkpoint, "cpu")
    if synth.family != "semantic":
        sys.exit(f"{synth.checkpoint} holds a {synth.family!r} model; this benchmark renders layouts (semantic)")
    model = synth.model
    f = int(getattr(model.config, "latent_factor", 1) or 1)
    window = model.image_size // f
    n_win = len(window_starts(args.size // f, window, int(round(DEFAULT_OVERLAP * window)))) ** 2
    t0 = time.perf_counter()
    layout = random_layout((args.size, args.size), synth.class_set, seed=args.seed)
    t_layout = time.perf_counter() - t0
    base = _rss_mib()
    opts = synth.resolve(SynthesisOptions(steps=args.steps, guidance=args.guidance, seed=args.seed))
    items = plan_items(synth, opts, [layout])
    estimate = synth.memory_estimate(layout.shape, 1, opts.guidance)
    times: list[float] = []
    last = [time.perf_counter()]

    def tick(i: int, n: int) -> None:
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now
        print(f"  step {i}/{n}: {times[-1]:.1f} s", file=sys.stderr, flush=True)

    print(f"{synth.checkpoint} ({model.preset}, trained at {model.image_size} px), canvas {args.size} px: "
          f"{n_win} windows of {window} per step, {layout.num_nuclei} nuclei (layout in {t_layout:.1f} s), "
          f"{args.threads} thread(s)", flush=True)
    last[0] = time.perf_counter()
    sample = synth.render(items, opts, progress=tick)[0]
    peak = _rss_mib()
    chance = max(seam_ratio(sample.image, model.image_size, shift=s) for s in (-9, -6, -4, 4, 6, 9))
    print(f"per step: {sum(times) / len(times):.1f} s; resident memory: {base:.0f} MiB after loading, "
          f"peak {peak:.0f} MiB (+{peak - base:.0f} MiB while sampling; engine estimate {estimate / 2**20:.0f} MiB)")
    print(f"seam ratio across window borders: {seam_ratio(sample.image, model.image_size):.3f} "
          f"(same figure at non-border positions, chance: up to {chance:.3f}; 1 = no seam)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
