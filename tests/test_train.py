"""The training loop: logging, checkpoints, exact resume, two-stage schedule, DDP (gloo).

Uses a toy family (a tiny conv net learning to denoise random images given a condition)
so that these tests do not depend on the diffusion code and run in seconds.
"""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pytest
import torch
from torch import nn

from nucsynth.checkpoint import list_checkpoints, load_checkpoint, read_config
from nucsynth.models.base import ModelFamily, register_family
from nucsynth.train import TrainConfig, read_log, train


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny convolutions: OpenMP threads only add synchronisation cost on a shared 2-core box.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class ToyNet(nn.Module):
    def __init__(self, channels: int = 8, cond_channels: int = 2, dropout: float = 0.1) -> None:
        super().__init__()
        self.inp = nn.Conv2d(3 + cond_channels, channels, 3, padding=1)
        self.drop = nn.Dropout(dropout)  # exercises the global RNG on resume
        self.out = nn.Conv2d(channels, 3, 3, padding=1)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop(torch.relu(self.inp(torch.cat([x, cond], 1)))))


@register_family
class ToyFamily(ModelFamily):
    """Predict the noise added to an image, given a 2-channel condition (droppable)."""

    name = "toy-test"
    data_maps = ("onehot",)
    log_keys = ("dropped",)

    def __init__(self, channels: int = 8, dropout: float = 0.1) -> None:
        super().__init__()
        self.channels, self.dropout = channels, dropout

    @classmethod
    def from_preset(cls, name, image_size, class_set, **options) -> "ToyFamily":
        return cls({"toy": 8, "small": 4}[name])

    @classmethod
    def from_config_dict(cls, d: Mapping[str, Any]) -> "ToyFamily":
        return cls(int(d["channels"]), float(d.get("dropout", 0.1)))

    def config_dict(self) -> dict[str, Any]:
        return {"channels": self.channels, "dropout": self.dropout, "preset": "toy", "image_size": 8}

    def build_network(self) -> nn.Module:
        return ToyNet(self.channels, dropout=self.dropout)

    def training_loss(self, net, batch, generator, cond_drop=0.0):
        x = batch["image"]
        cond = batch["onehot"]
        keep = (torch.rand(x.shape[0], generator=generator, device=x.device) >= cond_drop).float()
        cond = cond * keep[:, None, None, None]
        noise = torch.randn(x.shape, generator=generator, device=x.device)
        pred = net(x + noise, cond)
        loss = ((pred - noise) ** 2).mean()
        return loss, {"dropped": float(1 - keep.mean())}

    def preview(self, net, batch, seed=0):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(batch["image"].shape, generator=g)
        with torch.no_grad():
            y = (x - net(x, batch["onehot"])).clamp(-1, 1)
        return ((y + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


class ToyData(torch.utils.data.Dataset):
    def __init__(self, n: int = 24, size: int = 8) -> None:
        g = torch.Generator().manual_seed(1)
        self.images = torch.rand(n, 3, size, size, generator=g) * 2 - 1
        self.onehot = (torch.rand(n, 2, size, size, generator=g) > 0.5).float()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[i], "onehot": self.onehot[i]}


def _cfg(**kw) -> TrainConfig:
    base = dict(steps=12, batch_size=4, lr=1e-2, warmup=3, ema_decay=0.9, checkpoint_every=4,
                keep_checkpoints=5, preview_at_end=False, seed=3, cond_drop=0.3)
    base.update(kw)
    return TrainConfig(**base)


def _weights(run: Path, which: str = "model") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(list_checkpoints(run)[-1] / f"{which}.safetensors"))


def test_train_logs_checkpoints_and_loss_falls(tmp_path):
    res = train(ToyFamily(), ToyData(), tmp_path / "run", _cfg(steps=40, lr=2e-2, preview_every=20))
    rows = read_log(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(1, 41))
    assert {"loss", "lr", "grad_norm", "time", "stage", "dropped"} <= set(rows[0])
    assert rows[0]["lr"] == pytest.approx(2e-2 / 3) and rows[5]["lr"] == pytest.approx(2e-2)  # warm-up
    assert np.mean([r["loss"] for r in rows[-8:]]) < 0.7 * np.mean([r["loss"] for r in rows[:4]])
    assert res.step == 40 and res.checkpoint == tmp_path / "run" / "checkpoints" / "step_0000040"
    assert [p.name for p in list_checkpoints(tmp_path / "run")][-1] == "step_0000040"
    assert (tmp_path / "run" / "previews" / "step_0000020.png").is_file()
    assert (tmp_path / "run" / "previews" / "step_0000040.png").is_file()
    cfg = read_config(tmp_path / "run")
    assert cfg["family"] == "toy-test" and cfg["step"] == 40 and cfg["train"]["seed"] == 3
    model, net = load_checkpoint(tmp_path / "run")
    assert model.step == 40 and not net.training
    ema = _weights(tmp_path / "run", "ema")
    assert all(torch.equal(net.state_dict()[k], ema[k]) for k in ema)  # EMA loaded by default
    raw = _weights(tmp_path / "run", "model")
    assert any(not torch.equal(raw[k], ema[k]) for k in ema)  # and EMA differs from raw
    # no temporary folders left behind
    assert not [p for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_killed_and_resumed_run_matches_uninterrupted(tmp_path, micro_batches):
    straight = tmp_path / "straight"
    train(ToyFamily(), ToyData(), straight, _cfg(micro_batches=micro_batches))

    class Kill(Exception):
        pass

    def kill_at_7(step, total, logs):
        if step == 7:  # after the checkpoint at step 4: steps 5-7 are lost and replayed
            raise Kill

    killed = tmp_path / "killed"
    with pytest.raises(Kill):
        train(ToyFamily(), ToyData(), killed, _cfg(micro_batches=micro_batches), progress=kill_at_7)
    assert [r["step"] for r in read_log(killed)] == list(range(1, 8))
    with pytest.raises(FileExistsError):
        train(ToyFamily(), ToyData(), killed, _cfg())  # an existing run is never overwritten
    with pytest.raises(ValueError, match=f"cannot resume exactly: the run used micro_batches={micro_batches}"):
        train(ToyFamily(), ToyData(), killed, _cfg(micro_batches=3 - micro_batches), resume=True)
    train(ToyFamily(), ToyData(), killed, _cfg(micro_batches=micro_batches), resume=True)

    a, b = read_log(straight), read_log(killed)
    assert [r["step"] for r in b] == list(range(1, 13))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r["grad_norm"] for r in a] == [r["grad_norm"] for r in b]
    for which in ("model", "ema"):
        wa, wb = _weights(straight, which), _weights(killed, which)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), which


