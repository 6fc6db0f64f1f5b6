"""Latent vs pixel rendering cost of one 256 px layout (20 solver steps, guidance on).

Side by side in one run, interleaved (pixel, latent, pixel, latent, ...), median wall time
of ``--repeats`` renders each, torch threads set explicitly. Paths compared:

- ``pixel tiny@64``: the pixel-space ``tiny`` network of the former shipped default (the
  preset for 64 px patches) rendering a 256 px canvas;
- ``pixel tiny@256``: the pixel ``tiny`` preset sized for 256 px patches;
- ``latent``: the latent model (default: the shipped default), denoising 64 x 64 latents
  and decoding once with its autoencoder.

Weights do not change the cost, so the pixel networks are built untrained from their
presets. Network FLOPs per rendered patch are counted with ``torch.utils.flop_counter``
(one guided network call x steps, plus the decoder for the latent path).
Target (model issue): latent time <= 1/8 of the pixel ``tiny`` path at 256 px.

    python benchmarks/bench_latent_speed.py [--checkpoint LATENT] [--threads 2] [--repeats 3]
"""

from __future__ import annotations

import nucsynth  # noqa: F401  first: the engine sets OpenMP's passive wait before torch loads (a spinning pool collapses on a busy CPU)

import argparse
import json
import statistics
import time


def _flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="latent semantic checkpoint (default: the shipped default)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=0.5)
    p.add_argument("--size", type=int, default=256)
    args = p.parse_args()

    import torch

    from nucsynth.checkpoint import load_checkpoint, resolve_checkpoint
    from nucsynth.generate.layouts import random_layout
    from nucsynth.models.semantic import SemanticModel

    torch.set_num_threads(args.threads)
    latent, _ = load_checkpoint(resolve_checkpoint(args.checkpoint))
    if not getattr(latent, "is_latent", False):
        raise SystemExit(f"{args.checkpoint or 'the shipped default'} is not a latent model")
    paths = {"latent": latent}
    for name, size in (("pixel tiny@64", 64), ("pixel tiny@256", 256)):
        m = SemanticModel.from_preset("tiny", size, latent.class_set, prediction="v")
        m.net = m.build_network().eval()
        paths[name] = m
    layout = random_layout((args.size, args.size), class_set=latent.class_set, seed=0)

    def render(model: SemanticModel) -> None:
        model.sample([layout], steps=args.steps, guidance=args.guidance, seed=0)

    flops = {}
    for name, m in paths.items():
        cond = m.condition([layout])
        if m.is_latent:
            lc = m.latent_condition(cond)
            x = torch.zeros(2, int(m.config.latent["channels"]), lc.shape[2], lc.shape[3])
            c2 = torch.cat([lc, torch.zeros_like(lc)])
            with torch.no_grad():
                step = _flops(lambda: m.net(x, torch.zeros(2, dtype=torch.long), c2))
                dec = _flops(lambda: m.decode_latents(x[:1], cond))
            flops[name] = step * args.steps + dec
        else:
            x = torch.zeros(2, 3, args.size, args.size)
            c2 = torch.cat([cond, torch.zeros_like(cond)])
            with torch.no_grad():
                flops[name] = _flops(lambda: m.net(x, torch.zeros(2, dtype=torch.long), c2)) * args.steps
    render(latent)  # warm-up (loads the autoencoder)
    times: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(args.repeats):
        for name, m in paths.items():
            t0 = time.perf_counter()
            render(m)
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {
        "size": args.size, "steps": args.steps, "guidance": args.guidance, "threads": args.threads,
        "seconds_median": med, "gflop_per_patch": {k: v / 1e9 for k, v in flops.items()},
        "ratio_latent_over_pixel_tiny64": med["latent"] / med["pixel tiny@64"],
        "ratio_latent_over_pixel_tiny256": med["latent"] / med["pixel tiny@256"],
    }
    print(json.dumps(out, indent=1))
    for k in paths:
        print(f"{k:16s} {med[k]:7.2f} s  {flops[k] / 1e9:8.1f} GFLOP per {args.size} px patch")
    print(f"latent / pixel tiny@64 = {out['ratio_latent_over_pixel_tiny64']:.3f} (target <= 0.125); "
          f"latent / pixel tiny@256 = {out['ratio_latent_over_pixel_tiny256']:.3f}")


if __name__ == "__main__":
    main()
