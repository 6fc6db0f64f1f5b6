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
    assert set(runs[0]["postprocess"]) >= {"threshold", "sobel_ksize"} and "tuned on its real training subset" in md
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
    assert main(base + ["--tune-every", "-1"]) == 2
    assert main(base + ["--batch-size", "2", "--micro-batches", "4"]) == 2  # more micro-batches than samples
    assert not (tmp_path / "x").exists()


def test_downstream_records_how_its_segmenters_split_a_batch(stores, tmp_path):
    real, _ = stores
    got = _run_downstream(real, tmp_path / "m", "--fractions", "1.0", "--seeds", "1", "--micro-batches", "1",
                          "--tune-every", "0")
    assert got["segmenter"]["micro_batches"] == 1


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


@pytest.mark.slow
def test_an_interrupted_downstream_resumes_to_the_uninterrupted_result(stores, tmp_path, monkeypatch):
    """Kill after the second of four runs, run the same command again: only the two missing
    runs are trained, and downstream.json equals that of a run never interrupted."""
    from nucsynth.outputs import partial_path

    real, syn = stores
    args = ("--synthetic", str(syn), "--fractions", "0.5", "--seeds", "2")
    whole = _run_downstream(real, tmp_path / "whole", *args)
    trained = []
    real_train = D.train_segmenter

    def killed_after_two(*a, **k):
        if len(trained) == 2:
            raise KeyboardInterrupt
        trained.append(k.get("seed"))
        return real_train(*a, **k)

    monkeypatch.setattr(D, "train_segmenter", killed_after_two)
    out = tmp_path / "resumed"
    rc = main(["evaluate", "downstream", "--real", str(real), "--steps", "1", "--batch-size", "2", "--crop", "32",
               "--out", str(out), "--device", "cpu", *args])
    assert rc == 130 and not (out / "downstream.json").exists()
    journal = partial_path(out / "downstream.json")
    assert len(journal.read_text().splitlines()) == 1 + 2  # settings + two finished runs
    trained.clear()
    monkeypatch.setattr(D, "train_segmenter", lambda *a, **k: (trained.append(k.get("seed")), real_train(*a, **k))[1])
    resumed = _run_downstream(real, out, *args)
    assert trained == [1, 1]  # seed 0's two runs were kept from the journal
    assert resumed["runs"] == whole["runs"] and resumed["paired"] == whole["paired"]
    assert not journal.exists()


def test_a_journal_of_a_version_before_micro_batches_resumes_with_one_pass(stores, tmp_path, monkeypatch, capsys):
    """A journal written before segmenter configs had micro_batches (they trained in one
    pass) resumes with --micro-batches 1; the new default is refused, naming the segmenter,
    and the finished run is kept."""
    from nucsynth.outputs import partial_path

    real, _ = stores
    args = ["evaluate", "downstream", "--real", str(real), "--steps", "1", "--batch-size", "2", "--crop", "32",
            "--device", "cpu", "--fractions", "0.5", "--seeds", "2", "--tune-every", "0", "--out", str(tmp_path / "o")]
    real_train = D.train_segmenter

    def killed_after_one(*a, **k):
        if k.get("seed") == 1:
            raise KeyboardInterrupt
        return real_train(*a, **k)

    monkeypatch.setattr(D, "train_segmenter", killed_after_one)
    assert main(args + ["--micro-batches", "1"]) == 130
    journal = partial_path(tmp_path / "o" / "downstream.json")
    lines = journal.read_text().splitlines()
    head = json.loads(lines[0])
    del head["settings"]["segmenter"]["micro_batches"]  # as the earlier version wrote it
    journal.write_text("\n".join([json.dumps(head), *lines[1:]]) + "\n")
    monkeypatch.setattr(D, "train_segmenter", real_train)
    capsys.readouterr()
    assert main(args) == 2  # the default, two micro-batches, would mix results
    assert "differing: segmenter" in capsys.readouterr().err and len(journal.read_text().splitlines()) == 2
    assert main(args + ["--micro-batches", "1"]) == 0
    assert "resuming: 1 run(s) finished earlier" in capsys.readouterr().err
    assert len(json.loads((tmp_path / "o" / "downstream.json").read_text())["runs"]) == 2


def test_the_downstream_journal_refuses_other_settings_and_drops_a_cut_line(tmp_path):
    from nucsynth.outputs import Journal

    path = tmp_path / "out" / ".downstream.json.partial"
    j = Journal(path, {"segmenter": {"steps": 4}, "fractions": (0.5,)})
    assert j.load() == []
    j.append({"seed": np.int64(0), "pq": 0.25, "f1_other": float("nan")})
    j.append({"seed": 1, "pq": 0.5})
    with open(path, "a") as f:
        f.write('{"seed": 2, "pq"')  # a kill in the middle of a line
    rows = Journal(path, {"segmenter": {"steps": 4}, "fractions": [0.5]}).load()
    assert [r["seed"] for r in rows] == [0, 1] and np.isnan(rows[0]["f1_other"])
    assert path.read_text().endswith('"pq": 0.5}\n')  # the cut line is gone, appending is safe again
    with open(path, "a") as f:
        f.write('{"seed": 2, "pq": 0.75}')  # complete, but its newline never written: not trusted
    assert [r["seed"] for r in Journal(path, {"segmenter": {"steps": 4}, "fractions": [0.5]}).load()] == [0, 1]
    assert path.read_text().endswith('"pq": 0.5}\n')
    with pytest.raises(ValueError, match=r"2 finished run\(s\) made with other settings \(differing: segmenter\)"):
        Journal(path, {"segmenter": {"steps": 5}, "fractions": [0.5]}).load()
    path.write_text("not json\n")
    with pytest.raises(ValueError, match="not a journal"):
        Journal(path, {}).load()
    j.remove()
    assert not path.exists()


@pytest.mark.slow
def test_downstream_without_tuning_keeps_the_preset_post_processing(stores, tmp_path):
    from nucsynth.evaluate.segmenter import segmenter_preset

    real, _ = stores
    res = _run_downstream(real, tmp_path / "untuned", "--fractions", "1.0", "--seeds", "1", "--tune-every", "0")
    assert res["runs"][0]["postprocess"] == segmenter_preset("cpu", 4).postprocess
    assert "tuned" not in (tmp_path / "untuned" / "downstream.md").read_text()
