"""Downstream protocol and label fidelity, end to end on tiny stores with tiny settings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from nucsynth.cli import main
from nucsynth.evaluate import downstream as D
from nucsynth.evaluate.segmenter import HoVerSegmenter, SegmenterConfig, save_segmenter
from nucsynth.generate.tissue import procedural_sample
from nucsynth.layout import CONSEP_CLASSES, NUCLEUS_CLASSES


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    from nucsynth.io.store import DatasetStore

    root = tmp_path_factory.mktemp("eval")
    real = DatasetStore.create(root / "real.zarr", CONSEP_CLASSES)
    real.append([procedural_sample((48, 48), seed=s) for s in range(4)], splits="train")
    real.append([procedural_sample((48, 48), seed=s) for s in range(10, 12)], splits="val")
    syn = DatasetStore.create(root / "syn.zarr", CONSEP_CLASSES)
    syn.append([procedural_sample((48, 48), seed=s) for s in range(20, 22)], splits="train")
    return root / "real.zarr", root / "syn.zarr"


def test_subsets_and_concatenation():
    a = D.subset_indices(10, 0.3, seed=1)
    assert len(a) == 3 and np.array_equal(a, D.subset_indices(10, 0.3, seed=1)) and len(set(a)) == 3
    assert len(D.subset_indices(10, 0.01, seed=0)) == 1
    with pytest.raises(ValueError, match="fractions"):
        D.subset_indices(10, 1.5, seed=0)
    xs = [procedural_sample((16, 16), seed=s) for s in range(3)]
    cat = D.ConcatSamples(xs[:1], [], xs[1:])
    assert len(cat) == 3 and cat[2] is xs[2] and cat[-1] is xs[2] and list(cat) == xs
    other = procedural_sample((16, 16), class_set=NUCLEUS_CLASSES, seed=0)
    with pytest.raises(ValueError, match="class sets"):
        D.ConcatSamples(xs, [other])


def _run_downstream(real: Path, out: Path, *extra: str) -> dict:
    rc = main(["evaluate", "downstream", "--real", str(real), "--steps", "1", "--batch-size", "2", "--crop", "32",
               "--out", str(out), "--device", "cpu", *extra])
    assert rc == 0
    return json.loads((out / "downstream.json").read_text())


@pytest.mark.slow
def test_downstream_end_to_end_and_deterministic(stores, tmp_path):
    real, syn = stores
    first = _run_downstream(real, tmp_path / "a", "--fractions", "0.5,1.0", "--seeds", "2")
    runs = first["runs"]
    assert len(runs) == 2 * 2 and {r["setting"] for r in runs} == {"real"}  # fractions x seeds
    by = {(r["fraction"], r["seed"]): r for r in runs}
    assert by[(0.5, 0)]["train_patches"] == 2 and by[(1.0, 1)]["train_patches"] == 4
    for key in ("dice", "aji", "dq", "sq", "pq", "f_d", "acc", "f1_other", "f1_spindle"):
        assert key in runs[0]
    assert len(first["summary"]) == 2 and first["summary"][0]["seeds"] == 2
    md = (tmp_path / "a" / "downstream.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert len(table) == 2 + 2 and "±" in md and "Paired" not in md  # header, rule, 2 rows; nothing to pair
    second = _run_downstream(real, tmp_path / "b", "--synthetic", str(syn), "--fractions", "0.5", "--seeds", "1")
    both = {r["setting"]: r for r in second["runs"]}
    assert both["real+synthetic"]["train_patches"] == 4 and "real+synthetic" in (tmp_path / "b" / "downstream.md").read_text()
    assert both["real"] == by[(0.5, 0)]  # same fraction and seed in another invocation: same result


def test_downstream_refuses_bad_arguments(stores, tmp_path):
    real, _ = stores
    base = ["evaluate", "downstream", "--real", str(real), "--out", str(tmp_path / "x")]
    assert main(base + ["--fractions", "0,1"]) == 2
    assert main(base + ["--fractions", "a"]) == 2
    assert main(base + ["--test-split", "nope"]) == 2
    assert main(base + ["--seeds", "0"]) == 2


def test_fidelity_scores_each_sample(stores, tmp_path):
    _, syn = stores
    cfg = SegmenterConfig(num_classes=4, widths=(8, 16), steps=1)
    model = save_segmenter(tmp_path / "seg", HoVerSegmenter(cfg), CONSEP_CLASSES)
    rc = main(["evaluate", "fidelity", str(syn), "--model", str(model), "--out", str(tmp_path / "fid"),
               "--min-score", "0.5", "--device", "cpu"])
    assert rc == 0
    res = json.loads((tmp_path / "fid" / "fidelity.json").read_text())
    assert res["n_samples"] == 2 and len(res["per_sample"]) == 2
    for r in res["per_sample"]:
        assert 0.0 <= r["score"] <= 1.0
    # an untrained segmenter finds (almost) nothing: every sample is flagged
    assert res["below_min_score"] == [0, 1]


def test_fidelity_of_a_perfect_segmentation_is_one(monkeypatch):
    xs = [procedural_sample((48, 48), seed=s) for s in range(2)]
    monkeypatch.setattr(D, "predict_layouts", lambda net, images, cs, **kw: [s.layout for s in xs[: len(images)]])
    res = D.fidelity(xs, net=None)  # type: ignore[arg-type]
    assert [r["score"] for r in res["per_sample"]] == [1.0, 1.0]
    assert res["summary"]["pq"] == 1.0
