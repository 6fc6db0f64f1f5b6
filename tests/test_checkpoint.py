"""Checkpoint format: atomic folders of safetensors + JSON, clear errors, default resolution."""

from __future__ import annotations

import json

import pytest
import torch

from nucsynth import checkpoint as ck
from nucsynth.checkpoint import (
    CheckpointError,
    find_checkpoint,
    load_checkpoint,
    load_training_state,
    read_config,
    resolve_checkpoint,
    save_checkpoint,
)

from test_train import ToyFamily


def _saved(tmp_path, **kw):
    torch.manual_seed(0)
    model = ToyFamily(channels=4)
    net = model.build_network()
    ema = model.build_network()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, betas=(0.8, 0.95))
    net(torch.randn(2, 3, 8, 8), torch.randn(2, 2, 8, 8)).sum().backward()
    opt.step()
    rng = {"torch_cpu": torch.get_rng_state(), "generator": torch.Generator().manual_seed(5).get_state()}
    path = save_checkpoint(tmp_path / "ck", model, net, ema=ema, step=7, optimizer=opt, rng=rng,
                           train_state={"step": 7, "world_size": 1}, data={"store": "/x.zarr"}, **kw)
    return path, model, net, ema, opt


def test_roundtrip_weights_optimizer_and_config(tmp_path):
    path, model, net, ema, opt = _saved(tmp_path)
    names = sorted(p.name for p in path.iterdir())
    assert names == sorted(["config.json", "ema.safetensors", "model.safetensors", "optimizer.safetensors",
                            "optimizer.json", "rng.safetensors", "train_state.json"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left
    cfg = read_config(path)
    assert cfg["family"] == "toy-test" and cfg["model"]["channels"] == 4 and cfg["step"] == 7
    assert cfg["data"] == {"store": "/x.zarr"} and cfg["format"] == ck.FORMAT
    # EMA weights by default, raw ones on request
    m2, n2 = load_checkpoint(path)
    assert all(torch.equal(n2.state_dict()[k], v) for k, v in ema.state_dict().items())
    _, n3 = load_checkpoint(path, weights="model")
    assert all(torch.equal(n3.state_dict()[k], v) for k, v in net.state_dict().items())
    assert m2.net is n2 and m2.checkpoint == str(path) and m2.step == 7
    # training state: optimizer moments, betas (a tuple again) and RNG states come back
    net4, ema4 = model.build_network(), model.build_network()
    opt4 = torch.optim.AdamW(net4.parameters(), lr=0.5)
    state, rng = load_training_state(path, net4, ema4, opt4)
    assert state["step"] == 7 and torch.equal(rng["torch_cpu"], torch.get_rng_state()) is not None
    assert opt4.param_groups[0]["betas"] == (0.8, 0.95) and opt4.param_groups[0]["lr"] == 1e-3
    for p_old, p_new in zip(net.parameters(), net4.parameters()):
        s_old, s_new = opt.state[p_old], opt4.state[p_new]
        assert torch.equal(s_old["exp_avg"], s_new["exp_avg"]) and torch.equal(s_old["step"], s_new["step"])


def test_no_pickle_anywhere(tmp_path):
    path, *_ = _saved(tmp_path)
    for f in path.iterdir():
        head = f.read_bytes()[:2]
        assert head != b"\x80\x04" and head != b"PK", f"{f.name} looks like a pickle/zip"


def test_sampling_only_checkpoint_cannot_resume(tmp_path):
    path, model, net, ema, opt = _saved(tmp_path, raw_weights=False)
    assert not (path / "model.safetensors").exists()
    load_checkpoint(path)  # sampling works from EMA alone
    with pytest.raises(CheckpointError, match="cannot resume training: model.safetensors"):
        load_training_state(path, model.build_network(), model.build_network(), opt)


def test_overwriting_a_checkpoint_is_atomic_replace(tmp_path):
    path, model, net, *_ = _saved(tmp_path)
    save_checkpoint(path, model, net, step=9)
    assert read_config(path)["step"] == 9
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_checkpoint(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_checkpoint(tmp_path / "empty")
    path, *_ = _saved(tmp_path)
    # corrupt weights
    (path / "ema.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="ema.safetensors is corrupt"):
        load_checkpoint(path)
    # no weights at all
    (path / "ema.safetensors").unlink()
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights file"):
        load_checkpoint(path)
    # unknown family / broken JSON
    cfg = json.loads((path / "config.json").read_text())
    cfg["family"] = "no-such-family"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"unknown model family 'no-such-family'") as e:
        load_checkpoint(path)
    assert str(path) in str(e.value)
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot be read as JSON"):
        load_checkpoint(path)


def test_weights_that_do_not_fit_the_config(tmp_path):
    path, *_ = _saved(tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["model"]["channels"] = 6
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="do not fit the network"):
        load_checkpoint(path)


def test_run_folder_resolves_to_newest_step(tmp_path):
    path, model, net, *_ = _saved(tmp_path)
    run = tmp_path / "run"
    for step in (2, 10):
        save_checkpoint(run / "checkpoints" / f"step_{step:07d}", model, net, step=step)
    assert find_checkpoint(run).name == "step_0000010"


def test_resolve_checkpoint_order(tmp_path, monkeypatch):
    path, *_ = _saved(tmp_path)
    monkeypatch.delenv("NUCSYNTH_CHECKPOINT", raising=False)
    monkeypatch.setattr(ck, "default_checkpoint_dir", lambda: tmp_path / "pkg")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError) as e:
        resolve_checkpoint(None)
    msg = str(e.value)
    assert "NUCSYNTH_CHECKPOINT" in msg and str(tmp_path / "pkg") in msg and str(tmp_path / "cache") in msg
    cache = ck.cache_checkpoint_dir()
    cache.parent.mkdir(parents=True)
    path.rename(cache)
    assert resolve_checkpoint(None) == cache
    monkeypatch.setenv("NUCSYNTH_CHECKPOINT", str(cache))
    assert resolve_checkpoint(None) == cache
    monkeypatch.setenv("NUCSYNTH_CHECKPOINT", str(tmp_path / "gone"))
    with pytest.raises(CheckpointError, match="NUCSYNTH_CHECKPOINT"):
        resolve_checkpoint(None)
    assert resolve_checkpoint(cache) == cache  # an explicit path wins
    with pytest.raises(FileNotFoundError):
        resolve_checkpoint(tmp_path / "gone")
