"""Speed of the semantic model: sampling throughput, preview latency, train step time, peak memory.

Usage::

    python benchmarks/bench_sampling.py                                  # tiny at 64 px, best device
    python benchmarks/bench_sampling.py --presets base --size 256 --device cuda --batch 32
    python benchmarks/bench_sampling.py --bf16                           # bf16 autocast (CUDA)

Networks are freshly initialized (speed does not depend on the weights). Sampling uses the
engine's real path (``SemanticModel.sample``: DPM-Solver++(2M), classifier-free guidance in
one batched pass, learned variance) on random layouts from the layout generator:

- throughput: ``--batch`` patches per call, ``--steps`` solver steps, patches per second;
- preview latency: one patch, same steps, seconds;
- train step: one AdamW step of the hybrid loss on a batch of ``--train-batch``, seconds;
- peak memory: CUDA ``max_memory_allocated`` of the train step; on CPU the process's peak
  resident set size (includes everything the process loaded, so an upper bound).

FLOPs per forward pass for every preset are printed by ``bench_models.py``.
"""

from __future__ import annotations

import nucsynth  # noqa: F401  first: the engine sets OpenMP's passive wait before torch loads (a spinning pool collapses on a busy CPU)

import argparse
import contextlib
import resource
import sys
import time

import numpy as np
import torch

from nucsynth.device import describe_device, pick_device
from nucsynth.generate.layouts import random_layout
from nucsynth.models.semantic import SemanticModel


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, bf16: bool):
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def build(preset: str, size: int, device: torch.device) -> SemanticModel:
    """A fresh semantic model of ``preset`` with its network on ``device``."""
    torch.manual_seed(0)
    model = SemanticModel.from_preset(preset, image_size=size)
    model.net = model.build_network().to(device).eval()
    return model


def time_sampling(model: SemanticModel, size: int, batch: int, steps: int, guidance: float,
                  device: torch.device, bf16: bool, repeats: int) -> float:
    """Median seconds of one ``sample`` call on ``batch`` layouts."""
    layouts = [random_layout((size, size), model.class_set, seed=i) for i in range(batch)]
    times = []
    with _autocast(device, bf16):
        model.sample(layouts, steps=2, guidance=guidance, seed=0)  # warm-up (kernels, allocator)
        for r in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            model.sample(layouts, steps=steps, guidance=guidance, seed=r)
            _sync(device)
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def time_train_step(model: SemanticModel, size: int, batch: int, device: torch.device, bf16: bool,
                    repeats: int) -> tuple[float, float]:
    """(median seconds of one optimizer step, peak memory in GB)."""
    net = model.net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    g = torch.Generator(device).manual_seed(0)
    k = model.class_set.num_classes
    labels = torch.randint(0, k + 1, (batch, size, size), generator=g, device=device)
    data = {
        "image": torch.rand(batch, 3, size, size, generator=g, device=device) * 2 - 1,
        "onehot": torch.nn.functional.one_hot(labels, k + 1).permute(0, 3, 1, 2).float(),
        "edge": (torch.rand(batch, 1, size, size, generator=g, device=device) > 0.9).float(),
    }
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats + 1):  # the first step is warm-up
        _sync(device)
        t0 = time.perf_counter()
        with _autocast(device, bf16):
            loss, _ = model.training_loss(net, data, g, cond_drop=0.2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    net.eval()
    return float(np.median(times[1:])), peak


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="tiny", help="comma-separated presets (default: tiny)")
    p.add_argument("--size", type=int, default=64, help="patch size in px (default 64)")
    p.add_argument("--batch", type=int, default=8, help="patches per sampling call (default 8)")
    p.add_argument("--train-batch", type=int, default=4, help="batch of the train step (default 4)")
    p.add_argument("--steps", type=int, default=20, help="solver steps (default 20)")
    p.add_argument("--guidance", type=float, default=0.5, help="guidance scale (default 0.5: two passes)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats, median reported (default 3)")
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default: best available)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA only)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    print(f"semantic model, {args.size} px, {args.steps} DPM-Solver++ steps, guidance {args.guidance}, "
          f"device {describe_device(device)}, torch {torch.__version__}, bf16 {args.bf16 and device.type == 'cuda'}")
    print(f"| preset | patches/s (batch {args.batch}) | preview 1 patch (s) | train step b{args.train_batch} (s) | peak memory (GB) |")
    print("|---|---|---|---|---|")
    for preset in [s for s in args.presets.split(",") if s]:
        model = build(preset, args.size, device)
        batch_s = time_sampling(model, args.size, args.batch, args.steps, args.guidance, device, args.bf16, args.repeats)
        preview_s = time_sampling(model, args.size, 1, args.steps, args.guidance, device, args.bf16, args.repeats)
        step_s, peak = time_train_step(model, args.size, args.train_batch, device, args.bf16, args.repeats)
        print(f"| {preset} | {args.batch / batch_s:.2f} | {preview_s:.2f} | {step_s:.3f} | {peak:.2f} |", flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
