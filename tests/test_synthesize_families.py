"""`nucsynth synthesize` for the joint and structure families, and `nucsynth train
--condition`, with tiny untrained checkpoints saved by the tests (2 steps, 32 px)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from nucsynth.checkpoint import read_config, save_checkpoint
from nucsynth.cli import main
from nucsynth.generate.tissue import procedural_sample
from nucsynth.io.store import DatasetStore
from nucsynth.layout import CONSEP_CLASSES, Layout
from nucsynth.models.joint import JointModel
from nucsynth.models.semantic import SemanticModel
from nucsynth.models.structure import StructureModel
from nucsynth.nets.text import prompt_from_layout

SIZE = 32
POINTS = [(6.0, 8.0, 1), (20.0, 10.0, 2), (16.0, 24.0, 3), (26.0, 27.0, 2)]  # y, x, class


def _save(tmp_path_factory, name: str, model) -> str:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / name
    save_checkpoint(path, model, model.build_network(), step=0)
    return str(path)


@pytest.fixture(scope="module")
def joint_ckpt(tmp_path_factory) -> str:
    return _save(tmp_path_factory, "joint", JointModel.from_preset("tiny", SIZE, CONSEP_CLASSES))


@pytest.fixture(scope="module")
def structure_ckpt(tmp_path_factory) -> str:
    return _save(tmp_path_factory, "structure", StructureModel.from_preset("tiny", SIZE))


@pytest.fixture(scope="module")
def stage2_ckpt(tmp_path_factory) -> str:
    return _save(tmp_path_factory, "stage2", SemanticModel.from_preset("tiny", SIZE, CONSEP_CLASSES, condition="structure"))


@pytest.fixture(scope="module")
def semantic_ckpt(tmp_path_factory) -> str:
    return _save(tmp_path_factory, "semantic", SemanticModel.from_preset("tiny", SIZE, CONSEP_CLASSES))


def _write_csv(path, header="y,x,class", names=False) -> None:
    cols = header.split(",")
    lines = [header]
    for y, x, c in POINTS:
        vals = {"y": str(y), "x": str(x), "class": CONSEP_CLASSES.names[c - 1] if names else str(c)}
        lines.append(",".join(vals[k] for k in cols))
    path.write_text("\ufeff" * names + "\n".join(lines) + "\n", encoding="utf-8")  # with names: a BOM too


def _common(ckpt: str, out) -> list[str]:
    # guidance 0: one network pass per step keeps these CPU tests short
    return ["synthesize", "--checkpoint", ckpt, "--steps", "2", "--seed", "3", "--guidance", "0", "--device", "cpu",
            "--out", str(out)]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: threads only contend on a shared CPU
    yield
    torch.set_num_threads(n)


def _assert_nuclei_at_points(layout: Layout, points) -> None:
    """Nucleus i is grown from point i: it is empty (centroid = the point) or holds a pixel
    within the watershed's 2 px snap radius of the point."""
    assert layout.num_nuclei == len(points)
    for i, (y, x, _) in enumerate(points):
        ys, xs = np.nonzero(layout.inst_map == i + 1)
        if ys.size == 0:
            assert np.allclose(layout.centroids[i], (y, x))
        else:
            assert np.min(np.hypot(ys - y, xs - x)) <= 2.0 + 1e-9


