"""The GPU campaign: one command that, on one H100/H200-class GPU, in 9 minutes (``--budget``),

1. checks CUDA correctness: every family's sampler (semantic in pixel space, semantic in
   latent space with its autoencoder, semantic conditioned on structures (NuDiff stage 2),
   structure, joint) run on the GPU in fp32 and in bf16 against the CPU result of the same
   seed and weights, with the tolerances of ``TOLERANCES``; one network pass of each speed
   configuration too; which SDPA attention kernel ran; peak memory;
2. measures the semantic family at 256 px (pixel ``base``, latent ``base`` and the trained
   latent pair), 20 DPM-Solver++ steps with guidance: patches/s at the best batch size,
   single-patch preview latency, peak memory, FLOPs per patch (torch.utils.flop_counter) and
   the achieved fraction of bf16 peak (the data-sheet peak and a bf16 matmul measured in the
   same run), and training images/s of the training loop;
3. trains for the remaining minutes, on the CoNSeP TRAINING tiles of the data pack: the
   autoencoder, the latent semantic model on it, and the segmenter, exporting float16
   checkpoints at intervals so that a run cut off still returns a model;
4. writes ONE output folder: ``figures.json`` (rewritten after every section),
   ``campaign.log``, ``previews.png`` and the exported checkpoints as ``*.tar`` files of at
   most 16 MB each (64 MB in all): unpack them all with ``for t in *.tar; do tar -xf "$t"; done``.

Commands (docs/benchmarks.md, "GPU campaign")::

    # here, once: pack the CoNSeP training tiles (never the val tiles) into gpu_pack/
    .venv/bin/python benchmarks/gpu_campaign.py --pack
    # on the GPU machine, from the repository root (the working tree + gpu_pack/)
    python3 benchmarks/gpu_campaign.py --out OUT/campaign
    # the rehearsal on CPU with tiny sizes (the test suite runs it)
    .venv/bin/python benchmarks/gpu_campaign.py --dry-run --out /tmp/campaign

A GPU machine has torch, numpy, scipy, scikit-image, OpenCV, Pillow and safetensors but no
zarr, dask, napari or open_clip: the campaign refuses to import those four even where they
are installed, so the dry run here proves that it needs none of them. The engine is taken
from ``engine/`` of this checkout when ``nucsynth`` is not installed.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import importlib.abc
import io
import json
import os
import platform
import shutil
import sys
import tarfile
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PACK = ROOT / "gpu_pack" / "consep_train.npz"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "consep256" / "Train"
PACK_FORMAT = "nucsynth-gpu-pack"
PACK_VERSION = 1
ABSENT_THERE = ("zarr", "dask", "napari", "open_clip")  # not on the GPU machine

# Returned-file limits of the GPU machine's output folder (checked before training starts).
MAX_FILE_MB = 16.0
MAX_TOTAL_MB = 64.0
MB = 1024 * 1024

# CUDA vs CPU, same seed, weights and noise (noise drawn on the CPU for both). "pass_rel":
# relative L2 error of one network pass; after the whole sampler: uint8 images (mean and
# 99.9th percentile of |difference| and the mean signed difference, in grey levels), float
# outputs (structures, distance maps: mean and max |difference|), labels (share of equal
# pixels). fp32 runs with TF32 off and must agree almost exactly. bf16 (the engine's CUDA
# path, autocast) rounds to 2^-8 relative and the sampler compounds that over its steps, so
# single pixels may move far: its bounds are on the means and on a systematic shift.
TOLERANCES: dict[str, dict[str, float]] = {
    "fp32": {"pass_rel": 1e-4, "image_mean": 0.05, "image_p999": 2.0, "field_max": 1e-3, "labels_equal": 0.999},
    "bf16": {"pass_rel": 3e-2, "image_mean": 3.0, "image_bias": 1.0, "field_mean": 0.05, "labels_equal": 0.95},
}

# Dense bf16 tensor-core peaks from NVIDIA's data sheets (TFLOP/s, SXM parts).
BF16_PEAK_TFLOPS = {"H200": 989.4, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0, "L40S": 362.0,
                    "L4": 121.0, "A10": 125.0, "B200": 2250.0, "GH200": 989.4}


class _Refuse(importlib.abc.MetaPathFinder):
    """Import hook refusing the packages the GPU machine lacks (so a dry run here proves
    that the campaign does without them)."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> None:
        if name.split(".")[0] in ABSENT_THERE:
            raise ModuleNotFoundError(f"the GPU campaign must not import {name!r} (absent on the GPU machine)", name=name)
        return None


def _engine_on_path() -> None:
    try:
        import nucsynth  # noqa: F401
    except ModuleNotFoundError:
        sys.path.insert(0, str(ROOT / "engine"))


# ============================================================================ the data pack
def write_pack(samples: Sequence[Any], path: Path, meta: dict[str, Any], encoded: Sequence[bytes] | None = None) -> Path:
    """Write Samples as one compressed ``.npz`` (no pickle): the image files' bytes
    (``encoded``, e.g. the original JPEGs, else PNG), instance maps (uint16), classes,
    centroids (y, x), tile names, the class set and ``meta`` as JSON. Atomic."""
    import numpy as np

    from PIL import Image

    if not samples:
        raise ValueError("write_pack: no samples to pack")
    if encoded is None:
        encoded = []
        for s in samples:
            buf = io.BytesIO()
            Image.fromarray(s.image).save(buf, format="PNG")
            encoded.append(buf.getvalue())
    if len(encoded) != len(samples):
        raise ValueError(f"write_pack: {len(encoded)} encoded images for {len(samples)} samples")
    inst = np.stack([s.layout.inst_map for s in samples])
    if inst.max() > np.iinfo(np.uint16).max:
        raise ValueError("write_pack: more than 65535 nuclei in one patch")
    counts = np.array([len(s.layout.classes) for s in samples], np.int64)
    arrays = {
        "format": np.array(json.dumps({"format": PACK_FORMAT, "version": PACK_VERSION, **meta})),
        "class_set": np.array(json.dumps(samples[0].layout.class_set.to_dict())),
        "image_bytes": np.frombuffer(b"".join(encoded), np.uint8),
        "image_offsets": np.cumsum([0] + [len(e) for e in encoded]).astype(np.int64),
        "inst_map": inst.astype(np.uint16),
        "classes": np.concatenate([s.layout.classes for s in samples]).astype(np.int16),
        "centroids": np.concatenate([s.layout.centroids for s in samples]).astype(np.float64).reshape(-1, 2),
        "counts": counts,
        "tiles": np.array([str(s.provenance.get("tile", "")) for s in samples]),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)
    return path


