"""Nothing lost, nothing overwritten: outputs, the store and checkpoints under kills,
concurrent writers, full disks and damaged files (docs/formats.md, docs/cli.md 'check')."""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from nucsynth import outputs
from nucsynth.checkpoint import CheckpointError, CheckpointWarning, find_checkpoint, load_checkpoint, save_checkpoint
from nucsynth.cli import main
from nucsynth.io.store import DatasetStore, StoreBusyError, StoreDamagedError
from nucsynth.layout import CONSEP_CLASSES

from test_store import assert_same, make_samples
from test_train import ToyFamily

ROOT = Path(__file__).resolve().parents[1]
ENGINE = ROOT / "engine"


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _store(path: Path, n: int = 6, seed: int = 0) -> list:
    samples = make_samples(n, seed=seed)
    with DatasetStore.create(path, CONSEP_CLASSES) as st:
        st.append(samples)
    return samples


# ---------------------------------------------------------------------- outputs
def test_replacement_cut_between_renames_is_put_back(tmp_path):
    out = tmp_path / "out.zarr"
    old = _store(out)
    # a killed run on a system without exchange: first rename done, second never happened
    aside = tmp_path / f".out.zarr.replaced-{_dead_pid()}-0123abcd"
    os.rename(out, aside)
    partial = tmp_path / f".out.zarr.writing-{_dead_pid()}-89abcdef"
    partial.mkdir()
    lines = outputs.tidy(out, report=None)
    assert any("restored" in line for line in lines) and any("removed" in line for line in lines)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.zarr"]
    for a, b in zip(old, DatasetStore.open(out)):
        assert_same(a, b)


def test_leftovers_of_running_processes_are_kept(tmp_path):
    mine = tmp_path / f".out.zarr.writing-{os.getpid()}-0123abcd"
    mine.mkdir()
    lines = outputs.tidy(tmp_path / "out.zarr", report=None)
    assert mine.exists() and "left alone" in lines[0]


@pytest.mark.parametrize("exchange", [True, False])
def test_replace_keeps_old_until_new_is_complete(tmp_path, monkeypatch, exchange):
    out = tmp_path / "out.zarr"
    _store(out, 3)
    if not exchange:
        monkeypatch.setattr(outputs, "_exchange", lambda a, b: False)
    with pytest.raises(RuntimeError):
        with outputs.staged(out, overwrite=True) as tmp:
            DatasetStore.create(tmp, CONSEP_CLASSES).append(make_samples(2, seed=4))
            raise RuntimeError("crash before the new output is complete")
    assert len(DatasetStore.open(out)) == 3 and sorted(p.name for p in tmp_path.iterdir()) == ["out.zarr"]
    with outputs.staged(out, overwrite=True) as tmp:
        with DatasetStore.create(tmp, CONSEP_CLASSES) as st:
            st.append(make_samples(2, seed=4))
    assert len(DatasetStore.open(out)) == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["out.zarr"]


