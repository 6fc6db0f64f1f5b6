"""Where users wait: kept SPADE features, the thread policy, memory format, cost per pixel.

Usage::

    python benchmarks/bench_speed.py render  [--presets base,shipped] [--size 256] [--steps 20] [--repeats 2]
    python benchmarks/bench_speed.py threads [--busy 2] [--repeats 5] [--sizes 256,64] [--no-training]
    python benchmarks/bench_speed.py scaling [--sizes 256,512,1024] [--steps 2]
    python benchmarks/bench_speed.py cputime [--size 256] [--steps 20] [--repeats 3]

Every comparison is measured interleaved in one run (A, B, B, A, ...), medians reported,
with the load average printed, because the development machine is shared.

- ``render``: a guided (scale 0.5) DPM-Solver++ render of one layout through
  ``SemanticModel.sample_tensor``, new (SPADE gamma/beta kept per render) against old
  (the same path with the cache replaced by a pass-through, i.e. gamma/beta recomputed at
  every network call): wall-time ratio new/old and whether the outputs are bit-identical.
  ``base`` is a fresh network (weights drawn at random, so that every block matters);
  ``shipped`` is the default checkpoint.
- ``threads``: with ``--busy`` background processes spinning on the CPU, shipped-model
  renders through the synthesis engine (2 steps at ``--guidance``, at each of ``--sizes``: 256 px is
  the patch the designer and the batch dock render, 64 px a quick preview, which the engine
  runs on one thread) and segmenter training steps (through ``train_segmenter``: the
  ``tiny`` preset, and the default ``cpu`` preset in micro-batches as it trains now and in
  one pass per batch as before) and ``nucsynth train``'s loop (the ``tiny`` semantic model,
  in micro-batches and in one pass) with the engine's thread policy against one thread:
  ratio policy / one thread, and each training now against before on one thread.
- ``scaling``: shipped model, wall time per solver step at each canvas size (canvases
  larger than the training size go through the windowed sampler); the exponent p of
  time ~ pixels^p fitted over the sizes.
- ``cputime``: a 256 px render of the shipped model in fresh processes: "old" = torch's
  own thread pool and wait policy (torch loaded before the engine), NCHW, no kept features;
  "new" = the engine's choices. CPU-time ratio new/old and the largest output difference.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nucsynth  # noqa: F401  (first: the engine sets OpenMP's wait policy before torch loads)
import numpy as np

# ---------------------------------------------------------------------- helpers


def _load() -> str:
    a, b, c = os.getloadavg()
    return f"load average {a:.1f} {b:.1f} {c:.1f} on {os.cpu_count()} CPUs"


class _PassThrough:
    """Stands in for ConditionCache: hands the condition tensor on, nothing kept."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __call__(self, cond):
        return cond


@contextlib.contextmanager
def _old_path(memory_format: bool = False):
    """The engine as before: SPADE recomputed at every call (and NCHW with ``memory_format``)."""
    import torch

    import nucsynth.nets.blocks as blocks
    import nucsynth.nets.unet as unet

    saved = blocks.ConditionCache, unet.inference_memory_format
    blocks.ConditionCache = _PassThrough
    if memory_format:
        unet.inference_memory_format = lambda device: torch.contiguous_format
    try:
        yield
    finally:
        blocks.ConditionCache, unet.inference_memory_format = saved


def _model(name: str, size: int):
    import torch

    from nucsynth.checkpoint import load_checkpoint, resolve_checkpoint
    from nucsynth.models.semantic import SemanticModel

    if name == "shipped":
        model, _ = load_checkpoint(resolve_checkpoint(None))
        return model
    torch.manual_seed(0)
    model = SemanticModel.from_preset(name, image_size=size)
    net = model.build_network().eval()
    with torch.no_grad():  # fresh output layers are zero: draw them so every block matters
        for p in net.parameters():
            if p.ndim > 1:
                p.normal_(0, 0.5 / max(1.0, float(np.sqrt(p[0].numel()))))
    model.net = net
    return model


