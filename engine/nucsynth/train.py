"""One training loop for every model family.

AdamW with linear warm-up, bf16 autocast on CUDA (fp32 on CPU), an EMA of the weights,
gradient clipping, a CSV log, periodic preview PNGs, atomic checkpoints and EXACT resume,
the two-stage classifier-free-guidance schedule, and multi-GPU data parallel training when
started under ``torchrun`` (DDP; rank 0 writes).

Exact resume: the data order is a pure function of (seed, epoch) (``DistributedSampler``)
and every step re-seeds the family's noise generator and the global torch RNG from
(seed, rank, step). A run killed after checkpoint N and resumed therefore replays steps
N+1.. exactly as an uninterrupted run would (same batches, noise, timesteps, dropout).

The loop knows nothing about diffusion: it calls ``model.training_loss(net, batch,
generator, cond_drop=...)`` of a :class:`nucsynth.models.base.ModelFamily`.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch

from nucsynth.checkpoint import (
    CheckpointError,
    describe_skipped,
    discard_checkpoint,
    latest_intact,
    load_training_state,
    list_checkpoints,
    save_checkpoint,
    tidy_checkpoints,
)
from nucsynth.micro_batches import MicroBatches
from nucsynth.models.base import ModelFamily

__all__ = ["TrainConfig", "TrainResult", "train", "read_log", "LOG_NAME"]

LOG_NAME = "log.csv"
_BASE_COLUMNS = ("step", "stage", "loss", "lr", "grad_norm", "time")


@dataclass
class TrainConfig:
    """Training options (stored in every checkpoint under ``"train"``).

    Two-stage guidance schedule (SDM): ``steps`` steps at ``lr`` with condition dropout
    ``cond_drop`` (0 = condition always given), then ``finetune_steps`` more at
    ``finetune_lr`` with dropout ``finetune_cond_drop`` (0.2: learns the null condition for
    classifier-free guidance). ``finetune_steps=0`` trains one stage only.

    ``ema_decay``: 0.9999 at paper scale (hundreds of thousands of steps); an EMA averages
    over about 1/(1-decay) steps, so short runs need smaller values (default 0.999; the
    CPU-trained default model uses 0.995). The decay is warmed up as
    min(decay, (1+step)/(10+step)) so early EMA weights are not dominated by the random init.
    """

    steps: int = 1000
    batch_size: int = 8
    lr: float = 1e-4
    warmup: int = 100
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    cond_drop: float = 0.0
    finetune_steps: int = 0
    finetune_lr: float = 2e-5
    finetune_cond_drop: float = 0.2
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    preview_every: int = 0
    preview_at_end: bool = True
    preview_count: int = 4
    preview_seed: int = 0
    seed: int = 0
    amp: bool = True
    device: str | None = None
    num_workers: int = 0
    # On CPU in one process, each batch goes through the network as this many micro-batches
    # on worker threads (nucsynth.micro_batches): as fast as splitting every operation on
    # an idle machine, steadily faster than one thread on a busy one (where one pass ranged
    # from 0.83 to 1.21 x one thread's time), and the weights do not depend on the thread
    # count up to this many threads. `nucsynth train` uses 2 for new runs. 1 = one pass per
    # batch (runs saved before this field; always on GPUs and under DDP).
    micro_batches: int = 1

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        checks = [
            (self.steps >= 0, "steps must be >= 0"),
            (self.finetune_steps >= 0, "finetune_steps must be >= 0"),
            (self.steps + self.finetune_steps > 0, "steps + finetune_steps must be > 0"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.lr > 0 and self.finetune_lr > 0, "learning rates must be > 0"),
            (self.warmup >= 0, "warmup must be >= 0"),
            (0.0 <= self.ema_decay < 1.0, "ema_decay must be in [0, 1)"),
            (self.grad_clip >= 0, "grad_clip must be >= 0 (0 = no clipping)"),
            (0.0 <= self.cond_drop <= 1.0, "cond_drop must be in [0, 1]"),
            (0.0 <= self.finetune_cond_drop <= 1.0, "finetune_cond_drop must be in [0, 1]"),
            (self.checkpoint_every >= 0, "checkpoint_every must be >= 0 (0 = only at the end)"),
            (self.keep_checkpoints >= 1, "keep_checkpoints must be >= 1"),
            (self.preview_every >= 0, "preview_every must be >= 0 (0 = none during training)"),
            (self.num_workers >= 0, "num_workers must be >= 0"),
            (isinstance(self.micro_batches, int) and not isinstance(self.micro_batches, bool)
             and 1 <= self.micro_batches <= self.batch_size,
             f"micro_batches must be a whole number from 1 to the batch size {self.batch_size}, got {self.micro_batches!r}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"training config: {msg}")

    @property
    def total_steps(self) -> int:
        """Stage 1 + stage 2 steps."""
        return self.steps + self.finetune_steps

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict."""
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
        """Inverse of :meth:`to_dict` (unknown keys are an error)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"training config has unknown keys {sorted(unknown)}; known: {sorted(names)}")
        return cls(**dict(d))

    def stage(self, step: int) -> int:
        """1 while ``step`` (0-based, the step being taken) is in the first stage, else 2."""
        return 1 if step < self.steps else 2

    def lr_at(self, step: int) -> float:
        """Learning rate of (0-based) ``step``: linear warm-up to ``lr``, then ``finetune_lr``."""
        if self.stage(step) == 2:
            return self.finetune_lr
        if self.warmup > 0:
            return self.lr * min(1.0, (step + 1) / self.warmup)
        return self.lr

    def cond_drop_at(self, step: int) -> float:
        """Condition dropout of (0-based) ``step``."""
        return self.cond_drop if self.stage(step) == 1 else self.finetune_cond_drop


@dataclass
class TrainResult:
    """What :func:`train` did: steps reached, the last checkpoint, the log file, this
    session's losses, the trained raw and EMA networks (of this process), and on resume
    the checkpoint resumed from and the newer damaged ones skipped (path, why)."""

    step: int
    checkpoint: Path | None
    log: Path
    losses: list[float] = field(default_factory=list)
    net: torch.nn.Module | None = None
    ema: torch.nn.Module | None = None
    resumed_from: Path | None = None
    skipped: list[tuple[Path, str]] = field(default_factory=list)


# ---------------------------------------------------------------------- distributed
@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def _setup_distributed() -> _Dist:
    """Join the process group when run under torchrun (WORLD_SIZE > 1) or already joined."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend)
    return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), owns_group=True)