def test_micro_batches_train_the_same_weights_on_one_thread_or_two(tmp_path):
    """Without dropout the micro-batches run in parallel; the weights may not depend on it,
    and they are the weights of one pass per batch up to rounding."""
    runs = {}
    for name, threads, micro in (("one", 1, 2), ("two", 2, 2), ("pass", 1, 1)):
        torch.set_num_threads(threads)
        train(ToyFamily(dropout=0.0), ToyData(), tmp_path / name, _cfg(steps=6, micro_batches=micro))
        assert torch.get_num_threads() == threads  # the loop's worker setting is not left behind
        runs[name] = _weights(tmp_path / name)
    assert all(torch.equal(runs["one"][k], runs["two"][k]) for k in runs["one"])
    assert all(torch.allclose(runs["one"][k], runs["pass"][k], rtol=1e-4, atol=1e-5) for k in runs["one"])
    assert read_config(tmp_path / "two")["train"]["micro_batches"] == 2


def test_resume_refuses_changed_seed_and_missing_run(tmp_path):
    train(ToyFamily(), ToyData(), tmp_path / "r", _cfg(steps=4))
    with pytest.raises(ValueError, match="seed"):
        train(ToyFamily(), ToyData(), tmp_path / "r", _cfg(steps=8, seed=4), resume=True)
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        train(ToyFamily(), ToyData(), tmp_path / "none", _cfg(), resume=True)


def test_two_stage_guidance_schedule(tmp_path):
    cfg = _cfg(steps=6, finetune_steps=6, lr=1e-2, finetune_lr=1e-3, cond_drop=0.0, finetune_cond_drop=0.5)
    assert [cfg.lr_at(s) for s in (0, 2, 5, 6, 11)] == pytest.approx([1e-2 / 3, 1e-2, 1e-2, 1e-3, 1e-3])
    train(ToyFamily(), ToyData(), tmp_path / "r", cfg)
    rows = read_log(tmp_path / "r")
    assert [r["stage"] for r in rows] == [1] * 6 + [2] * 6
    assert all(r["dropped"] == 0 for r in rows[:6])  # stage 1: condition always given
    assert sum(r["dropped"] for r in rows[6:]) > 0  # stage 2: some conditions dropped
    assert [r["lr"] for r in rows[6:]] == pytest.approx([1e-3] * 6)


def test_bad_config_and_tiny_dataset_errors(tmp_path):
    with pytest.raises(ValueError, match="ema_decay"):
        TrainConfig(ema_decay=1.0)
    with pytest.raises(ValueError, match="cond_drop"):
        TrainConfig(cond_drop=1.5)
    for bad in (0, 9, True):
        with pytest.raises(ValueError, match="micro_batches must be a whole number from 1 to the batch size 8"):
            TrainConfig(micro_batches=bad)
    assert TrainConfig.from_dict({}).micro_batches == 1  # runs saved before the field: one pass
    with pytest.raises(ValueError, match="too few"):
        train(ToyFamily(), ToyData(n=3), tmp_path / "r", _cfg(batch_size=4))
    assert TrainConfig.from_dict(_cfg().to_dict()) == _cfg()


# ---------------------------------------------------------------------- DDP on gloo
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    # the environment torchrun sets; train() joins (and leaves) the process group itself
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    res = train(ToyFamily(), ToyData(), out, _cfg(steps=6, batch_size=3, checkpoint_every=3, device="cpu"))
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in res.net.state_dict().items()}, f"{out}/rank{rank}.safetensors")


@pytest.mark.slow
def test_ddp_two_cpu_processes_gloo(tmp_path):
    import torch.distributed as dist
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    out = tmp_path / "ddp"
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    assert not dist.is_initialized()  # the group was left again
    rows = read_log(out)
    assert [r["step"] for r in rows] == list(range(1, 7))  # rank 0 alone wrote the log
    assert [p.name for p in list_checkpoints(out)] == ["step_0000003", "step_0000006"]
    assert read_config(out)["step"] == 6
    assert all(math.isfinite(r["loss"]) for r in rows)
    # gradients were averaged: both ranks end with identical weights, equal to the checkpoint
    w0, w1 = load_file(str(out / "rank0.safetensors")), load_file(str(out / "rank1.safetensors"))
    saved = _weights(out, "model")
    assert all(torch.equal(w0[k], w1[k]) and torch.equal(w0[k], saved[k]) for k in w0)
    # and they differ from a single-process run on the same data (each rank saw half)
    single = train(ToyFamily(), ToyData(), tmp_path / "one", _cfg(steps=6, batch_size=3, checkpoint_every=3))
    assert any(not torch.equal(single.net.state_dict()[k], w0[k]) for k in w0)