def _cond(model, size: int, batch: int = 1):
    from nucsynth.generate.layouts import random_layout

    lays = [random_layout((size, size), model.class_set, seed=i) for i in range(batch)]
    return model.condition(lays)


# ---------------------------------------------------------------------- render


def bench_render(args) -> None:
    import torch

    from nucsynth.threads import set_threads

    n = set_threads(args.threads)
    print(f"render: {args.steps} guided DPM-Solver++ steps (scale 0.5), {args.size} px, batch 1, {n} threads; {_load()}")
    print("| model | old s | new s | new / old | bit-identical |")
    print("|---|---|---|---|---|")
    for name in [p for p in args.presets.split(",") if p]:
        model = _model(name, args.size)
        cond = _cond(model, args.size)

        def render():
            return model.sample_tensor(model.net, cond, args.steps, 0.5, 0, "dpm++2m")

        with _old_path():
            render_old = model.sample_tensor(model.net, cond, 1, 0.5, 0, "dpm++2m")  # warm-up
        times = {"old": [], "new": []}
        outs = {}
        for r in range(args.repeats):
            for which in (("old", "new") if r % 2 == 0 else ("new", "old")):
                ctx = _old_path() if which == "old" else contextlib.nullcontext()
                with ctx:
                    t0 = time.perf_counter()
                    outs[which] = render()
                    times[which].append(time.perf_counter() - t0)
        del render_old
        old, new = float(np.median(times["old"])), float(np.median(times["new"]))
        same = torch.equal(outs["old"], outs["new"])
        print(f"| {name} | {old:.1f} | {new:.1f} | {new / old:.3f} | {same} |", flush=True)
    print(f"at the end: {_load()}")


# ---------------------------------------------------------------------- threads