def _barrier(d: _Dist) -> None:
    if d.world > 1:
        import torch.distributed as dist

        dist.barrier()


def _mean_across(d: _Dist, value: torch.Tensor) -> float:
    if d.world > 1:
        import torch.distributed as dist

        value = value.detach().clone()
        dist.all_reduce(value)
        value /= d.world
    return float(value)


def _pick_device(cfg: TrainConfig, d: _Dist) -> torch.device:
    from nucsynth.device import pick_device

    if d.world > 1 and torch.cuda.is_available() and (cfg.device in (None, "cuda")):
        return torch.device("cuda", d.local_rank)  # one GPU per torchrun process
    return pick_device(cfg.device)


# ---------------------------------------------------------------------- data order
def _step_seed(seed: int, rank: int, step: int) -> int:
    """A well-mixed 64-bit seed for (seed, rank, step)."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, np.uint64)[0])


def _collate(items: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    from torch.utils.data import default_collate

    return default_collate(list(items))


def _epoch_batches(
    dataset: Any, cfg: TrainConfig, d: _Dist, epoch: int, skip: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of one epoch in the deterministic order of (seed, epoch), skipping ``skip``."""
    from torch.utils.data import DataLoader, DistributedSampler

    sampler = DistributedSampler(dataset, num_replicas=d.world, rank=d.rank, shuffle=True, seed=cfg.seed, drop_last=True)
    sampler.set_epoch(epoch)
    order = list(sampler)
    n_batches = len(order) // cfg.batch_size
    batches = [order[i * cfg.batch_size : (i + 1) * cfg.batch_size] for i in range(skip, n_batches)]
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)  # datasets with per-epoch augmentation seeds
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=cfg.num_workers, collate_fn=_collate)
    yield from loader


