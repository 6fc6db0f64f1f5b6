"""`nucsynth train` and `nucsynth synthesize` end to end on a small generated store."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nucsynth.checkpoint import list_checkpoints, read_config
from nucsynth.cli import main
from nucsynth.generate.tissue import procedural_sample
from nucsynth.io.store import DatasetStore
from nucsynth.train import read_log

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)  # the commands below set --threads 1


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.zarr"
    store = DatasetStore.create(path, procedural_sample((64, 64), seed=0).layout.class_set)
    # rare class ("other") frequent enough that balancing finds a pool
    store.append([procedural_sample((64, 64), seed=i, class_shares=[0.4, 0.2, 0.2, 0.2], density=120) for i in range(6)])
    return path


@pytest.fixture(scope="module")
def run_dir(store_path, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "run"
    args = ["train", "--family", "semantic", "--preset", "tiny", "--data", str(store_path), "--out", str(run),
            "--image-size", "32", "--steps", "3", "--batch-size", "2", "--checkpoint-every", "2",
            "--lr", "1e-3", "--warmup", "2", "--threads", "1", "--device", "cpu"]
    assert main(args) == 0
    return run


def test_train_command_writes_run_and_resumes(run_dir, store_path):
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_0000002", "step_0000003"]
    cfg = read_config(run_dir)
    assert cfg["family"] == "semantic" and cfg["model"]["preset"] == "tiny" and cfg["model"]["image_size"] == 32
    assert cfg["data"]["kind"] == "store" and cfg["data"]["count"] == 6 and cfg["train"]["lr"] == 1e-3
    assert (run_dir / "previews" / "step_0000003.png").is_file()
    # refuses to start over an existing run; --resume continues it with more steps
    again = ["train", "--data", str(store_path), "--out", str(run_dir), "--image-size", "32", "--threads", "1"]
    assert main(again + ["--steps", "3"]) == 2
    assert main(again + ["--resume", "--steps", "4"]) == 0
    assert [r["step"] for r in read_log(run_dir)] == [1, 2, 3, 4]
    assert read_config(run_dir)["step"] == 4 and read_config(run_dir)["train"]["batch_size"] == 2
    # a new run on CPU splits each batch in two micro-batches; the resumed run kept that
    assert cfg["train"]["micro_batches"] == 2 and read_config(run_dir)["train"]["micro_batches"] == 2
    assert main(again + ["--resume", "--steps", "5", "--micro-batches", "1"]) == 2  # would not replay exactly


def test_train_command_micro_batches(store_path, tmp_path, capsys):
    run = tmp_path / "one_pass"
    assert main(["train", "--data", str(store_path), "--out", str(run), "--image-size", "32", "--steps", "2",
                 "--batch-size", "2", "--micro-batches", "1", "--threads", "2", "--device", "cpu"]) == 0
    assert read_config(run)["train"]["micro_batches"] == 1 and "micro-batches" not in capsys.readouterr().err
    single = tmp_path / "single"  # a batch of one cannot be split: the default fits it
    assert main(["train", "--data", str(store_path), "--out", str(single), "--image-size", "32", "--steps", "1",
                 "--batch-size", "1", "--threads", "1", "--device", "cpu"]) == 0
    assert read_config(single)["train"]["micro_batches"] == 1
    assert main(["train", "--data", str(store_path), "--out", str(tmp_path / "bad"), "--batch-size", "2",
                 "--micro-batches", "3"]) == 2
    assert "micro_batches must be a whole number from 1 to the batch size 2" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_train_command_bad_input(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / "missing.zarr"), "--out", str(tmp_path / "r")]) == 2
    assert "missing.zarr does not exist" in capsys.readouterr().err
    assert main(["train", "--family", "nope", "--data", str(tmp_path), "--out", str(tmp_path / "r")]) == 2


def test_synthesize_layout_mode_and_no_overwrite(run_dir, store_path, tmp_path, capsys):
    out = tmp_path / "synth.zarr"
    args = ["synthesize", "--checkpoint", str(run_dir), "--layouts", str(store_path), "--mode", "layout",
            "--limit", "3", "--steps", "1", "--seed", "5", "--batch-size", "2", "--guidance", "0", "--out", str(out)]
    assert main(args) == 0
    res = DatasetStore.open(out)
    src = DatasetStore.open(store_path)
    assert len(res) == 3 and res.attrs["mode"] == "layout"
    for i in range(3):
        assert res[i].layout.equals(src[i].layout) and res[i].image.dtype == np.uint8
        p = res[i].provenance
        assert p["mode"] == "layout" and p["steps"] == 1 and p["source_index"] == i
        assert p["seed"] == 5 + i and p["checkpoint"] == str(list_checkpoints(run_dir)[-1])  # a seed per sample
    before = res[0].image.copy()
    assert main(args) == 0  # the same job again: already complete, nothing rendered
    assert "already complete" in capsys.readouterr().err
    other = [a if a != "5" else "6" for a in args]  # --seed 6
    assert main(other) == 2  # refuses to overwrite a store made with other settings
    assert "already exists" in capsys.readouterr().err
    assert np.array_equal(DatasetStore.open(out)[0].image, before)
    assert main(args + ["--overwrite"]) == 0
    assert np.array_equal(DatasetStore.open(out)[0].image, before)  # same seed, same images
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no half-written leftovers


@pytest.mark.parametrize("mode", ["balance", "enlarge"])
def test_synthesize_diffmix_modes(run_dir, store_path, tmp_path, mode):
    out = tmp_path / f"{mode}.zarr"
    args = ["synthesize", "--checkpoint", str(run_dir), "--layouts", str(store_path), "--mode", mode,
            "--limit", "2", "--steps", "4", "--border", "6", "--out", str(out)]
    assert main(args) == 0
    res, src = DatasetStore.open(out), DatasetStore.open(store_path)
    assert res.attrs["strength"] == 0.55 and all(res[i].provenance["strength"] == 0.55 for i in range(2))
    assert all(not res[i].layout.equals(src[i].layout) for i in range(2)), f"{mode} left a layout unchanged"
    if mode == "balance":
        rare_before = sum(s.layout.class_counts()[1] for s in src[:2])
        assert res.class_counts()[1] > rare_before