def _busy(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def _training(preset: str, class_set, micro_batches: int | None = None, steps: int = 4):
    """Segmenter training with ``preset`` through :func:`train_segmenter` (the path users run:
    batch drawing, augmentation, the step) on procedural 128 px samples: a callable that
    trains ``steps`` steps and returns the median time of a step after the first."""
    from nucsynth.evaluate.segmenter import segmenter_preset, train_segmenter
    from nucsynth.generate.tissue import procedural_sample

    cfg = segmenter_preset(preset, class_set.num_classes, steps=steps, micro_batches=micro_batches)
    samples = [procedural_sample((128, 128), class_set, seed=s) for s in range(8)]

    def run() -> float:
        stamps: list[float] = []
        train_segmenter(samples, cfg, seed=0, progress=lambda *_: stamps.append(time.perf_counter()))
        return float(np.median(np.diff(stamps)))

    how = "one pass per batch (the former path)" if cfg.micro_batches == 1 else f"{cfg.micro_batches} micro-batches"
    return f"segmenter train step, {preset} preset, batch {cfg.batch_size}, {cfg.crop} px, {how}", run


def _diffusion_training(class_set, micro_batches: int, steps: int = 4):
    """``nucsynth train``'s loop (:func:`nucsynth.train.train`) on the ``tiny`` semantic
    model at 64 px, batch 8, on procedural samples: a callable that trains ``steps`` steps
    into a temporary folder and returns the median time of a step after the first."""
    from nucsynth.data.dataset import SampleDataset
    from nucsynth.generate.tissue import procedural_sample
    from nucsynth.models.semantic import SemanticModel
    from nucsynth.train import TrainConfig, train

    model = SemanticModel.from_preset("tiny", 64, class_set)
    data = SampleDataset([procedural_sample((64, 64), class_set, seed=s) for s in range(16)], maps=model.data_maps,
                         size=64, seed=0)
    cfg = TrainConfig(steps=steps, batch_size=8, checkpoint_every=0, preview_at_end=False, device="cpu",
                      micro_batches=micro_batches)

    def run() -> float:
        stamps: list[float] = []
        with tempfile.TemporaryDirectory() as tmp:
            train(model, data, Path(tmp) / "run", cfg, progress=lambda *_: stamps.append(time.perf_counter()))
        return float(np.median(np.diff(stamps)))

    how = "one pass per batch (the former path)" if micro_batches == 1 else f"{micro_batches} micro-batches"
    return f"diffusion train step (nucsynth train), tiny semantic, 64 px, batch 8, {how}", run


def bench_threads(args) -> None:
    from nucsynth.generate.layouts import random_layout
    from nucsynth.synthesize import Item, SynthesisOptions, get_synthesizer
    from nucsynth.threads import available_cpus, default_threads, set_threads, wait_policy

    synth = get_synthesizer(device="cpu")
    options = synth.resolve(SynthesisOptions(steps=2, guidance=args.guidance))
    kind = "guided" if options.guidance else "unguided"

    def render(size: int):
        items = [Item(0, 0, random_layout((size, size), synth.class_set, seed=0))]
        return (f"sampling: 2 {kind} steps, shipped model, {size} px ({synth.network_positions(items)} positions)",
                lambda: synth.render(items, options))

    policy = default_threads()
    works = [render(size) for size in args.sizes]
    if args.training:
        # tiny: the step of earlier runs; cpu: the default (the downstream yardstick), as the
        # presets train now and in one pass per batch as they did before
        works += [_training("tiny", synth.class_set), _training("cpu", synth.class_set), _training("cpu", synth.class_set, 1),
                  _diffusion_training(synth.class_set, 2), _diffusion_training(synth.class_set, 1)]
    busy = _busy(args.busy)
    medians: dict[str, dict[int, float]] = {}
    try:
        time.sleep(1.0)
        print(f"threads: {args.busy} busy background processes; policy {policy} threads ({available_cpus()} "
              f"usable cores, {wait_policy()} wait) vs 1 thread; {_load()}")
        print("| work | policy s | 1 thread s | policy / 1 thread |")
        print("|---|---|---|---|")
        for name, fn in works:
            fn()  # warm-up
            times = {policy: [], 1: []}
            for r in range(args.repeats):
                for n in ((policy, 1) if r % 2 == 0 else (1, policy)):
                    set_threads(n)
                    t0 = time.perf_counter()
                    measured = fn()  # training measures its own steps; a render is timed whole
                    times[n].append(measured if isinstance(measured, float) else time.perf_counter() - t0)
            medians[name] = {n: float(np.median(t)) for n, t in times.items()}
            a, b = medians[name][policy], medians[name][1]
            print(f"| {name} | {a:.3f} | {b:.3f} | {a / b:.3f} |", flush=True)
    finally:
        for p in busy:
            p.kill()
            p.wait()
    if args.training:
        for what, (new, old) in (("segmenter cpu preset", (works[-4][0], works[-3][0])),
                                 ("diffusion training", (works[-2][0], works[-1][0]))):
            print(f"{what}, now on the policy's threads / before on one thread: "
                  f"{medians[new][policy] / medians[old][1]:.3f}; on one thread, now / before: "
                  f"{medians[new][1] / medians[old][1]:.3f}")
    print(f"at the end: {_load()}")


# ---------------------------------------------------------------------- scaling


def bench_scaling(args) -> None:
    from nucsynth.threads import set_threads

    n = set_threads(args.threads)
    model = _model("shipped", 64)
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"scaling: shipped model (trained at {model.image_size} px; larger canvases in windows), "
          f"guided, {args.steps} steps per render, {n} threads; {_load()}")
    print("| size | s per step |")
    print("|---|---|")
    per_step = []
    model.sample_tensor(model.net, _cond(model, sizes[0]), 1, 0.5, 0, "dpm++2m")  # warm-up
    for size in sizes:
        cond = _cond(model, size)
        times = []
        for r in range(args.repeats):
            t0 = time.perf_counter()
            model.sample_tensor(model.net, cond, args.steps, 0.5, r, "dpm++2m")
            times.append((time.perf_counter() - t0) / args.steps)
        per_step.append(float(np.median(times)))
        print(f"| {size} | {per_step[-1]:.3f} |", flush=True)
    p = np.polyfit(np.log(np.square(sizes)), np.log(per_step), 1)[0]
    print(f"time per step ~ pixels^{p:.3f} over {sizes[0]}-{sizes[-1]} px; {_load()}")