@pytest.mark.parametrize("header,names", [("y,x,class", False), ("x,y,class", True)])
def test_joint_from_csv_points(joint_ckpt, tmp_path, header, names) -> None:
    csv = tmp_path / "points.csv"
    _write_csv(csv, header, names)
    out = tmp_path / "joint.zarr"
    args = _common(joint_ckpt, out) + ["--layouts", str(csv), "--size", f"{SIZE},{SIZE}", "--class-source", "points"]
    assert main(args) == 0
    store = DatasetStore.open(out)
    assert len(store) == 1 and store.attrs["family"] == "joint" and store.attrs["mode"] == "points"
    s = store[0]
    assert s.image.shape == (SIZE, SIZE, 3) and s.image.dtype == np.uint8
    _assert_nuclei_at_points(s.layout, POINTS)
    assert s.layout.classes.tolist() == [c for _, _, c in POINTS]  # --class-source points keeps them
    p = s.provenance
    assert p["source"] == str(csv) and p["checkpoint"] == str(joint_ckpt) and p["seed"] == 3 and p["steps"] == 2
    expected = prompt_from_layout(Layout.from_points((SIZE, SIZE), [(y, x) for y, x, _ in POINTS],
                                                     [c for _, _, c in POINTS], CONSEP_CLASSES))
    assert p["prompt"] == expected  # default: the layout's own templated prompt


def test_joint_from_store_centroids_with_prompt(joint_ckpt, tmp_path) -> None:
    src = tmp_path / "src.zarr"
    store = DatasetStore.create(src, CONSEP_CLASSES)
    samples = [procedural_sample((SIZE, SIZE), seed=i) for i in range(3)]
    store.append(samples)
    prompt = prompt_from_layout(Layout.from_points((SIZE, SIZE), [(5.0, 5.0)], [2], CONSEP_CLASSES))
    out = tmp_path / "joint.zarr"
    assert main(_common(joint_ckpt, out) + ["--layouts", str(src), "--prompt", prompt, "--batch-size", "2"]) == 0
    res = DatasetStore.open(out)
    assert len(res) == 3
    for i in range(3):
        pts = [(y, x, c) for (y, x), c in zip(samples[i].layout.centroids, samples[i].layout.classes)]
        _assert_nuclei_at_points(res[i].layout, pts)
        assert res[i].provenance["prompt"] == prompt and res[i].provenance["source_index"] == i


def test_joint_from_geojson_points(joint_ckpt, tmp_path) -> None:
    geo = tmp_path / "points.geojson"
    feats = [{"type": "Feature", "geometry": {"type": "Point", "coordinates": [x + 0.5, y + 0.5]},
              "properties": {"classification": {"name": CONSEP_CLASSES.names[c - 1]}}} for y, x, c in POINTS]
    geo.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    out = tmp_path / "joint.zarr"
    args = _common(joint_ckpt, out) + ["--layouts", str(geo), "--size", str(SIZE), "--class-source", "points"]
    assert main(args) == 0
    s = DatasetStore.open(out)[0]
    _assert_nuclei_at_points(s.layout, POINTS)
    assert s.layout.classes.tolist() == [c for _, _, c in POINTS]


def test_joint_errors(joint_ckpt, tmp_path, capsys) -> None:
    out = tmp_path / "x.zarr"
    assert main(_common(joint_ckpt, out)) == 2
    assert "a joint checkpoint needs point layouts" in capsys.readouterr().err
    assert main(_common(joint_ckpt, out) + ["--count", "2"]) == 2
    assert "--count" in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    bad.write_text("row,col,type\n1,2,1\n")
    assert main(_common(joint_ckpt, out) + ["--layouts", str(bad)]) == 2
    assert "must name the columns y, x and class" in capsys.readouterr().err
    off = tmp_path / "off.csv"
    off.write_text("y,x,class\n4,40,1\n")
    assert main(_common(joint_ckpt, out) + ["--layouts", str(off)]) == 2
    err = capsys.readouterr().err
    assert "off.csv line 2" in err and "outside the 32x32 canvas" in err
    unknown = tmp_path / "unknown.csv"
    unknown.write_text("y,x,class\n4,4,mitotic\n")
    assert main(_common(joint_ckpt, out) + ["--layouts", str(unknown)]) == 2
    assert "'mitotic'" in capsys.readouterr().err
    assert not out.exists()


