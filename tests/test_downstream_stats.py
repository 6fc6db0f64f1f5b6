"""Downstream statistics (spread, paired intervals, verdicts), leakage refusal, k-means
labelled subsets and fidelity relative to real images."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from nucsynth.cli import main
from nucsynth.evaluate import downstream as D
from nucsynth.evaluate import subsets as K
from nucsynth.generate.tissue import procedural_sample
from nucsynth.layout import CONSEP_CLASSES


# ---------------------------------------------------------------------------- statistics
def test_paired_interval_is_the_student_t_interval():
    from scipy import stats

    d = [0.03, -0.01, 0.02, 0.05]
    iv = D.paired_interval(d, 0.95)
    ref = stats.ttest_1samp(d, 0.0).confidence_interval(0.95)
    assert iv["mean"] == pytest.approx(np.mean(d)) and iv["n"] == 4
    assert (iv["low"], iv["high"]) == pytest.approx((ref.low, ref.high))
    assert D.verdict(iv) == "within noise"
    assert D.verdict(D.paired_interval([0.10, 0.11, 0.12])) == "better"
    assert D.verdict(D.paired_interval([-0.10, -0.11, -0.12])) == "worse"
    one = D.paired_interval([0.2])
    assert one["mean"] == 0.2 and math.isnan(one["low"]) and D.verdict(one) == "n/a"
    assert D.paired_interval([float("nan"), 0.1, 0.3])["n"] == 2
    with pytest.raises(ValueError, match="confidence"):
        D.paired_interval(d, 1.0)


def _runs(real: list[float], synth: list[float]) -> list[dict]:
    rows = []
    for seed, (a, b) in enumerate(zip(real, synth)):
        rows.append({"fraction": 0.1, "seed": seed, "setting": "real", "train_patches": 3, "pq": a, "f1_other": 0.0,
                     "empty_patches": 1})
        rows.append({"fraction": 0.1, "seed": seed, "setting": "real+synthetic", "train_patches": 5, "pq": b,
                     "f1_other": float("nan") if seed == 0 else 0.1, "empty_patches": 0})
    return rows


def test_summary_uses_the_sample_spread_and_pairs_by_seed():
    runs = _runs([0.30, 0.32, 0.34], [0.32, 0.341, 0.359])
    summary = {r["setting"]: r for r in D.summarize(runs)}
    assert summary["real"]["pq"]["mean"] == pytest.approx(0.32)
    assert summary["real"]["pq"]["std"] == pytest.approx(np.std([0.30, 0.32, 0.34], ddof=1))
    assert summary["real+synthetic"]["f1_other"]["n"] == 2  # the NaN seed is skipped
    assert "empty_patches" not in summary["real"]
    (paired,) = D.paired_differences(runs)
    assert paired["pairs"] == 3
    assert paired["pq"]["mean"] == pytest.approx(np.mean([0.02, 0.021, 0.019]))
    assert paired["pq"]["verdict"] == "better"  # consistent gains, however small, are seen as such
    noisy = D.paired_differences(_runs([0.30, 0.32, 0.34], [0.31, 0.34, 0.35]))[0]
    assert noisy["pq"]["verdict"] == "within noise"  # +0.013 on average, but 3 seeds cannot tell
    md = D.downstream_markdown({"summary": D.summarize(runs), "paired": D.paired_differences(runs)})
    assert "0.3200 ± 0.0200" in md and "Paired difference" in md and "better" in md
    assert "within noise" in md  # the legend is always there
    assert D.paired_differences([r for r in runs if r["setting"] == "real"]) == []


# ---------------------------------------------------------------------------- leakage
def _checkpoint(path: Path, data: dict | None) -> str:
    path.mkdir(parents=True)
    cfg = {"format": "nucsynth-checkpoint", "format_version": 1, "family": "semantic", "model": {}}
    if data is not None:
        cfg["data"] = data
    (path / "config.json").write_text(json.dumps(cfg))
    return str(path)


def test_leakage_from_layouts_and_models(tmp_path):
    groups = {"train": ["t1", "t2"], "val": ["t9"]}
    clean = _checkpoint(tmp_path / "clean", {"kind": "store", "split": "train", "store": {"split_groups": groups}})
    dirty = _checkpoint(tmp_path / "dirty", {"kind": "store", "split": "all", "store": {"split_groups": groups}})
    folder = _checkpoint(tmp_path / "folder", {"kind": "source", "path": "/data/consep", "count": 432})
    ev = {"t9"}
    assert D.leakage([{"source_tile": "t1", "checkpoint": clean}, {"checkpoint": clean}], ev) == []
    (msg,) = D.leakage([{"source_tile": "t9", "checkpoint": clean}, {"source_tile": "t9", "checkpoint": clean}], ev)
    assert "layout of evaluation tile 't9'" in msg
    (msg,) = D.leakage([{"source_tile": "t1", "checkpoint": dirty}], ev)
    assert "was trained on evaluation tiles ['t9']" in msg
    (msg,) = D.leakage([{"checkpoint": folder}], ev)
    assert "does not record which tiles" in msg
    (msg,) = D.leakage([{"image_checkpoint": str(tmp_path / "gone")}], ev)
    assert "cannot be read" in msg
    assert D.model_training_tiles(clean) == {"t1", "t2"} and D.model_training_tiles(dirty) == {"t1", "t2", "t9"}


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    from nucsynth.io.store import DatasetStore

    root = tmp_path_factory.mktemp("leak")
    real = DatasetStore.create(root / "real.zarr", CONSEP_CLASSES)

    def tiled(seed: int, tile: str):
        s = procedural_sample((48, 48), seed=seed)
        s.provenance["tile"] = tile
        return s

    real.append([tiled(s, f"t{s % 2}") for s in range(6)], splits="train")
    real.append([tiled(s, "t9") for s in range(10, 12)], splits="val")
    syn = DatasetStore.create(root / "syn.zarr", CONSEP_CLASSES)
    leaky = [tiled(s, "x") for s in (20, 21)]
    for s in leaky:
        s.provenance["source_tile"] = "t9"
    syn.append(leaky)
    return root / "real.zarr", root / "syn.zarr"


def test_downstream_refuses_a_leaky_synthetic_set_unless_told(stores, tmp_path):
    real, syn = stores
    base = ["evaluate", "downstream", "--real", str(real), "--synthetic", str(syn), "--steps", "1", "--batch-size", "2",
            "--crop", "32", "--fractions", "0.5", "--seeds", "1", "--device", "cpu", "--threads", "1"]
    assert main(base + ["--out", str(tmp_path / "a")]) == 2
    assert not (tmp_path / "a" / "downstream.json").exists()
    assert main(base + ["--out", str(tmp_path / "b"), "--allow-leakage"]) == 0
    res = json.loads((tmp_path / "b" / "downstream.json").read_text())
    assert res["leakage"] and "evaluation tile 't9'" in res["leakage"][0]
    assert len(res["paired"]) == 1 and res["paired"][0]["pairs"] == 1


# ---------------------------------------------------------------------------- k-means subsets
def test_kmeans_subsets_cover_the_clusters_in_proportion():
    rng = np.random.default_rng(0)
    centres = np.array([[0, 0], [10, 0], [0, 10]], float)
    sizes = (30, 20, 10)
    x = np.concatenate([c + rng.normal(0, 0.5, (n, 2)) for c, n in zip(centres, sizes)])
    got = K.kmeans_subsets(x, [0.1, 0.5, 1.0], k=3, seed=0)
    assert [len(got[f]) for f in (0.1, 0.5, 1.0)] == [6, 30, 60]
    cluster = np.repeat([0, 1, 2], sizes)
    assert np.bincount(cluster[got[0.1]], minlength=3).tolist() == [3, 2, 1]  # in proportion to size
    # within a cluster, the patches nearest its centre come first
    first = got[0.1][cluster[got[0.1]] == 0]
    d = np.linalg.norm(x[:30] - x[:30].mean(0), axis=1)
    assert set(first) <= set(np.argsort(d)[:6])
    again = K.kmeans_subsets(x, [0.1], k=3, seed=0)
    assert np.array_equal(again[0.1], got[0.1])
    with pytest.raises(ValueError, match="k must be in 1..60"):
        K.kmeans_subsets(x, [0.1], k=61)
    with pytest.raises(ValueError, match="fractions must lie"):
        K.kmeans_subsets(x, [0.0])


def test_patch_features_describe_stain_and_texture():
    a = procedural_sample((48, 48), seed=0).image
    pale = (255 - (255 - a.astype(int)) // 3).astype(np.uint8)
    f = K.patch_features([a, pale])
    assert f.shape == (2, 2 * (2 + K.HIST_BINS) + 1)
    assert f[1, 0] < f[0, 0] and f[1, -1] < f[0, -1]  # less haematoxylin, less texture
    with pytest.raises(ValueError, match="uint8"):
        K.patch_features([a.astype(float)])


def test_subsets_command_feeds_downstream(stores, tmp_path):
    real, _ = stores
    out = tmp_path / "subsets.json"
    assert main(["evaluate", "subsets", "--data", str(real), "--fractions", "0.5", "--clusters", "2", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["n"] == 6 and len(doc["subsets"]["0.5"]) == 3
    assert main(["evaluate", "subsets", "--data", str(real), "--out", str(out)]) == 2  # no overwrite without asking
    run = ["evaluate", "downstream", "--real", str(real), "--steps", "1", "--batch-size", "2", "--crop", "32",
           "--seeds", "2", "--device", "cpu", "--threads", "1", "--subsets", str(out)]
    assert main(run + ["--fractions", "0.5", "--out", str(tmp_path / "d")]) == 0
    res = json.loads((tmp_path / "d" / "downstream.json").read_text())
    assert res["subsets"] == "given" and {r["train_patches"] for r in res["runs"]} == {3}
    assert main(run + ["--fractions", "0.2", "--out", str(tmp_path / "e")]) == 2  # a fraction the file lacks


# ---------------------------------------------------------------------------- fidelity
def test_fidelity_relative_to_real_images(monkeypatch):
    xs = [procedural_sample((48, 48), seed=s) for s in range(2)]
    monkeypatch.setattr(D, "predict_layouts", lambda net, images, cs, **kw: [s.layout for s in xs[: len(images)]])
    ref = {"pq": 0.5, "f_d": 0.8, "f1_mean": 0.5, "score": 0.2}
    res = D.fidelity(xs, net=None, reference=ref)  # type: ignore[arg-type]
    assert res["relative"]["pq"] == pytest.approx(2.0) and res["relative"]["score"] == pytest.approx(5.0)
    with pytest.raises(ValueError, match="reference lacks"):
        D.fidelity(xs, net=None, reference={"pq": 0.5})  # type: ignore[arg-type]


def test_fidelity_works_out_of_the_box_with_the_shipped_segmenter(stores, tmp_path, capsys):
    _, syn = stores
    assert main(["evaluate", "fidelity", str(syn), "--out", str(tmp_path / "f"), "--device", "cpu", "--threads", "1"]) == 0
    res = json.loads((tmp_path / "f" / "fidelity.json").read_text())
    assert res["model"] == "shipped" and set(res["relative"]) == {"pq", "f_d", "f1_mean", "score"}
    assert res["reference"]["score"] > 0 and "relative to real images" in capsys.readouterr().out