def test_prepare_on_a_full_disk_says_so_in_one_line_naming_the_store(tmp_path, monkeypatch, capsys):
    src = tmp_path / "src"
    src.mkdir()
    _write_folder_source(src)
    store = tmp_path / "s.zarr"

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / ".s.zarr.preparing-1-00000000/images"))

    monkeypatch.setattr(DatasetStore, "_write_batch", full)
    assert main(["prepare", str(src), str(store), "--patch-size", "32"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and f"cannot write {store}: the disk is full" in err[0] and ".preparing-" not in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no partial store left behind


def test_prepare_removes_and_reports_partial_stores_of_killed_runs(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    _write_folder_source(src)
    partial = tmp_path / f".s.zarr.preparing-{_dead_pid()}-0123abcd"
    _store(partial, 2)  # what a killed `prepare` leaves
    assert main(["prepare", str(src), str(tmp_path / "s.zarr"), "--patch-size", "32"]) == 0
    assert "removed .s.zarr.preparing-" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr", "src"]


def _write_folder_source(folder: Path) -> None:
    import tifffile

    (folder / "images").mkdir()
    (folder / "labels").mkdir()
    for i, x in enumerate(make_samples(2, shape=(64, 64))):
        tifffile.imwrite(folder / "images" / f"img{i}.tif", x.image)
        tifffile.imwrite(folder / "labels" / f"img{i}.tif", x.layout.inst_map)


# ---------------------------------------------------------------------- commands never overwrite
def test_segmenter_train_never_deletes_an_existing_folder_or_the_data(tmp_path, capsys):
    store = tmp_path / "s.zarr"
    _store(store)
    before = sorted(str(p.relative_to(store)) for p in store.rglob("*"))
    for out in (store, tmp_path):  # the store itself, and a folder holding it
        assert main(["segmenter", "train", "--data", str(store), "--preset", "tiny", "--steps", "1",
                     "--out", str(out), "--overwrite"]) == 2
        assert "--data" in capsys.readouterr().err
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert main(["segmenter", "train", "--data", str(store), "--preset", "tiny", "--steps", "1", "--out", str(mine)]) == 2
    assert "already exists" in capsys.readouterr().err and (mine / "notes.txt").read_text() == "keep me"
    assert sorted(str(p.relative_to(store)) for p in store.rglob("*")) == before


def test_result_files_are_not_overwritten_without_overwrite(tmp_path, capsys):
    store = tmp_path / "s.zarr"
    _store(store)
    report = tmp_path / "report.json"
    report.write_text("{}")
    runs = [
        ["evaluate", "quality", str(store), str(store), "--metrics", "fsd", "--out", str(report)],
        ["segmenter", "evaluate", "--model", str(tmp_path / "seg"), "--data", str(store), "--json", str(report)],
    ]
    (tmp_path / "res").mkdir()
    (tmp_path / "res" / "downstream.json").write_text("{}")
    runs.append(["evaluate", "downstream", "--real", str(store), "--out", str(tmp_path / "res")])
    for argv in runs:
        assert main(argv) == 2, argv
        assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert report.read_text() == "{}" and (tmp_path / "res" / "downstream.json").read_text() == "{}"
    assert main(runs[0] + ["--overwrite"]) == 0
    assert json.loads(report.read_text())["n_real"] == 6


# ---------------------------------------------------------------------- the writer lock
_HOLD = """
import sys, time
from nucsynth.io.store import DatasetStore
st = DatasetStore.open(sys.argv[1], mode="a")
print("locked", flush=True)
time.sleep(600)
"""


def test_second_writer_is_refused_naming_the_pid_and_a_killed_writer_releases(tmp_path):
    p = tmp_path / "s.zarr"
    _store(p)
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(p)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StoreBusyError, match=f"being written by PID {holder.pid}"):
            DatasetStore.open(p, mode="a")
        with pytest.raises(StoreBusyError, match="after waiting"):
            DatasetStore.open(p, mode="a", wait=0.3)
        with pytest.raises(StoreBusyError):  # and replacing it is refused too
            DatasetStore.create(p, CONSEP_CLASSES, overwrite=True)
        assert len(DatasetStore.open(p)) == 6  # readers are not blocked
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with DatasetStore.open(p, mode="a") as st:  # the kernel released the dead writer's lock
        st.append(make_samples(1, seed=3))
    assert len(DatasetStore.open(p)) == 7


_WRITER = """
import sys, time
sys.path.insert(0, sys.argv[3])
from test_store import make_samples
from nucsynth.io.store import DatasetStore, StoreBusyError
tag, wait = sys.argv[2], sys.argv[4] == "wait"

def slow():
    for k, s in enumerate(make_samples(36, seed=int(tag))):
        time.sleep(0.01)
        s.provenance["writer"] = tag
        yield s

try:
    st = DatasetStore.open(sys.argv[1], mode="a", wait=wait)
except StoreBusyError as e:
    print(e)
    sys.exit(2)
st.append(slow(), splits=tag)
"""


@pytest.mark.parametrize("wait", [False, True])
def test_two_writers_end_with_every_sample_or_one_clear_refusal(tmp_path, wait):
    p = tmp_path / "s.zarr"
    DatasetStore.create(p, CONSEP_CLASSES).close()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(p), tag, str(ROOT / "tests"),
                               "wait" if wait else "no"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for tag in ("1", "2")]
    done = [(pr.wait(timeout=300), pr.stdout.read(), pr.stderr.read()) for pr in procs]
    ok = [tag for tag, (rc, _, _) in zip(("1", "2"), done) if rc == 0]
    refused = [out for rc, out, _ in done if rc == 2]
    assert len(ok) + len(refused) == 2, done
    assert all("is being written by PID" in out for out in refused)
    if wait:
        assert len(ok) == 2
    st = DatasetStore.open(p)
    assert len(st) == 36 * len(ok) and st.check().ok
    for tag in ok:  # every sample of each successful writer, intact and in its order
        rows = [st[int(i)] for i in st.indices(tag)]
        for a, b in zip(make_samples(36, seed=int(tag)), rows):
            assert b.provenance["writer"] == tag
            np.testing.assert_array_equal(a.image, b.image)
            np.testing.assert_array_equal(a.layout.inst_map, b.layout.inst_map)


# ---------------------------------------------------------------------- crash points
@pytest.mark.parametrize("where", ["between the two array creations", "after the first resize"])
def test_a_store_whose_first_append_was_cut_can_be_appended_to(tmp_path, monkeypatch, where):
    import nucsynth.io.store as store_mod

    p = tmp_path / "s.zarr"
    st = DatasetStore.create(p, CONSEP_CLASSES)
    real = store_mod.DatasetStore._write_batch

    def cut(self, batch, labels, n, m):
        if where.startswith("between"):
            self._group.create_array("images", shape=(0, 48, 48, 3), chunks=(1, 48, 48, 3), dtype="uint8")
        else:
            self._ensure_patch_arrays(batch[0].layout.shape)
            self._group["inst_maps"].resize((1, 48, 48))
        raise RuntimeError("cut")  # stopped right after the first array operations

    monkeypatch.setattr(store_mod.DatasetStore, "_write_batch", cut)
    with pytest.raises(RuntimeError, match="cut"):
        st.append(make_samples(2))
    st.close()
    monkeypatch.setattr(store_mod.DatasetStore, "_write_batch", real)
    assert len(DatasetStore.open(p)) == 0 and DatasetStore.open(p).patch_shape is None
    # the same patch size, or even another one: nothing was committed
    more = make_samples(3, shape=(48, 48) if where.startswith("between") else (56, 56))
    with DatasetStore.open(p, mode="a") as again:
        again.append(more)
    for a, b in zip(more, DatasetStore.open(p)):
        assert_same(a, b)


def test_kill_points_driver_small(tmp_path):
    """A few of the kill -9 points of benchmarks/kill_points.py (the full run is a script)."""
    spec = importlib.util.spec_from_file_location("kill_points", ROOT / "benchmarks" / "kill_points.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--store", "1", "--checkpoint", "0", "--overwrite", "1", "--workdir", str(tmp_path)]) == 0