# ---------------------------------------------------------------------- cputime

_CHILD = r"""
import json, os, resource, sys, time
old = sys.argv[1] == "old"
if old:
    import torch  # before the engine: torch's own wait policy and thread count
import numpy as np
import nucsynth
import torch
sys.path.insert(0, os.path.dirname(sys.argv[4]))
from bench_speed import _cond, _model, _old_path
from nucsynth.threads import set_threads
size, steps = int(sys.argv[2]), int(sys.argv[3])
if not old:
    set_threads(None)
model = _model("shipped", 64)
cond = _cond(model, size)
ctx = _old_path(memory_format=True) if old else __import__("contextlib").nullcontext()
with ctx:
    model.sample_tensor(model.net, cond, 1, 0.5, 0, "dpm++2m")  # warm-up
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    out = model.sample_tensor(model.net, cond, steps, 0.5, 0, "dpm++2m")
    r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
np.save(sys.argv[5], out.numpy())
from nucsynth.threads import wait_policy
print(json.dumps({"cpu": r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime, "wall": t1 - t0,
                  "threads": torch.get_num_threads(), "wait": wait_policy()}))
"""


def bench_cputime(args) -> None:
    here = str(Path(__file__).resolve())
    print(f"cputime: shipped model, {args.size} px, {args.steps} guided steps, fresh process per render; {_load()}")
    results = {"old": [], "new": []}
    outs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for which in (("old", "new") if r % 2 == 0 else ("new", "old")):
                env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
                path = os.path.join(tmp, f"{which}.npy")
                done = subprocess.run([sys.executable, "-c", _CHILD, which, str(args.size), str(args.steps), here, path],
                                      env=env, capture_output=True, text=True, check=True)
                results[which].append(json.loads(done.stdout.strip().splitlines()[-1]))
                outs[which] = np.load(path)
    print("| engine | threads | OpenMP wait | CPU s | wall s |")
    print("|---|---|---|---|---|")
    med = {}
    for which in ("old", "new"):
        rs = results[which]
        med[which] = (float(np.median([x["cpu"] for x in rs])), float(np.median([x["wall"] for x in rs])))
        print(f"| {which} | {rs[0]['threads']} | {rs[0]['wait']} | {med[which][0]:.1f} | {med[which][1]:.1f} |")
    diff = float(np.abs(outs["old"] - outs["new"]).max())
    print(f"CPU time new / old {med['new'][0] / med['old'][0]:.3f}; wall new / old {med['new'][1] / med['old'][1]:.3f}; "
          f"largest output difference {diff:.2e} (data range [-1, 1]); {_load()}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    r = sub.add_parser("render")
    r.add_argument("--presets", default="base,shipped")
    r.add_argument("--size", type=int, default=256)
    r.add_argument("--steps", type=int, default=20)
    r.add_argument("--repeats", type=int, default=2)
    r.add_argument("--threads", type=int, default=None, help="default: the engine's policy")
    t = sub.add_parser("threads")
    t.add_argument("--busy", type=int, default=2, help="background processes spinning (default 2)")
    t.add_argument("--repeats", type=int, default=5)
    t.add_argument("--sizes", type=lambda v: [int(x) for x in v.split(",") if x], default=[256, 64],
                   help="sampling canvas sizes in px (default 256,64; empty: none)")
    t.add_argument("--no-training", dest="training", action="store_false", help="sampling only")
    t.add_argument("--guidance", type=float, default=0.5,
                   help="sampling guidance (default 0.5, as earlier runs; the shipped model renders at 0)")
    s = sub.add_parser("scaling")
    s.add_argument("--sizes", default="256,512,1024")
    s.add_argument("--steps", type=int, default=2)
    s.add_argument("--repeats", type=int, default=1)
    s.add_argument("--threads", type=int, default=None)
    c = sub.add_parser("cputime")
    c.add_argument("--size", type=int, default=256)
    c.add_argument("--steps", type=int, default=20)
    c.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    {"render": bench_render, "threads": bench_threads, "scaling": bench_scaling, "cputime": bench_cputime}[args.what](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