def read_pack(path: Path) -> tuple[list[Any], dict[str, Any]]:
    """Samples and meta of a pack written by :func:`write_pack`; one-line errors for a
    missing file or another format."""
    import numpy as np
    from PIL import Image

    from nucsynth.layout import ClassSet, Layout, Sample

    if not path.is_file():
        raise FileNotFoundError(f"data pack {path} not found: build it with "
                                "'benchmarks/gpu_campaign.py --pack' where ../shared/data is present")
    with np.load(path, allow_pickle=False) as z:
        try:
            meta = json.loads(str(z["format"]))
        except KeyError:
            raise ValueError(f"{path} is not a GPU data pack (no 'format' entry)") from None
        if meta.get("format") != PACK_FORMAT or meta.get("version") != PACK_VERSION:
            raise ValueError(f"{path} is {meta.get('format')!r} v{meta.get('version')}, expected {PACK_FORMAT} v{PACK_VERSION}")
        cs = ClassSet.from_dict(json.loads(str(z["class_set"])))
        raw, offs = z["image_bytes"].tobytes(), z["image_offsets"]
        inst, classes, cen, counts, tiles = z["inst_map"], z["classes"], z["centroids"], z["counts"], z["tiles"]
    starts = np.concatenate([[0], np.cumsum(counts)])
    samples = []
    for i in range(len(counts)):
        image = np.asarray(Image.open(io.BytesIO(raw[offs[i]:offs[i + 1]])).convert("RGB"))
        a, b = starts[i], starts[i + 1]
        lay = Layout(inst[i].astype(np.int32), classes[a:b].astype(np.int64), cen[a:b], cs)
        samples.append(Sample(lay, image, {"source": f"{path.name}#{i}", "tile": str(tiles[i]), "pack": meta.get("source")}))
    return samples, meta


def build_pack(data: Path, out: Path, val_fraction: float = 0.2, seed: int = 0) -> dict[str, Any]:
    """Pack the TRAINING tiles of a CoNSeP folder (split by tile exactly as ``nucsynth
    prepare --val-fraction F --seed S`` splits it; the val tiles are left out) with the
    original image files' bytes. Returns the pack's meta."""
    import numpy as np
    from PIL import Image

    from nucsynth.commands.prepare import group_of, split_groups
    from nucsynth.io.consep import read_consep

    if not data.is_dir():
        raise FileNotFoundError(f"--data {data}: no such folder (the CoNSeP training folder, Images/ + Labels/)")
    samples = read_consep(data)
    split = split_groups([group_of(s.provenance) for s in samples], val_fraction, seed)
    train = [s for s in samples if split[group_of(s.provenance)] == "train"]
    encoded = []
    for s in train:
        blob = Path(s.provenance["source"]).read_bytes()
        if not np.array_equal(np.asarray(Image.open(io.BytesIO(blob)).convert("RGB")), s.image):
            raise ValueError(f"{s.provenance['source']}: decoding its bytes does not give the image the reader gave")
        encoded.append(blob)
    meta = {"source": str(data), "split": "train", "val_fraction": val_fraction, "seed": seed,
            "train_tiles": sorted(g for g, v in split.items() if v == "train"),
            "val_tiles_left_out": sorted(g for g, v in split.items() if v == "val"), "patches": len(train)}
    write_pack(train, out, meta, encoded)
    return meta


# ============================================================================ plan and output
@dataclass(frozen=True)
class Plan:
    """Sizes of one campaign (the GPU one, or the dry run's tiny rehearsal on CPU)."""

    size: int = 256  # speed and training patch size (px)
    check_size: int = 64  # canvas of the sampler checks
    check_steps: int = 20
    check_count: int = 2  # layouts per sampler check
    speed_steps: int = 20
    guidance: float = 0.5  # engine convention; SDM's s = 1.5
    speed_batches: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128)
    speed_seconds: float = 35.0  # per configuration, batch search included
    speed_presets: tuple[tuple[str, str], ...] = (("pixel", "base"), ("latent", "base"))
    latency_repeats: int = 5
    preview_steps: int = 20
    train_probe_steps: int = 12  # timed steps of the loop's speed and of the rate probe
    train_batches: dict[str, int] = dataclasses.field(default_factory=lambda: {
        "autoencoder": 32, "semantic": 64, "pixel": 16, "segmenter": 16})
    train_share: dict[str, float] = dataclasses.field(default_factory=lambda: {
        "autoencoder": 0.3, "semantic": 0.55, "segmenter": 0.15})
    max_train_steps: int = 10**9
    export_seconds: float = 60.0  # export at least this often while training
    reserve_seconds: float = 25.0  # kept for the previews and the last export
    workers: int = 6
    max_patches: int = 0  # patches of the pack used (0 = all)


def dry_plan() -> Plan:
    """The rehearsal: tiny presets, 64 px, a few steps (CPU, well under a minute)."""
    return Plan(size=32, check_size=32, check_steps=2, check_count=2, speed_steps=2, speed_batches=(1, 2),
                speed_seconds=10.0, speed_presets=(("pixel", "tiny"), ("latent", "tiny")), latency_repeats=1,
                train_probe_steps=2, train_batches={"autoencoder": 2, "semantic": 2, "pixel": 2, "segmenter": 2},
                max_train_steps=3, export_seconds=0.0, reserve_seconds=5.0, workers=0,
                preview_steps=2, max_patches=4)