# ---------------------------------------------------------------------- damage
def _chunk_files(p: Path) -> list[Path]:
    return sorted(f for f in p.rglob("*") if f.is_file() and "/c/" in f.as_posix())


@pytest.mark.parametrize("seed", range(4))
def test_check_finds_every_randomly_damaged_chunk(tmp_path, seed):
    p = tmp_path / "s.zarr"
    samples = _store(p, 12, seed=seed)
    rng = np.random.default_rng(seed)
    chunks = [f for f in _chunk_files(p) if f.relative_to(p).parts[0] in ("images", "inst_maps")]
    hit = rng.choice(len(chunks), size=4, replace=False)
    expected = set()
    for i in hit:
        f = chunks[i]
        if rng.random() < 0.5:
            f.unlink()
        else:
            f.write_bytes(f.read_bytes()[: int(rng.integers(0, f.stat().st_size))])
        expected.add(int(f.relative_to(p).parts[2]))  # <array>/c/<row>/...
    st = DatasetStore.open(p)
    rep = st.check()
    assert set(rep.damaged) == expected and not rep.ok
    bad = min(expected)
    with pytest.raises(StoreDamagedError, match=f"patch {bad} is damaged"):
        st[bad]
    with pytest.raises(StoreDamagedError):
        list(st)
    assert main(["check", str(p)]) == 1
    assert main(["check", str(p), "--repair", "--yes"]) == 0
    back = DatasetStore.open(p)
    kept = [s for i, s in enumerate(samples) if i not in expected]
    assert len(back) == len(kept) and back.check().ok
    for a, b in zip(kept, back):
        assert_same(a, b)


