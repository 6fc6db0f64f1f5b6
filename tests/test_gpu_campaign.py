"""The GPU campaign (benchmarks/gpu_campaign.py): its data pack, and its dry run on CPU.

The dry run is the campaign itself at tiny sizes: every section runs (sampler checks of
every family against the CPU reference, speed, training with exports, previews) in a fresh
interpreter that refuses zarr, dask, napari and open_clip as the GPU machine lacks them.
It reads a pack of real CoNSeP training tiles when ../shared/data is present, else a small
procedural one, so it never skips.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_campaign.py"
SHARED_CONSEP = Path(os.environ.get("NUCSYNTH_SHARED_DATA", ROOT.parent / "shared" / "data")) / "consep256" / "Train"


@pytest.fixture(scope="module")
def gc():
    spec = importlib.util.spec_from_file_location("gpu_campaign", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_campaign"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("gpu_campaign", None)


def _synthetic_samples(n: int = 6, size: int = 64):
    from nucsynth.generate.tissue import procedural_sample

    samples = [procedural_sample((size, size), seed=i) for i in range(n)]
    for i, s in enumerate(samples):
        s.provenance["tile"] = f"synthetic_{i // 2}"
    return samples


def _mini_consep(tmp: Path, tiles: list[str]) -> Path:
    """A CoNSeP folder of a few real tiles (links to ../shared/data; nothing is copied)."""
    for sub, ext in (("Labels", ".mat"), ("Images", ".jpg")):
        (tmp / sub).mkdir(parents=True)
        for f in sorted((SHARED_CONSEP / sub).glob(f"*{ext}")):
            if f.stem.rsplit("_", 1)[0] in tiles:
                (tmp / sub / f.name).symlink_to(f)
    return tmp


@pytest.fixture(scope="module")
def pack(gc, tmp_path_factory) -> Path:
    """Real training tiles when the shared data is there, else procedural samples."""
    path = tmp_path_factory.mktemp("pack") / "pack.npz"
    if SHARED_CONSEP.is_dir():
        folder = _mini_consep(tmp_path_factory.mktemp("consep"), ["train_1", "train_3", "train_4"])
        meta = gc.build_pack(folder, path)
        assert len(meta["val_tiles_left_out"]) == 1 and meta["patches"] == 32
    else:
        gc.write_pack(_synthetic_samples(), path, {"source": "procedural", "split": "train"})
    return path


def test_pack_round_trip(gc, tmp_path, one_torch_thread):
    samples = _synthetic_samples(3, 48)
    path = gc.write_pack(samples, tmp_path / "p.npz", {"source": "procedural"})
    back, meta = gc.read_pack(path)
    assert meta["source"] == "procedural" and len(back) == 3
    for a, b in zip(samples, back):
        assert np.array_equal(a.image, b.image)
        assert np.array_equal(a.layout.inst_map, b.layout.inst_map)
        assert np.array_equal(a.layout.classes, b.layout.classes)
        assert np.allclose(a.layout.centroids, b.layout.centroids)
        assert b.provenance["tile"] == a.provenance["tile"]
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="not a GPU data pack"):
        gc.read_pack(tmp_path / "other.npz")
    with pytest.raises(FileNotFoundError, match="--pack"):
        gc.read_pack(tmp_path / "missing.npz")


def test_pack_keeps_only_training_tiles(gc, tmp_path):
    if not SHARED_CONSEP.is_dir():
        pytest.skip(f"real data not found at {SHARED_CONSEP}")
    from nucsynth.commands.prepare import split_groups

    tiles = ["train_1", "train_3", "train_4"]
    folder = _mini_consep(tmp_path / "consep", tiles)
    meta = gc.build_pack(folder, tmp_path / "p.npz")
    split = split_groups(tiles, 0.2, 0)  # what `nucsynth prepare` decides for these tiles
    assert meta["val_tiles_left_out"] == [t for t in tiles if split[t] == "val"]
    samples, _ = gc.read_pack(tmp_path / "p.npz")
    assert {s.provenance["tile"] for s in samples} == {t for t in tiles if split[t] == "train"}
    # the images are the JPEG files' own bytes: decoded they are what the reader gives
    from nucsynth.io.consep import read_consep_file

    first = sorted((folder / "Labels").glob(f"{samples[0].provenance['tile']}_*.mat"))[0]
    ref = read_consep_file(first)
    assert np.array_equal(ref.image, samples[0].image)
    assert np.array_equal(ref.layout.inst_map, samples[0].layout.inst_map)


def test_refusals_are_one_line_and_leave_nothing(gc, pack, tmp_path, capsys):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    assert gc.main(["--dry-run", "--pack-file", str(pack), "--out", str(busy)]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert (busy / "keep.txt").read_text() == "mine"
    out = tmp_path / "out"
    assert gc.main(["--dry-run", "--pack-file", str(tmp_path / "none.npz"), "--out", str(out)]) == 2
    assert "--pack" in capsys.readouterr().err and not out.exists()
    # a model whose weights could not come back through the 16 MB per-file limit
    assert gc.main(["--dry-run", "--pack-file", str(pack), "--out", str(out), "--semantic-preset", "base"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--semantic-preset base" in err and "16 MB" in err and len(err.splitlines()) == 1 and not out.exists()


def test_refuses_what_the_gpu_machine_lacks(gc):
    hook = gc._Refuse()
    for name in ("zarr", "dask.array", "napari", "open_clip"):
        with pytest.raises(ModuleNotFoundError, match="must not import"):
            hook.find_spec(name, None)
    assert hook.find_spec("numpy", None) is None


def test_dry_run(pack, tmp_path):
    out = tmp_path / "campaign"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--pack-file", str(pack), "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    fig = json.loads((out / "figures.json").read_text())
    assert fig["errors"] == []

    # 1. every family, both precisions, against the CPU reference; attention kernel named
    cases = fig["correctness"]["cases"]
    families = {c["family"] for c in cases if not c["family"].startswith("network pass")}
    assert families == {"semantic", "semantic-latent", "semantic-structure", "structure", "joint"}
    assert {(c["family"], c["precision"]) for c in cases} >= {(f, p) for f in families for p in ("fp32", "bf16")}
    assert all(c["passed"] for c in cases) and fig["correctness"]["passed"]
    fp32 = [c for c in cases if c["precision"] == "fp32" and "image_mean" in c]
    assert all(c["image_mean"] == 0.0 for c in fp32)  # CPU vs CPU in fp32: the same pixels
    bf16 = [c for c in cases if c["precision"] == "bf16" and "image_mean" in c]
    assert all(c["image_mean"] > 0 for c in bf16)  # bf16 really ran: pixels moved
    assert all(c["image_std_ref"] > 5 for c in bf16)  # and the compared images are not flat
    passes = [c for c in cases if c["family"].startswith("network pass")]
    assert passes and all(c["sdpa_kernels"] for c in passes)

    # 2. speed: patches/s at the best batch, latency, FLOPs; training images/s
    speed = fig["speed"]
    assert {c["config"] for c in speed["configs"]} == {"pixel-tiny", "latent-tiny"}
    for c in speed["configs"]:
        assert c["patches_per_s"] > 0 and c["preview_latency_s"] > 0 and c["flops_per_patch"] > 0
        assert c["best_batch"] in [t["batch"] for t in c["trials"]]
    latent = next(c for c in speed["configs"] if c["config"] == "latent-tiny")
    pixel = next(c for c in speed["configs"] if c["config"] == "pixel-tiny")
    assert latent["flops_per_patch"] < pixel["flops_per_patch"]
    assert all(r["images_per_s"] > 0 for r in speed["training_images_per_s"])

    # 3. training: the probe, then an exact resume to the planned steps; exports returned
    tr = fig["training"]
    assert tr["autoencoder"]["checkpoint_step"] == tr["semantic"]["checkpoint_step"] == 3
    assert fig["segmenter"]["step"] == 3

    # 4. the output folder: within the returned-file limits; the exports load and render
    files = [p for p in out.iterdir() if p.is_file()]
    assert {p.name for p in files} >= {"figures.json", "campaign.log", "previews.png", "segmenter.tar"}
    assert len(files) <= 8 and not [p for p in out.iterdir() if p.is_dir()]
    assert max(p.stat().st_size for p in files) <= 16 * 2**20 and sum(p.stat().st_size for p in files) <= 64 * 2**20
    unpacked = tmp_path / "unpacked"
    for t in out.glob("*.tar"):
        with tarfile.open(t) as tar:
            tar.extractall(unpacked, filter="data")
    from nucsynth.checkpoint import load_checkpoint
    from nucsynth.evaluate.segmenter import load_segmenter
    from nucsynth.generate.layouts import random_layout

    model, net = load_checkpoint(unpacked / "semantic")
    assert model.is_latent and model.step == 3
    assert next(net.parameters()).dtype.is_floating_point
    lay = random_layout((32, 32), seed=0)
    [sample] = model.sample([lay], steps=2, seed=0)  # finds its bundled autoencoder (content hash checked)
    assert sample.image.shape == (32, 32, 3)
    seg, cs, extra = load_segmenter(unpacked / "segmenter")
    assert extra["step"] == 3 and cs.num_classes == seg.config.num_classes