def _batches_per_epoch(dataset: Any, cfg: TrainConfig, d: _Dist) -> int:
    per_rank = len(dataset) // d.world
    n = per_rank // cfg.batch_size
    if n < 1:
        raise ValueError(
            f"the training set has {len(dataset)} items: too few for batch size {cfg.batch_size} "
            f"on {d.world} process(es); use a smaller --batch-size or more data"
        )
    return n


# ---------------------------------------------------------------------- logging
def _open_log(path: Path, resume_step: int | None, extra: Sequence[str]) -> tuple[Any, csv.DictWriter]:
    """Open the CSV log; on resume, drop rows after the checkpoint's step (atomic rewrite)."""
    columns = list(_BASE_COLUMNS) + [k for k in extra if k not in _BASE_COLUMNS]
    if resume_step is not None and path.exists():
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            columns = list(reader.fieldnames or columns)
            rows = [r for r in reader if int(r["step"]) <= resume_step]
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, columns, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fh = open(path, "a", newline="", encoding="utf-8")
        return fh, csv.DictWriter(fh, columns, extrasaction="ignore")
    fh = open(path, "w", newline="", encoding="utf-8")
    writer = csv.DictWriter(fh, columns, extrasaction="ignore")
    writer.writeheader()
    fh.flush()
    return fh, writer


def read_log(run_dir: str | Path) -> list[dict[str, float]]:
    """The rows of a run's CSV log as floats (step, stage, loss, lr, grad_norm, time, ...)."""
    path = Path(run_dir) / LOG_NAME
    with open(path, newline="", encoding="utf-8") as f:
        return [{k: float(v) for k, v in r.items() if v not in (None, "")} for r in csv.DictReader(f)]