class Campaign:
    """The output folder: figures (rewritten after each section), a log, returned files."""

    def __init__(self, out: Path, args: argparse.Namespace, budget: float) -> None:
        self.out, self.args, self.t0, self.budget = out, args, time.perf_counter(), budget
        self.figures: dict[str, Any] = {"campaign": {"command": sys.argv, "dry_run": bool(args.dry_run),
                                                     "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                                     "budget_s": budget}, "errors": []}
        self.log_fh = open(out / "campaign.log", "a", encoding="utf-8")

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.budget - self.elapsed()

    def log(self, msg: str) -> None:
        line = f"[{self.elapsed():7.1f}s] {msg}"
        print(line, flush=True)
        self.log_fh.write(line + "\n")
        self.log_fh.flush()

    def save(self) -> None:
        self.figures["campaign"]["elapsed_s"] = round(self.elapsed(), 2)
        self.figures["outputs"] = {p.name: p.stat().st_size for p in sorted(self.out.iterdir()) if p.is_file()
                                   and not p.name.startswith(".")}
        tmp = self.out / ".figures.json.tmp"
        tmp.write_text(json.dumps(self.figures, indent=1, sort_keys=True, default=str))
        os.replace(tmp, self.out / "figures.json")

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[dict[str, Any]]:
        """A section's figures; an exception is logged with its traceback and recorded, and
        the campaign goes on with the next section."""
        fig: dict[str, Any] = {}
        self.figures[name] = fig
        t = time.perf_counter()
        self.log(f"== {name}")
        try:
            yield fig
        except Exception as e:  # noqa: BLE001  (one section's failure must not cost the others)
            self.figures["errors"].append(f"{name}: {type(e).__name__}: {e}")
            self.log(f"{name} FAILED: {type(e).__name__}: {e}\n{traceback.format_exc()}")
        finally:
            fig["seconds"] = round(time.perf_counter() - t, 2)
            self.save()


def _tar_parts(folder: Path, out: Path, stem: str, max_bytes: int) -> list[Path]:
    """``folder`` as ``<stem>.tar`` (or ``<stem>-1.tar``, ``-2``... when one would pass
    ``max_bytes``), members named ``<stem>/...``; each written atomically, old parts removed."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    max_bytes = max_bytes or 1 << 62  # 0: no limit
    parts: list[list[Path]] = [[]]
    size = 0
    for f in files:
        n = f.stat().st_size + 1024
        if n > max_bytes:
            raise ValueError(f"{f} is {n / MB:.1f} MB, over the {max_bytes / MB:.0f} MB per returned file")
        if size + n > max_bytes and parts[-1]:
            parts.append([])
            size = 0
        parts[-1].append(f)
        size += n
    written = []
    for i, group in enumerate(parts):
        name = f"{stem}.tar" if len(parts) == 1 else f"{stem}-{i + 1}.tar"
        tmp = out / f".{name}.tmp"
        with tarfile.open(tmp, "w") as tar:
            for f in group:
                tar.add(f, arcname=f"{stem}/{f.relative_to(folder)}")
        os.replace(tmp, out / name)
        written.append(out / name)
    for old in set(out.glob(f"{stem}.tar")) | set(out.glob(f"{stem}-*.tar")):
        if old not in written:  # parts of an earlier export that this one does not replace
            old.unlink()
    return written


# ============================================================================ helpers
def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mb(device: Any) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated(device) / MB, 1) if device.type == "cuda" else None


class _Precision:
    """Run a network under one precision whatever the engine's sampler asks: ``fp32``
    switches autocast off inside the network (TF32 is switched off by the caller), ``bf16``
    switches bf16 autocast on (on CUDA that is the engine's own path)."""

    def __new__(cls, net: Any, precision: str) -> Any:
        import torch

        class Wrapped(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.module = net  # 'module': the engine unwraps it where it needs the bare net (joint text)

            def forward(self, *a: Any, **kw: Any) -> Any:
                dev = next(self.module.parameters()).device.type
                with torch.autocast(dev, dtype=torch.bfloat16, enabled=precision == "bf16"):
                    return self.module(*a, **kw)

        return Wrapped()


@contextlib.contextmanager
def _cpu_noise() -> Iterator[list[int]]:
    """Draw every sampler's noise with CPU generators (moved to the device), so a CUDA run
    starts from the CPU run's noise: the engine's generators live on the sampling device,
    whose random streams differ from the CPU's. Yields a call counter: a check whose noise
    did not come through here is refused (its comparison would be meaningless)."""
    import torch

    from nucsynth.diffusion import noise

    calls = [0]
    original = noise.generators

    def cpu_generators(seeds: Sequence[int], device: Any) -> list[torch.Generator]:
        calls[0] += 1
        return original(seeds, "cpu")

    noise.generators = cpu_generators
    try:
        yield calls
    finally:
        noise.generators = original


@contextlib.contextmanager
def _no_tf32() -> Iterator[None]:
    import torch

    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _excite(net: Any, seed: int, std: float = 0.05) -> Any:
    """Give the zero-initialized layers (output convs) seeded random weights: a fresh network
    predicts zeros, and comparing zeros would prove nothing."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim >= 2 and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return net


def _sdpa_kernels(fn: Callable[[], Any]) -> list[str]:
    """Names of the scaled-dot-product-attention kernels that ``fn`` ran (profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sorted({e.name for e in prof.events() if "scaled_dot_product" in e.name and e.name != "aten::scaled_dot_product_attention"})


def _layouts(samples: Sequence[Any], size: int, count: int) -> list[Any]:
    """``count`` layouts cropped to ``size`` px from the top-left of the pack's patches."""
    from nucsynth.layout import Layout, relabel_contiguous

    out = []
    for s in samples[:count]:
        inst, ids = relabel_contiguous(s.layout.inst_map[:size, :size])
        classes = [int(s.layout.classes[i - 1]) for i in ids]
        out.append(Layout.from_inst_map(inst, classes, s.layout.class_set))
    return out


def _rel(a: Any, b: Any) -> float:
    """Relative L2 error of tensor ``a`` against the reference ``b``."""
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


# ============================================================================ 1. correctness
def _families(work: Path, cs: Any, size: int) -> dict[str, Any]:
    """Fresh (seeded, excited) tiny models of every family, the latent one with a saved
    label-aware autoencoder."""
    import torch

    from nucsynth.checkpoint import save_checkpoint
    from nucsynth.models.autoencoder import AutoencoderModel
    from nucsynth.models.joint import JointModel
    from nucsynth.models.semantic import SemanticModel
    from nucsynth.models.structure import StructureModel

    def made(model: Any, seed: int) -> Any:
        torch.manual_seed(seed)
        model.net = _excite(model.build_network(), seed).eval()
        return model

    ae = made(AutoencoderModel.from_preset("tiny", size, cs, label_aware=True), 1)
    ae_dir = save_checkpoint(work / "check_autoencoder", ae, ae.net, raw_weights=False)
    latent = SemanticModel.from_preset("tiny", size, cs, autoencoder=ae_dir)
    latent.config.latent["scale"] = 1.0
    return {
        "semantic": made(SemanticModel.from_preset("tiny", size, cs), 2),
        "semantic-latent": made(latent, 3),
        "semantic-structure": made(SemanticModel.from_preset("tiny", size, cs, condition="structure"), 4),
        "structure": made(StructureModel.from_preset("tiny", size, cs), 5),
        "joint": made(JointModel.from_preset("tiny", size, cs), 6),
    }


def _run_family(name: str, model: Any, layouts: list[Any], plan: Plan) -> dict[str, Any]:
    """The family's public sampler: {"images": uint8, "fields": float arrays, "labels": int}."""
    import numpy as np

    steps, n = plan.check_steps, len(layouts)
    if name.startswith("semantic"):
        return {"images": np.stack([s.image for s in model.sample(layouts, steps=steps, guidance=plan.guidance, seed=7)])}
    if name == "structure":
        return {"fields": model.sample_structures(n, layouts[0].shape, steps=steps, seed=7)}
    maps = model.sample_maps(layouts, steps=steps, guidance=1.0, seed=7)
    return {"images": maps.images, "fields": maps.distance, "labels": maps.labels}


def _one_pass(model: Any, net: Any, device: Any, batch: int, size: int, seed: int) -> Any:
    """One network pass of a semantic model on seeded inputs (at the latent size for a latent model)."""
    import torch

    c = model.config
    f = c.latent_factor
    ch = int(c.latent["channels"]) if model.is_latent else 3
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, ch, size // f, size // f, generator=g)
    cond = (torch.rand(batch, c.cond_channels, size // f, size // f, generator=g) > 0.7).float()
    t = torch.full((batch,), 500.0)
    with torch.no_grad():
        return net(x.to(device), t.to(device), cond.to(device)).float()


def check_correctness(camp: Campaign, fig: dict[str, Any], device: Any, samples: list[Any], plan: Plan,
                      speed_models: dict[str, Any], work: Path) -> None:
    """Section 1 (see the module doc); ``speed_models`` are also checked for one pass."""
    import torch

    fig["tolerances"] = TOLERANCES
    fig["device"] = str(device)
    fig["note"] = ("CPU reference vs device, same seed, weights and noise (CPU generators); fp32 with TF32 off; "
                   "bf16 = bf16 autocast as the engine samples on CUDA")
    cs = samples[0].layout.class_set
    layouts = _layouts(samples, plan.check_size, plan.check_count)
    cases: list[dict[str, Any]] = []
    for name, model in _families(work, cs, plan.check_size).items():
        net_cpu = model.net
        with _cpu_noise() as calls:
            ref = _run_family(name, model, layouts, plan)
            for precision in ("fp32", "bf16"):
                case: dict[str, Any] = {"family": name, "precision": precision, "steps": plan.check_steps,
                                        "size": plan.check_size, "count": len(layouts)}
                net_dev = copy.deepcopy(net_cpu).to(device)
                model.net = _Precision(net_dev, precision)
                _reset_peak(device)
                before = calls[0]
                t = time.perf_counter()
                with _no_tf32() if precision == "fp32" else contextlib.nullcontext():
                    got = _run_family(name, model, layouts, plan)
                case["seconds"] = round(time.perf_counter() - t, 3)
                case["peak_mb"] = _peak_mb(device)
                if calls[0] == before:
                    raise RuntimeError(f"{name}: the sampler drew no noise through nucsynth.diffusion.noise.generators; "
                                       "the CPU/device comparison would compare different noise")
                case.update(_compare(ref, got, TOLERANCES[precision]))
                cases.append(case)
                camp.log(f"{name:19s} {precision}: {'ok' if case['passed'] else 'FAILED'} "
                         + json.dumps({k: v for k, v in case.items() if k in TOLERANCES[precision] and k != 'pass_rel'}))
                model.net = net_cpu
                if name.startswith("semantic-latent") and model._autoencoder is not None:
                    model._autoencoder.net.to("cpu")
    for label, model in speed_models.items():  # one pass at the measured sizes
        net_cpu = model.net.cpu()
        ref = _one_pass(model, net_cpu, torch.device("cpu"), 1, plan.size, 11)
        for precision in ("fp32", "bf16"):
            net_dev = _Precision(copy.deepcopy(net_cpu).to(device), precision)
            with _no_tf32() if precision == "fp32" else contextlib.nullcontext():
                got = _one_pass(model, net_dev, device, 1, plan.size, 11)
                kernels = _sdpa_kernels(lambda: _one_pass(model, net_dev, device, 1, plan.size, 11))
            rel = _rel(got, ref)
            ok = rel <= TOLERANCES[precision]["pass_rel"]
            cases.append({"family": f"network pass {label}", "precision": precision, "size": plan.size,
                          "pass_rel": rel, "sdpa_kernels": kernels, "passed": ok})
            camp.log(f"pass {label:14s} {precision}: {'ok' if ok else 'FAILED'} rel {rel:.2e} sdpa {kernels}")
            del net_dev
    fig["cases"] = cases
    fig["passed"] = all(c["passed"] for c in cases)
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _compare(ref: dict[str, Any], got: dict[str, Any], tol: dict[str, float]) -> dict[str, Any]:
    """Differences of a device run from the CPU reference, and whether ``tol`` holds."""
    import numpy as np

    out: dict[str, Any] = {}
    if "images" in ref:
        d = np.asarray(got["images"], np.float64) - np.asarray(ref["images"], np.float64)
        out.update(image_mean=float(np.abs(d).mean()), image_p999=float(np.percentile(np.abs(d), 99.9)),
                   image_bias=float(d.mean()), image_std_ref=float(np.asarray(ref["images"]).std()))
    if "fields" in ref:
        d = np.abs(np.asarray(got["fields"], np.float64) - np.asarray(ref["fields"], np.float64))
        out.update(field_mean=float(d.mean()), field_max=float(d.max()))
    if "labels" in ref:
        out["labels_equal"] = float((np.asarray(got["labels"]) == np.asarray(ref["labels"])).mean())
    ok = True
    for key, bound in tol.items():
        if key in out:
            ok &= (out[key] >= bound) if key == "labels_equal" else (abs(out[key]) <= bound)
    out["passed"] = bool(ok)
    return out


# ============================================================================ 2. speed
def _speed_models(work: Path, cs: Any, plan: Plan, ae_preset: str) -> dict[str, Any]:
    """Fresh semantic models of the speed configurations (weights do not change the cost)."""
    import torch

    from nucsynth.checkpoint import save_checkpoint
    from nucsynth.models.autoencoder import AutoencoderModel
    from nucsynth.models.semantic import SemanticModel

    out = {}
    for space, preset in plan.speed_presets:
        torch.manual_seed(0)
        if space == "pixel":
            model = SemanticModel.from_preset(preset, plan.size, cs)
        else:
            ae_p = "base" if preset == "base" else ae_preset
            ae = AutoencoderModel.from_preset(ae_p, plan.size, cs, label_aware=True)
            ae_dir = work / f"speed_autoencoder_{ae_p}"
            if not ae_dir.exists():
                save_checkpoint(ae_dir, ae, _excite(ae.build_network(), 0), raw_weights=False)
            model = SemanticModel.from_preset(preset, plan.size, cs, autoencoder=ae_dir)
            model.config.latent["scale"] = 1.0
        model.net = _excite(model.build_network(), 0).eval()
        out[f"{space}-{preset}"] = model
    return out


def _bf16_matmul_tflops(device: Any) -> float | None:
    """A measured bf16 8192^3 matmul rate (TFLOP/s): what this GPU reaches on dense work."""
    import torch

    if device.type != "cuda":
        return None
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    _sync(device)
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    _sync(device)
    return round(2 * n**3 * 10 / (time.perf_counter() - t) / 1e12, 1)


def _datasheet_peak(device: Any) -> tuple[str, float | None]:
    import torch

    if device.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    for key in sorted(BF16_PEAK_TFLOPS, key=len, reverse=True):
        if key in name:
            return name, BF16_PEAK_TFLOPS[key]
    return name, None


def measure_speed(camp: Campaign, fig: dict[str, Any], device: Any, samples: list[Any], plan: Plan,
                  models: dict[str, Any]) -> None:
    """Section 2 (see the module doc)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    name, sheet = _datasheet_peak(device)
    measured = _bf16_matmul_tflops(device)
    fig.update({"device_name": name, "bf16_peak_datasheet_tflops": sheet, "bf16_matmul_measured_tflops": measured,
                "steps": plan.speed_steps, "guidance": plan.guidance, "sampler": "dpm++2m", "size": plan.size,
                "targets": {"latent patches/s": 100, "latent preview s": 0.3, "pixel base patches/s": 20}})
    layouts = _layouts(samples, plan.size, max(plan.speed_batches))
    while len(layouts) < max(plan.speed_batches):
        layouts = layouts + layouts
    configs = []
    for label, model in models.items():
        model.net.to(device)
        row: dict[str, Any] = {"config": label, "preset": model.config.preset, "autoencoder": None}

        def render(b: int) -> None:
            model.sample(layouts[:b], steps=plan.speed_steps, guidance=plan.guidance, seed=0)

        render(1)  # warm-up: kernels, autotuning, the autoencoder's load
        if model.is_latent:
            row["autoencoder"] = model._autoencoder.config.preset
        counter = FlopCounterMode(display=False)
        with counter:
            render(1)
        row["flops_per_patch"] = int(counter.get_total_flops())
        times = []
        for _ in range(plan.latency_repeats):
            _sync(device)
            t = time.perf_counter()
            render(1)
            _sync(device)
            times.append(time.perf_counter() - t)
        row["preview_latency_s"] = round(sorted(times)[len(times) // 2], 4)
        trials = []
        start = time.perf_counter()
        for b in plan.speed_batches:
            if b > 1 and time.perf_counter() - start > plan.speed_seconds:
                break
            try:
                render(b)  # warm-up of this shape
                _reset_peak(device)
                _sync(device)
                t = time.perf_counter()
                render(b)
                _sync(device)
                dt = time.perf_counter() - t
            except torch.cuda.OutOfMemoryError:
                trials.append({"batch": b, "error": "out of memory"})
                torch.cuda.empty_cache()
                break
            trials.append({"batch": b, "seconds": round(dt, 4), "patches_per_s": round(b / dt, 2), "peak_mb": _peak_mb(device)})
            if len(trials) >= 3 and all(trials[-1]["patches_per_s"] < 1.05 * x.get("patches_per_s", 0) for x in trials[-3:-1]):
                break  # no longer gaining
        best = max((x for x in trials if "patches_per_s" in x), key=lambda x: x["patches_per_s"])
        row.update(trials=trials, best_batch=best["batch"], patches_per_s=best["patches_per_s"], peak_mb=best["peak_mb"])
        achieved = row["flops_per_patch"] * best["patches_per_s"] / 1e12
        row["achieved_tflops"] = round(achieved, 2)
        row["fraction_of_datasheet_peak"] = None if not sheet else round(achieved / sheet, 4)
        row["fraction_of_measured_matmul"] = None if not measured else round(achieved / measured, 4)
        camp.log(f"{label}: {best['patches_per_s']} patches/s at batch {best['batch']}, preview "
                 f"{row['preview_latency_s']} s, {achieved:.1f} TFLOP/s, peak {best['peak_mb']} MB")
        model.net.to("cpu")
        if model.is_latent:
            model._autoencoder.net.to("cpu")
        configs.append(row)
        fig["configs"] = configs
        camp.save()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def measure_training(camp: Campaign, fig: dict[str, Any], device: Any, samples: list[Any], plan: Plan,
                     models: dict[str, Any], work: Path) -> None:
    """Training images/s of the engine's loop (bf16 autocast on CUDA) for the speed models."""
    import torch

    rows = []
    for label, model in models.items():
        fresh = copy.deepcopy(model)
        fresh.net = None
        batch = plan.train_batches["semantic" if fresh.is_latent else "pixel"]
        run = work / f"train_speed_{label}"
        rate = _loop_rate(fresh, samples, plan, batch, run, device)
        rows.append({"config": label, "batch": batch, **rate})
        camp.log(f"train {label}: {rate['images_per_s']} images/s at batch {batch} (peak {rate['peak_mb']} MB)")
        shutil.rmtree(run, ignore_errors=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    fig["training_images_per_s"] = rows


class _Stop(Exception):
    """Raised from a training progress callback to end a run (deadline or probe done)."""


def _dataset(model: Any, samples: list[Any], size: int, device: Any, augment: bool = True) -> Any:
    from nucsynth.data.dataset import SampleDataset

    if not getattr(model, "is_latent", False):
        return SampleDataset(samples, maps=model.data_maps, size=size, augment=augment, seed=0)
    from nucsynth.data.latents import LatentDataset

    def encode(images: Any) -> Any:
        return model.autoencoder(device).encode(images.to(device))[0]

    return LatentDataset(samples, encode, model.config.latent_factor, maps=model.data_maps, size=size,
                         augment=augment, seed=0, batch=32)


def _loop_rate(model: Any, samples: list[Any], plan: Plan, batch: int, run: Path, device: Any) -> dict[str, Any]:
    """Images/s of :func:`nucsynth.train.train` over ``train_probe_steps`` steps after two
    warm-up steps (no checkpoint is written: the run is stopped before its end)."""
    from nucsynth.train import TrainConfig, train

    data = _dataset(model, samples, plan.size, device, augment=False)
    marks: list[float] = []
    n = plan.train_probe_steps + 2

    def progress(step: int, total: int, logs: dict[str, float]) -> None:
        _sync(device)
        marks.append(time.perf_counter())
        if step >= n:
            raise _Stop

    cfg = TrainConfig(steps=10**6, batch_size=batch, checkpoint_every=0, preview_at_end=False, device=str(device),
                      num_workers=plan.workers)
    _reset_peak(device)
    with contextlib.suppress(_Stop):
        train(model, data, run, cfg, progress=progress)
    dt = marks[-1] - marks[1]
    return {"images_per_s": round(batch * (len(marks) - 2) / dt, 2), "steps_timed": len(marks) - 2, "peak_mb": _peak_mb(device)}


# ============================================================================ 3. training
def _budgeted_train(camp: Campaign, fig: dict[str, Any], model: Any, data: Any, run: Path, plan: Plan, device: Any,
                    batch: int, seconds: float, lr: float, export: Callable[[Path], None], **train_kw: Any) -> Path:
    """Train ``model`` for about ``seconds``: a probe of a few steps (checkpointed) gives the
    loop's rate, then the run resumes EXACTLY to the step count that fills the time, with a
    checkpoint (and ``export``) every ``export_seconds``; a deadline stop keeps the last one."""
    from nucsynth.checkpoint import latest_intact
    from nucsynth.train import TrainConfig, train

    deadline = time.perf_counter() + seconds
    probe = min(plan.train_probe_steps, plan.max_train_steps)
    marks: list[float] = []

    def timed(step: int, total: int, logs: dict[str, float]) -> None:
        marks.append(time.perf_counter())

    base = dict(batch_size=batch, lr=lr, device=str(device), num_workers=plan.workers, preview_at_end=False, **train_kw)
    train(model, data, run, TrainConfig(steps=probe, checkpoint_every=0, **base), data={"pack": "train tiles"},
          progress=timed)
    rate = (len(marks) - 2) / (marks[-1] - marks[1]) if len(marks) > 2 else 1.0 / max(marks[-1] - marks[0], 1e-3)
    left = deadline - time.perf_counter()
    total = int(min(plan.max_train_steps, probe + max(0, left * rate * 0.92)))
    every = max(1, int(rate * plan.export_seconds)) if plan.export_seconds > 0 else max(1, total)
    fig.update(batch=batch, lr=lr, steps_per_s=round(rate, 3), images_per_s=round(rate * batch, 1), planned_steps=total,
               checkpoint_every=every)
    camp.log(f"{run.name}: {rate:.2f} steps/s at batch {batch}: {total} steps, export every {every}")

    def progress(step: int, total_: int, logs: dict[str, float]) -> None:
        fig["step"], fig["loss"] = step, round(float(logs["loss"]), 5)
        if step % every == 0 or step == total_:
            export(run)
            camp.save()
        if time.perf_counter() > deadline + 10 and step < total_:
            raise _Stop

    if total > probe:
        try:  # the same model object: its config holds what the probe fitted (a latent scale)
            train(model, data, run, TrainConfig(steps=total, checkpoint_every=every, **base), resume=True,
                  data={"pack": "train tiles"}, progress=progress)
        except _Stop:
            fig["stopped_at_deadline"] = True
    else:
        export(run)
    ckpt, _ = latest_intact(run)
    fig["checkpoint_step"] = int(ckpt.name.split("_")[-1])
    return ckpt


def train_models(camp: Campaign, fig: dict[str, Any], device: Any, samples: list[Any], plan: Plan,
                 presets: dict[str, str], work: Path) -> dict[str, Path]:
    """Section 3: the autoencoder, then the latent semantic model on it (their share of the
    time left; the segmenter's share is kept for :func:`_train_segmenter`). Returns the
    exported folders by name."""
    import torch

    from nucsynth.checkpoint import export_checkpoint
    from nucsynth.models.autoencoder import AutoencoderModel
    from nucsynth.models.semantic import SemanticModel

    cs = samples[0].layout.class_set
    exported: dict[str, Path] = {}
    time_left = camp.left() - plan.reserve_seconds
    share = plan.train_share
    fig["presets"] = dict(presets)
    fig["data"] = {"patches": len(samples), "split": "train"}

    def exporter(stem: str) -> Callable[[Path], None]:
        def export(run: Path) -> None:
            dst = work / "export" / stem
            export_checkpoint(run, dst, overwrite=True, half=True)
            _tar_parts(dst, camp.out, stem, int(camp.args.max_file_mb * MB))
            exported[stem] = dst
        return export

    # the autoencoder: label-aware (its decoder draws nucleus edges from the layout)
    ae_fig = fig.setdefault("autoencoder", {})
    torch.manual_seed(0)
    ae = AutoencoderModel.from_preset(presets["autoencoder"], plan.size, cs, label_aware=True)
    ae_ckpt = _budgeted_train(camp, ae_fig, ae, _dataset(ae, samples, plan.size, device), work / "autoencoder", plan,
                              device, plan.train_batches["autoencoder"], time_left * share["autoencoder"], 2e-4,
                              lambda run: None, warmup=50, ema_decay=0.999)
    camp.save()

    # the latent semantic model in that autoencoder's space
    sem_fig = fig.setdefault("semantic", {})
    start = camp.left()
    sem = SemanticModel.from_preset(presets["semantic"], plan.size, cs, autoencoder=ae_ckpt)
    data = _dataset(sem, samples, plan.size, device)
    sem_fig["encode_s"] = round(start - camp.left(), 2)
    seconds = (camp.left() - plan.reserve_seconds) * share["semantic"] / (share["semantic"] + share["segmenter"])
    _budgeted_train(camp, sem_fig, sem, data, work / "semantic", plan, device, plan.train_batches["semantic"], seconds,
                    2e-4, exporter("semantic"), warmup=100, ema_decay=0.999, cond_drop=0.2)
    return exported


def _train_segmenter(camp: Campaign, fig: dict[str, Any], samples: list[Any], plan: Plan, preset: str, device: Any,
                     work: Path, seconds: float) -> Path:
    import torch

    from nucsynth.evaluate.segmenter import save_segmenter, segmenter_preset, train_segmenter

    cs = samples[0].layout.class_set
    k = cs.num_classes
    deadline = time.perf_counter() + seconds
    probe = min(plan.train_probe_steps, plan.max_train_steps)
    t = time.perf_counter()
    train_segmenter(samples, segmenter_preset(preset, k, steps=probe, batch_size=plan.train_batches["segmenter"]),
                    seed=0, device=device)
    rate = probe / (time.perf_counter() - t)  # includes the warm-up: a safe underestimate
    steps = int(min(plan.max_train_steps, max(probe, (deadline - time.perf_counter()) * rate * 0.9)))
    every = max(1, int(rate * plan.export_seconds)) if plan.export_seconds > 0 else steps
    cfg = segmenter_preset(preset, k, steps=steps, batch_size=plan.train_batches["segmenter"])
    fig.update(preset=preset, steps_per_s=round(rate, 3), planned_steps=steps, batch=cfg.batch_size, crop=cfg.crop)
    camp.log(f"segmenter {preset}: {rate:.2f} steps/s: {steps} steps")
    dst = work / "export" / "segmenter"

    def save(step: int, net: Any) -> None:
        half = copy.deepcopy(net).to("cpu", torch.float16)
        save_segmenter(dst, half, cs, extra={"step": step, "preset": preset, "trained_on": "pack train tiles",
                                             "weights": "float16"}, overwrite=True)
        _tar_parts(dst, camp.out, "segmenter", int(camp.args.max_file_mb * MB))
        fig["step"] = step
        camp.save()

    def progress(step: int, total: int, loss: float) -> None:
        fig["loss"] = round(loss, 5)
        if time.perf_counter() > deadline + 10 and step < total:
            raise _Stop

    try:
        net, _ = train_segmenter(samples, cfg, seed=0, device=device, progress=progress, checkpoint=save,
                                 checkpoint_every=every)
        save(steps, net)
    except _Stop:
        fig["stopped_at_deadline"] = True
    return dst


def write_previews(camp: Campaign, fig: dict[str, Any], device: Any, samples: list[Any], plan: Plan,
                   exported: dict[str, Path]) -> None:
    """``previews.png``: real training patches, the trained model's renders of their layouts
    (20 steps, guidance), the autoencoder's reconstructions, the segmenter's nuclei."""
    import numpy as np
    import torch

    from nucsynth.checkpoint import load_checkpoint
    from nucsynth.data.dataset import image_to_tensor
    from nucsynth.evaluate.segmenter import load_segmenter, predict_layouts
    from nucsynth.models.semantic import to_uint8
    from nucsynth.viz import layout_rgb, save_png

    n = 4
    real = [s.image[: plan.size, : plan.size] for s in samples[:n]]
    layouts = _layouts(samples, plan.size, n)
    rows = [np.concatenate(real, axis=1)]
    if "semantic" in exported:
        model, _ = load_checkpoint(exported["semantic"], device=device)
        rows.append(np.concatenate([s.image for s in model.sample(layouts, steps=plan.preview_steps, guidance=plan.guidance, seed=0)], 1))
        ae = model.autoencoder(device)
        x = torch.stack([image_to_tensor(im) for im in real]).to(device)
        cond = model.condition(layouts).to(device).float()
        with torch.no_grad():
            mean, _ = ae.encode(x)
            rec = ae.decode(mean, cond if model.config.latent["label_aware"] else None)
        rows.append(np.concatenate(list(to_uint8(rec)), axis=1))
        fig["rows"] = ["real training patches", "rendered from their layouts", "autoencoder reconstructions"]
    if "segmenter" in exported and (exported["segmenter"] / "segmenter.json").is_file():
        net, cs, _ = load_segmenter(exported["segmenter"], device=device)
        pred = predict_layouts(net, real, cs, device=device)
        rows.append(np.concatenate([layout_rgb(p) for p in pred], axis=1))
        fig.setdefault("rows", ["real training patches"]).append("segmenter nuclei on the real patches")
    save_png(np.concatenate(rows, axis=0), camp.out / "previews.png")


# ============================================================================ main
def environment(device: Any) -> dict[str, Any]:
    import numpy as np
    import torch

    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
                           "device": str(device), "cpu_threads": torch.get_num_threads(), "host": platform.node()}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(), gpu=p.name,
                   gpu_memory_gb=round(p.total_memory / 1e9, 1), capability=f"{p.major}.{p.minor}",
                   sdpa_enabled={k: bool(getattr(torch.backends.cuda, f"{k}_sdp_enabled", lambda: None)())
                                 for k in ("flash", "mem_efficient", "cudnn", "math")})
    return env


def _check_sizes(presets: dict[str, str], cs: Any, size: int, max_file_mb: float, max_total_mb: float) -> dict[str, float]:
    """float16 export sizes (MB) of the models to train; refuses what could not come back."""
    import torch

    from nucsynth.evaluate.segmenter import HoVerSegmenter, segmenter_preset
    from nucsynth.models.autoencoder import AutoencoderModel
    from nucsynth.models.semantic import latent_unet_config
    from nucsynth.nets import SpadeUNet, UNetConfig, count_params

    ae = AutoencoderModel.from_preset(presets["autoencoder"], size, cs, label_aware=True)
    unet = latent_unet_config(presets["semantic"], size // ae.factor, ae.latent_channels, False, cs.num_classes + 2)
    with torch.device("meta"):
        sizes = {"autoencoder": count_params(ae.build_network()) * 2 / MB,
                 "semantic": count_params(SpadeUNet(UNetConfig.from_dict(unet))) * 2 / MB,
                 "segmenter": count_params(HoVerSegmenter(segmenter_preset(presets["segmenter"], cs.num_classes))) * 2 / MB}
    for what, mb in sizes.items():
        if max_file_mb and mb > max_file_mb - 0.1:
            raise ValueError(f"--{what}-preset {presets[what]}: its float16 weights are {mb:.1f} MB, over the "
                             f"{max_file_mb:g} MB per returned file (--max-file-mb); choose a smaller preset")
    if max_total_mb and sum(sizes.values()) > max_total_mb - 2:
        raise ValueError(f"the three models' float16 weights are {sum(sizes.values()):.1f} MB together, over the "
                         f"{max_total_mb:g} MB returned in all (--max-total-mb); choose smaller presets")
    return {k: round(v, 2) for k, v in sizes.items()}


def run_campaign(args: argparse.Namespace) -> int:
    import torch

    from nucsynth.device import pick_device

    plan = dry_plan() if args.dry_run else Plan()
    if args.dry_run:
        torch.set_num_threads(max(1, args.threads))
    out = args.out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"--out {out} exists and is not an empty folder; the campaign writes a fresh one")
    samples, meta = read_pack(args.pack_file)
    samples = samples[: plan.max_patches or None]
    presets = {"autoencoder": args.autoencoder_preset, "semantic": args.semantic_preset,
               "segmenter": args.segmenter_preset}
    export_mb = _check_sizes(presets, samples[0].layout.class_set, plan.size, args.max_file_mb, args.max_total_mb)
    device = pick_device(args.device)
    if args.dry_run and args.device is None:
        device = torch.device("cpu")
    out.mkdir(parents=True, exist_ok=True)
    # the dry run's steps are capped by its plan: a generous budget keeps its path fixed
    budget = args.budget if args.budget is not None else (600.0 if args.dry_run else 540.0)
    camp = Campaign(out, args, budget)
    camp.figures["environment"] = environment(device)
    camp.figures["export_mb"] = export_mb
    camp.figures["data"] = {"pack": str(args.pack_file), "patches": len(samples), **{
        k: meta[k] for k in ("source", "split", "val_tiles_left_out", "seed", "val_fraction") if k in meta}}
    camp.log(f"device {device}: {camp.figures['environment']}")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="nucsynth-campaign-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        speed_plan = plan
        if (("latent", presets["semantic"]) not in plan.speed_presets):
            speed_plan = dataclasses.replace(plan, speed_presets=plan.speed_presets + (("latent", presets["semantic"]),))
        models = _speed_models(work, samples[0].layout.class_set, speed_plan, presets["autoencoder"])
        with camp.section("correctness") as fig:
            check_correctness(camp, fig, device, samples, plan, models, work)
        with camp.section("speed") as fig:
            measure_speed(camp, fig, device, samples, speed_plan, models)
            measure_training(camp, fig, device, samples, plan, {k: v for k, v in models.items() if k.endswith("base")
                                                                or args.dry_run}, work)
        del models
        exported: dict[str, Path] = {}
        with camp.section("training") as fig:
            exported.update(train_models(camp, fig, device, samples, plan, presets, work))
        with camp.section("segmenter") as fig:  # a section of its own: trained even if the above failed
            exported["segmenter"] = _train_segmenter(camp, fig, samples, plan, presets["segmenter"], device, work,
                                                     camp.left() - plan.reserve_seconds)
        with camp.section("previews") as fig:
            write_previews(camp, fig, device, samples, plan, exported)
    finally:
        camp.save()
        camp.log_fh.close()
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    failed = camp.figures["errors"] or not camp.figures.get("correctness", {}).get("passed", False)
    print(f"campaign {'FAILED' if failed else 'done'} in {camp.elapsed():.0f}s: {out}", flush=True)
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pack", action="store_true", help="build the data pack from --data and exit")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"CoNSeP training folder for --pack (default {DEFAULT_DATA})")
    p.add_argument("--pack-file", type=Path, default=DEFAULT_PACK, help=f"the data pack (default {DEFAULT_PACK})")
    p.add_argument("--out", type=Path, help="output folder (new or empty)")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU: the rehearsal the test suite runs")
    p.add_argument("--budget", type=float, default=None, help="wall seconds for everything (default 540: one 10-minute command with room to start)")
    p.add_argument("--device", default=None, help="cuda (default when present), cpu...")
    p.add_argument("--autoencoder-preset", default="tiny", help="autoencoder to train (default tiny: see docs)")
    p.add_argument("--semantic-preset", default="tiny", help="latent semantic model to train (default tiny)")
    p.add_argument("--segmenter-preset", default="cpu", help="segmenter to train (default cpu)")
    p.add_argument("--max-file-mb", type=float, default=MAX_FILE_MB, help="largest returned file (0 = no limit)")
    p.add_argument("--max-total-mb", type=float, default=MAX_TOTAL_MB, help="all returned files (0 = no limit)")
    p.add_argument("--work", default=None, help="scratch folder for full checkpoints (default: a temporary one, removed)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the dry run (default 1)")
    args = p.parse_args(argv)
    hook = _Refuse()
    sys.meta_path.insert(0, hook)
    _engine_on_path()
    try:
        if args.pack:
            meta = build_pack(args.data, args.pack_file)
            print(f"packed {meta['patches']} training patches ({len(meta['train_tiles'])} tiles; val tiles left out: "
                  f"{', '.join(meta['val_tiles_left_out'])}) into {args.pack_file} "
                  f"({args.pack_file.stat().st_size / MB:.1f} MB)")
            return 0
        if args.out is None:
            p.error("--out is required (or --pack)")
        return run_campaign(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"gpu_campaign: {e}", file=sys.stderr)
        return 2
    finally:
        sys.meta_path.remove(hook)


if __name__ == "__main__":
    sys.exit(main())