@pytest.mark.parametrize("table", ["offsets", "classes", "centroids", "splits", "provenance"])
def test_check_finds_damaged_table_chunks(tmp_path, table):
    p = tmp_path / "s.zarr"
    from nucsynth.layout import Layout, Sample

    # every nucleus of a known class: a deleted chunk then reads differently (fill value 0)
    samples = [Sample(Layout(s.layout.inst_map, np.maximum(s.layout.classes, 1), s.layout.centroids, CONSEP_CLASSES),
                      s.image, s.provenance) for s in make_samples(8) if s.layout.num_nuclei > 0]
    with DatasetStore.create(p, CONSEP_CLASSES) as st:
        st.append(samples)
    (f,) = [x for x in _chunk_files(p) if x.relative_to(p).parts[0] == table]
    f.unlink()
    rep = DatasetStore.open(p).check()
    assert set(rep.damaged) == set(range(len(samples)))
    assert main(["check", str(p)]) == 1


def test_lost_checksums_are_reported_not_dropped(tmp_path):
    p = tmp_path / "s.zarr"
    _store(p)
    (f,) = [x for x in _chunk_files(p) if x.relative_to(p).parts[0] == "checksums"]
    f.unlink()
    rep = DatasetStore.open(p).check()
    assert not rep.damaged and rep.unverified == list(range(6))
    assert main(["check", str(p), "--repair", "--yes"]) == 0
    assert len(DatasetStore.open(p)) == 6 and DatasetStore.open(p).check().ok


def test_check_repair_refuses_a_store_being_written(tmp_path, capsys):
    p = tmp_path / "s.zarr"
    _store(p)
    (next(f for f in _chunk_files(p) if "images" in f.parts)).unlink()
    with DatasetStore.open(p, mode="a"):
        assert main(["check", str(p), "--repair", "--yes"]) == 2
    assert "being written by PID" in capsys.readouterr().err
    assert main(["check", str(tmp_path / "nope.zarr")]) == 2


# ---------------------------------------------------------------------- checkpoints
def _toy_checkpoint(path: Path, step: int = 1, nan: bool = False) -> Path:
    torch.manual_seed(step)
    model = ToyFamily(channels=4)
    net = model.build_network()
    if nan:
        with torch.no_grad():
            next(net.parameters())[0].fill_(float("nan"))
    return save_checkpoint(path, model, net, step=step)


def test_non_finite_weights_are_refused_at_load(tmp_path):
    ck = _toy_checkpoint(tmp_path / "ck", nan=True)
    with pytest.raises(CheckpointError, match="non-finite"):
        load_checkpoint(ck)