def _write_preview(path: Path, real: torch.Tensor, fake: np.ndarray) -> None:
    """PNG grid: real images on the top row, the model's images for the same maps below."""
    from nucsynth.viz import save_png

    top = ((real.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    save_png(np.concatenate([np.concatenate(list(top), axis=1), np.concatenate(list(fake), axis=1)], axis=0), path)


# ---------------------------------------------------------------------- EMA
@torch.no_grad()
def _ema_update(ema: torch.nn.Module, net: torch.nn.Module, decay: float) -> None:
    e_params = [p for p in ema.parameters()]
    n_params = [p.detach() for p in net.parameters()]
    torch._foreach_lerp_(e_params, n_params, 1.0 - decay)
    for eb, nb in zip(ema.buffers(), net.buffers()):
        eb.copy_(nb)


def _rng_state(generator: torch.Generator) -> dict[str, torch.Tensor]:
    state = {"torch_cpu": torch.get_rng_state(), "generator": generator.get_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"torch_cuda_{i}"] = s
    return state


def _restore_rng(state: Mapping[str, torch.Tensor], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch_cpu"])
    generator.set_state(state["generator"])
    if torch.cuda.is_available():
        cuda = [state[k] for k in sorted(state) if k.startswith("torch_cuda_")]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


# ---------------------------------------------------------------------- the loop
def _check_resumable(saved: Mapping[str, Any], cfg: TrainConfig, d: _Dist) -> None:
    """Options that change the data order or noise cannot differ between the two sessions."""
    old = saved.get("train", {})
    for key in ("seed", "batch_size"):
        if key in old and old[key] != getattr(cfg, key):
            raise ValueError(f"cannot resume exactly: the run used {key}={old[key]}, now {getattr(cfg, key)}")
    if old and old.get("micro_batches", 1) != cfg.micro_batches:  # runs before the field used one pass
        raise ValueError(f"cannot resume exactly: the run used micro_batches={old.get('micro_batches', 1)}, "
                         f"now {cfg.micro_batches}")
    if saved.get("world_size", 1) != d.world:
        raise ValueError(f"cannot resume exactly: the run used {saved.get('world_size')} processes, now {d.world}")


def train(
    model: ModelFamily,
    dataset: Any,
    out_dir: str | Path,
    config: TrainConfig | None = None,
    *,
    resume: bool = False,
    data: Mapping[str, Any] | None = None,
    progress: Callable[[int, int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train ``model`` on ``dataset`` (a torch Dataset of dicts, e.g. ``SampleDataset``).

    Writes into ``out_dir``: ``log.csv``, ``checkpoints/step_<N>/`` (every
    ``checkpoint_every`` steps and at the end; the newest ``keep_checkpoints`` kept) and
    ``previews/step_<N>.png``. ``resume=True`` continues exactly from the newest INTACT
    checkpoint in ``out_dir`` (damaged newer ones are skipped and listed in the result);
    without it an ``out_dir`` that already holds checkpoints is refused.
    ``data`` is the provenance of the training data (stored in checkpoints).
    ``progress(step, total, logs)`` is called after each step and may raise to stop.
    Under torchrun (WORLD_SIZE > 1) it trains with DDP; ``batch_size`` is per process.
    """
    cfg = config or TrainConfig()
    out = Path(out_dir)
    d = _setup_distributed()
    try:
        return _train(model, dataset, out, cfg, d, resume, dict(data or {}), progress)
    finally:
        if d.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _train(
    model: ModelFamily,
    dataset: Any,
    out: Path,
    cfg: TrainConfig,
    d: _Dist,
    resume: bool,
    data: dict[str, Any],
    progress: Callable[[int, int, dict[str, float]], None] | None,
) -> TrainResult:
    existing = list_checkpoints(out)
    if resume and not existing:
        raise FileNotFoundError(f"cannot resume: {out} holds no checkpoints (checkpoints/step_*)")
    ckpt, skipped = latest_intact(out, resume=True) if resume else (None, [])
    if resume and ckpt is None:
        raise CheckpointError(f"cannot resume: no intact checkpoint in {out}: {describe_skipped(skipped)}")
    if not resume and existing:
        raise FileExistsError(f"{out} already holds a training run ({existing[-1].name}); pass resume or another output folder")
    _barrier(d)  # every rank has looked before rank 0 creates anything
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "checkpoints").mkdir(exist_ok=True)
        tidy_checkpoints(out / "checkpoints", report=None)  # temporary folders of killed writes
    device = _pick_device(cfg, d)
    if not resume:
        model.prepare_training(dataset)
    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    net = model.build_network().to(device)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    generator = torch.Generator(device=device)
    generator.manual_seed(cfg.seed)

    step, elapsed = 0, 0.0
    if ckpt is not None:
        state, rng = load_training_state(ckpt, net, ema, optimizer)
        _check_resumable(state, cfg, d)
        _restore_rng(rng, generator)
        step, elapsed = int(state["step"]), float(state.get("time", 0.0))
        if step > cfg.total_steps:
            raise ValueError(f"{ckpt} is at step {step}, beyond the requested {cfg.total_steps} steps")

    # the network as the loss calls it: DDP across processes, else in micro-batches on CPU
    micro = MicroBatches.for_device(cfg.micro_batches if d.world == 1 else 1, device)
    ddp_net: Any = micro.wrap(net)
    if d.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        ddp_net = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)

    use_amp = cfg.amp and device.type == "cuda"
    bpe = _batches_per_epoch(dataset, cfg, d)
    preview_batch = _collate([dataset[i] for i in range(min(cfg.preview_count, len(dataset)))]) if d.main else None
    log_fh = writer = None
    if d.main:
        log_fh, writer = _open_log(out / LOG_NAME, step if resume else None, _family_log_keys(model))
    losses: list[float] = []
    last_ckpt: Path | None = ckpt
    t0 = time.perf_counter() - elapsed
    try:
        with micro:  # the worker threads live as long as the loop
            while step < cfg.total_steps:
                epoch, skip = divmod(step, bpe)
                for batch in _epoch_batches(dataset, cfg, d, epoch, skip):
                    logs = _train_step(model, ddp_net, net, ema, optimizer, generator, batch, cfg, d, step, device, use_amp)
                    step += 1
                    logs["time"] = time.perf_counter() - t0
                    losses.append(logs["loss"])
                    if d.main:
                        writer.writerow({"step": step, **logs})
                        log_fh.flush()
                    if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == cfg.total_steps:
                        last_ckpt = _checkpoint(out, model, net, ema, optimizer, generator, cfg, d, step, logs["time"], data)
                    if d.main and preview_batch is not None and _preview_due(cfg, step):
                        _preview(out, model, ema, preview_batch, cfg, step, device)
                    if progress is not None:
                        progress(step, cfg.total_steps, logs)
                    if step >= cfg.total_steps:
                        break
    finally:
        if log_fh is not None:
            log_fh.close()
    return TrainResult(step=step, checkpoint=last_ckpt, log=out / LOG_NAME, losses=losses, net=net, ema=ema,
                       resumed_from=ckpt, skipped=skipped)


def _family_log_keys(model: ModelFamily) -> tuple[str, ...]:
    return tuple(getattr(model, "log_keys", ()))


def _train_step(
    model: ModelFamily,
    ddp_net: Any,
    net: torch.nn.Module,
    ema: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    batch: Mapping[str, torch.Tensor],
    cfg: TrainConfig,
    d: _Dist,
    step: int,
    device: torch.device,
    use_amp: bool,
) -> dict[str, float]:
    """One optimisation step; returns the row to log (averaged over ranks)."""
    lr = cfg.lr_at(step)
    for g in optimizer.param_groups:
        g["lr"] = lr
    seed = _step_seed(cfg.seed, d.rank, step)
    generator.manual_seed(seed)
    torch.manual_seed(seed)  # global RNG (e.g. dropout) follows the step too: exact resume
    batch = {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    net.train()
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if use_amp else contextlib.nullcontext()
    with amp:
        loss, extra = model.training_loss(ddp_net, batch, generator, cond_drop=cfg.cond_drop_at(step))
    if not torch.isfinite(loss.detach()):
        raise FloatingPointError(f"training loss became {float(loss)} at step {step + 1}; lower the learning rate")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), max_norm)
    optimizer.step()
    _ema_update(ema, net, min(cfg.ema_decay, (1 + step) / (10 + step)))
    row = {"stage": cfg.stage(step), "loss": _mean_across(d, loss.detach().float()), "lr": lr, "grad_norm": float(grad_norm)}
    for k, v in extra.items():
        row[k] = _mean_across(d, torch.as_tensor(float(v), device=device))
    return row


def _checkpoint(
    out: Path,
    model: ModelFamily,
    net: torch.nn.Module,
    ema: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    cfg: TrainConfig,
    d: _Dist,
    step: int,
    elapsed: float,
    data: Mapping[str, Any],
) -> Path:
    path = out / "checkpoints" / f"step_{step:07d}"
    if d.main:
        state = {
            "step": step,
            "time": elapsed,
            "world_size": d.world,
            "train": cfg.to_dict(),
            "scheduler": {
                "kind": "linear-warmup, then constant fine-tune",
                "lr": cfg.lr,
                "warmup": cfg.warmup,
                "stage1_steps": cfg.steps,
                "finetune_lr": cfg.finetune_lr,
                "stage": cfg.stage(step - 1),
                "last_lr": cfg.lr_at(step - 1),
            },
        }
        save_checkpoint(
            path, model, net, ema=ema, step=step, optimizer=optimizer, rng=_rng_state(generator),
            train_state=state, train_config=cfg.to_dict(), data=data,
        )
        for old in list_checkpoints(out)[: -cfg.keep_checkpoints]:
            discard_checkpoint(old)
    _barrier(d)
    return path


def _preview_due(cfg: TrainConfig, step: int) -> bool:
    if cfg.preview_every and step % cfg.preview_every == 0:
        return True
    return cfg.preview_at_end and step == cfg.total_steps


def _preview(
    out: Path, model: ModelFamily, ema: torch.nn.Module, batch: Mapping[str, torch.Tensor],
    cfg: TrainConfig, step: int, device: torch.device,
) -> None:
    batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        images = model.preview(ema, batch, seed=cfg.preview_seed)
    _write_preview(out / "previews" / f"step_{step:07d}.png", batch["image"], images)
