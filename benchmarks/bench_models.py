"""Cost of the networks: parameters and FLOPs per forward pass for each U-Net preset.

Usage::

    python benchmarks/bench_models.py                      # all presets at 256 px
    python benchmarks/bench_models.py --size 128 --measure flops,memory
    python benchmarks/bench_models.py --device cuda        # device for measurements that run

The network is the semantic (SDM) U-Net: 3 image channels in, 6 out (eps + learned
variance), condition = 4 CoNSeP classes + background + instance edge = 6 channels.

Each measurement is a function ``measure_X(preset, size, device, batch) -> dict`` of
column name -> value, registered in ``MEASUREMENTS``; ``main`` prints one table row per
preset with the columns of every requested measurement. FLOPs and the activation-memory
estimate are counted on the ``meta`` device (no memory, no arithmetic), so they run in
seconds even for the paper-scale network; measurements that time real work use
``--device``.
"""

from __future__ import annotations

import nucsynth  # noqa: F401  first: the engine sets OpenMP's passive wait before torch loads (a spinning pool collapses on a busy CPU)

import argparse
import sys
from typing import Callable

import torch
from torch import nn

from nucsynth.nets import PRESETS, SpadeUNet, count_flops, count_params, unet_preset
from nucsynth.nets.unet import UNetConfig

IN_CHANNELS, OUT_CHANNELS, COND_CHANNELS = 3, 6, 6


def semantic_config(preset: str, size: int) -> UNetConfig:
    """The semantic-model U-Net configuration of ``preset`` at ``size`` px."""
    return unet_preset(preset, size, IN_CHANNELS, OUT_CHANNELS, COND_CHANNELS)


def build(preset: str, size: int, device: str | torch.device) -> SpadeUNet:
    """The semantic U-Net on ``device`` (``"meta"`` allocates nothing)."""
    with torch.device(device):
        return SpadeUNet(semantic_config(preset, size))


def inputs(size: int, batch: int, device: str | torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, t, cond) of the right shapes on ``device``."""
    g = None if str(device) == "meta" else torch.Generator(device).manual_seed(0)
    x = torch.randn(batch, IN_CHANNELS, size, size, device=device, generator=g)
    t = torch.full((batch,), 500, device=device, dtype=torch.long)
    cond = torch.randn(batch, COND_CHANNELS, size, size, device=device, generator=g)
    return x, t, cond


def measure_flops(preset: str, size: int, device: str, batch: int) -> dict[str, str]:
    """Parameters and FLOPs of one forward pass of ONE sample (meta device)."""
    net = build(preset, size, "meta")
    flops = count_flops(net, *inputs(size, 1, "meta"))
    return {"params (M)": f"{count_params(net) / 1e6:.2f}", "GFLOP / forward": f"{flops / 1e9:.1f}"}


def _activation_bytes(net: nn.Module, args: tuple[torch.Tensor, ...]) -> int:
    """Bytes of the distinct tensors autograd saves for backward (parameters excluded)."""
    params = {id(p) for p in net.parameters()}
    sizes: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        # A tensor saved by several ops (e.g. by an activation and the next conv) counts once.
        if id(t) not in params:
            sizes[id(t)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = net(*args)  # keeps the graph, hence the saved tensors and their ids, alive
    del out
    return sum(sizes.values())


def measure_memory(preset: str, size: int, device: str, batch: int) -> dict[str, str]:
    """Estimated training memory (meta device): fp32 weights + grads + AdamW moments, plus
    the activations autograd saves for a batch of ``batch`` in fp32 (bf16 autocast roughly
    halves them). An estimate, not a measured peak: allocator overhead and workspace are
    not included."""
    net = build(preset, size, "meta")
    act = _activation_bytes(net, inputs(size, batch, "meta"))
    states = 4 * 4 * count_params(net)  # weights, grads, exp_avg, exp_avg_sq in fp32
    return {
        f"activations b{batch} (GB)": f"{act / 2**30:.1f}",
        f"train est. b{batch} (GB)": f"{(act + states) / 2**30:.1f}",
    }


MEASUREMENTS: dict[str, Callable[[str, int, str, int], dict[str, str]]] = {
    "flops": measure_flops,
    "memory": measure_memory,
}


def resolve_device(name: str) -> str:
    """``auto`` -> cuda when available, else cpu; explicit names are checked."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine")
    return name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default=",".join(PRESETS), help="comma-separated presets (default: all)")
    parser.add_argument("--size", type=int, default=256, help="image size in px (default 256)")
    parser.add_argument("--batch", type=int, default=8, help="batch size for per-batch figures (default 8)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument("--measure", default="flops,memory", help=f"comma-separated, from {list(MEASUREMENTS)}")
    args = parser.parse_args(argv)
    presets = [p for p in args.presets.split(",") if p]
    measures = [m for m in args.measure.split(",") if m]
    for name in measures:
        if name not in MEASUREMENTS:
            parser.error(f"unknown measurement {name!r}; choose from {list(MEASUREMENTS)}")
    device = resolve_device(args.device)
    print(f"semantic U-Net, {args.size} px, in {IN_CHANNELS} / out {OUT_CHANNELS} / cond {COND_CHANNELS}, "
          f"device {device}, torch {torch.__version__}")
    rows = {p: {"preset": p} for p in presets}
    for p in presets:
        for name in measures:
            rows[p].update(MEASUREMENTS[name](p, args.size, device, args.batch))
    cols = list(dict.fromkeys(k for r in rows.values() for k in r))
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("---" for _ in cols) + "|")
    for r in rows.values():
        print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    if "flops" in measures and "base" in rows and "paper" in rows:
        ratio = float(rows["base"]["GFLOP / forward"]) / float(rows["paper"]["GFLOP / forward"])
        print(f"base / paper FLOPs per forward pass: {ratio:.3f} (target <= 0.1)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