def test_structure_count_with_stage2_image_model(structure_ckpt, stage2_ckpt, tmp_path) -> None:
    out = tmp_path / "structure.zarr"
    args = _common(structure_ckpt, out) + ["--count", "3", "--batch-size", "2", "--image-checkpoint", stage2_ckpt]
    assert main(args) == 0
    store = DatasetStore.open(out)
    assert len(store) == 3 and store.attrs["family"] == "structure" and store.attrs["count"] == 3
    assert store.attrs["image_checkpoint"] == stage2_ckpt
    for i in range(3):
        s = store[i]
        assert s.image.shape == (SIZE, SIZE, 3) and s.layout.shape == (SIZE, SIZE)
        assert (s.layout.classes == 0).all()  # structures carry no classes
        p = s.provenance
        assert p["index"] == i and p["checkpoint"] == structure_ckpt and p["image_checkpoint"] == stage2_ckpt
        assert len(p["checkpoint_sha256"]) == len(p["image_checkpoint_sha256"]) == 64
        assert p["seed"] == 3 + i and p["guidance"] == 0.0  # one seed per sample, not per batch


def test_structure_errors(structure_ckpt, semantic_ckpt, stage2_ckpt, tmp_path, capsys) -> None:
    out = tmp_path / "x.zarr"
    assert main(_common(structure_ckpt, out) + ["--image-checkpoint", stage2_ckpt]) == 2
    assert "give --count N" in capsys.readouterr().err
    assert main(_common(structure_ckpt, out) + ["--count", "1"]) == 2
    assert "--image-checkpoint" in capsys.readouterr().err
    assert main(_common(structure_ckpt, out) + ["--count", "1", "--image-checkpoint", semantic_ckpt]) == 2
    assert "condition 'layout'" in capsys.readouterr().err
    assert main(_common(structure_ckpt, out) + ["--count", "1", "--image-checkpoint", stage2_ckpt,
                                                "--size", "33,33"]) == 2
    assert "multiple of" in capsys.readouterr().err
    assert main(_common(structure_ckpt, out) + ["--count", "1", "--image-checkpoint", stage2_ckpt, "--limit", "1"]) == 2
    assert "--limit" in capsys.readouterr().err
    assert not out.exists()


def test_semantic_checkpoint_refuses_family_options(semantic_ckpt, tmp_path, capsys) -> None:
    out = tmp_path / "x.zarr"
    assert main(_common(semantic_ckpt, out) + ["--count", "2"]) == 2
    err = capsys.readouterr().err
    assert "--count" in err and "'semantic' model" in err and "structure" in err
    src = tmp_path / "src.zarr"
    DatasetStore.create(src, CONSEP_CLASSES).append([procedural_sample((SIZE, SIZE), seed=0)])
    assert main(_common(semantic_ckpt, out) + ["--layouts", str(src), "--prompt", "x"]) == 2
    assert "--prompt" in capsys.readouterr().err
    assert main(_common(semantic_ckpt, out) + ["--layouts", str(src), "--class-source", "points"]) == 2
    assert "--class-source" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.slow
def test_train_condition_structure(tmp_path) -> None:
    src = tmp_path / "src.zarr"
    DatasetStore.create(src, CONSEP_CLASSES).append([procedural_sample((SIZE, SIZE), seed=i) for i in range(2)])
    run = tmp_path / "run"
    base = ["train", "--data", str(src), "--split", "all", "--out", str(run), "--image-size", str(SIZE),
            "--steps", "2", "--batch-size", "2", "--warmup", "1", "--threads", "1", "--device", "cpu"]
    assert main(base + ["--family", "semantic", "--condition", "structure"]) == 0
    cfg = read_config(run)
    assert cfg["model"]["condition"] == "structure" and cfg["model"]["network"]["cond_channels"] == 3
    assert main(base + ["--resume", "--condition", "layout", "--steps", "3"]) == 2
    assert main(["train", "--family", "structure", "--condition", "structure", "--data", str(src),
                 "--out", str(tmp_path / "r2"), "--image-size", str(SIZE)]) == 2