def test_run_folder_falls_back_to_the_newest_intact_checkpoint(tmp_path):
    run = tmp_path / "run"
    _toy_checkpoint(run / "checkpoints" / "step_0000001", 1)
    new = _toy_checkpoint(run / "checkpoints" / "step_0000002", 2)
    data = (new / "ema.safetensors").read_bytes()
    (new / "ema.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.warns(CheckpointWarning, match="skipped step_0000002: ema.safetensors is truncated"):
        assert find_checkpoint(run).name == "step_0000001"
    (new / "ema.safetensors").write_bytes(data[:-4] + bytes(4))  # same size, other bytes
    with pytest.warns(CheckpointWarning, match="SHA-256"):
        assert find_checkpoint(run).name == "step_0000001"
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(new)


def test_killed_checkpoint_write_leaves_nothing_after_the_next_write(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    dead = _dead_pid()
    for name in (f".step_0000003.writing-{dead}-0123abcd", f".step_0000002.tmp-{dead}"):  # this and older releases
        (folder / name).mkdir()
        (folder / name / "ema.safetensors").write_bytes(b"partial")
    _toy_checkpoint(folder / "step_0000004", 4)
    assert sorted(p.name for p in folder.iterdir()) == ["step_0000004"]


def test_resume_falls_back_and_refuses_other_data(tmp_path, capsys):
    store, other = tmp_path / "a.zarr", tmp_path / "b.zarr"
    _store(store, 4)
    _store(other, 4, seed=5)
    run = tmp_path / "run"
    base = ["train", "--data", str(store), "--out", str(run), "--image-size", "32", "--batch-size", "2",
            "--warmup", "0", "--checkpoint-every", "1", "--keep-checkpoints", "2", "--split", "all", "--threads", "1"]
    assert main(base + ["--steps", "2"]) == 0
    newest = run / "checkpoints" / "step_0000002" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])
    capsys.readouterr()
    bad = list(base)
    bad[bad.index(str(store))] = str(other)
    assert main(bad + ["--resume", "--steps", "3"]) == 2
    err = capsys.readouterr().err
    assert "--data" in err and "another store" in err and "step_0000001" in err
    assert main(base + ["--resume", "--steps", "3", "--image-size", "48"]) == 2
    assert "--image-size 48 (the run used 32)" in capsys.readouterr().err
    assert main(base + ["--resume", "--steps", "3"]) == 0
    err = capsys.readouterr().err
    assert "resuming from step_0000001" in err and "skipped step_0000002: model.safetensors is truncated" in err
    assert (run / "checkpoints" / "step_0000003").is_dir()


def test_checkpoint_on_a_full_disk_is_one_line_naming_the_checkpoint(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    import nucsynth.checkpoint as ck

    def full(*a, **k):  # what safetensors raises on ENOSPC: its own type, the errno in the text
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(ck, "_save_tensors", full)
    with pytest.raises(outputs.OutputError, match=r"cannot write .*step_0000001: the disk is full \(no checkpoint"):
        _toy_checkpoint(tmp_path / "step_0000001")
    assert list(tmp_path.iterdir()) == []  # no temporary folder left


def test_version_1_store_is_read_and_repair_upgrades_it(tmp_path):
    import shutil

    from nucsynth.io import FormatError

    p = tmp_path / "s.zarr"
    samples = _store(p)
    # what earlier releases wrote: version 1, no checksum table
    shutil.rmtree(p / "checksums")
    meta = json.loads((p / "zarr.json").read_text())
    meta["attributes"]["nucsynth_store"]["version"] = 1
    (p / "zarr.json").write_text(json.dumps(meta))
    for a, b in zip(samples, DatasetStore.open(p)):
        assert_same(a, b)
    with DatasetStore.open(p, mode="a") as st, pytest.raises(FormatError, match="version 1.*--repair"):
        st.append(make_samples(1))
    assert main(["check", str(p)]) == 0  # readable: nothing to drop, only an upgrade to offer
    assert main(["check", str(p), "--repair", "--yes"]) == 0
    st = DatasetStore.open(p)
    assert st.version == 2 and st.check().ok and len(st) == 6
    for a, b in zip(samples, st):
        assert_same(a, b)
