"""Class identity: class sets are matched by class NAME (never by position or count)."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from nucsynth.layout import (
    CONSEP_CLASSES,
    PANNUKE_CLASSES,
    ClassSet,
    ClassSetMismatch,
    Layout,
    LayoutError,
    class_lut,
    parse_class_map,
    relabel_contiguous,
)
from nucsynth.metrics import class_pq, detection_classification, evaluate_set

# The four CoNSeP classes listed in another order (what a folder's sorted class CSV gives).
SORTED_CONSEP = ClassSet("folder", ("epithelial", "inflammatory", "other", "spindle"), ((1, 2, 3),) * 4)


def _in(layout: Layout, cs: ClassSet) -> Layout:
    """The same nuclei re-expressed in ``cs`` by name (built by hand, not by the code under test)."""
    by_name = {n: i for i, n in enumerate(cs.names, start=1)}
    cls = np.array([by_name[layout.class_set.names[c - 1]] if c else 0 for c in layout.classes], np.int64)
    return Layout(layout.inst_map, cls, layout.centroids, cs)


def _truth_and_pred() -> tuple[Layout, Layout]:
    rng = np.random.default_rng(3)
    inst = np.zeros((64, 64), np.int32)
    for i in range(12):
        y, x = divmod(i, 4)
        inst[4 + 14 * y : 12 + 14 * y, 3 + 15 * x : 11 + 15 * x] = i + 1
    classes = np.array([1, 2, 3, 4] * 3)
    truth = Layout.from_inst_map(inst, classes, CONSEP_CLASSES)
    pred_map = np.roll(inst, 1, axis=1)
    pred_cls = classes.copy()
    pred_cls[rng.choice(12, 4, replace=False)] = rng.integers(1, 5, 4)
    return truth, Layout.from_inst_map(pred_map, pred_cls, CONSEP_CLASSES)


def test_class_lut_matches_by_name():
    assert class_lut(SORTED_CONSEP, CONSEP_CLASSES).tolist() == [0, 3, 2, 1, 4]
    assert class_lut(CONSEP_CLASSES, CONSEP_CLASSES).tolist() == [0, 1, 2, 3, 4]
    upper = ClassSet("u", (" Other", "INFLAMMATORY", "Epithelial", "spindle "), ((0, 0, 0),) * 4)
    assert class_lut(upper, CONSEP_CLASSES).tolist() == [0, 1, 2, 3, 4]


def test_class_sets_of_equal_size_but_other_classes_are_refused():
    other4 = ClassSet("x", ("a", "inflammatory", "c", "spindle"), ((0, 0, 0),) * 4)
    with pytest.raises(ClassSetMismatch, match=r"\['a', 'c'\].*class mapping"):
        class_lut(other4, CONSEP_CLASSES)
    with pytest.raises(ClassSetMismatch, match="dead"):
        class_lut(PANNUKE_CLASSES, CONSEP_CLASSES)


def test_explicit_mapping_by_names_and_ids():
    m = parse_class_map("neoplastic=epithelial, connective = spindle, dead=unknown, epithelial=3")
    assert class_lut(PANNUKE_CLASSES, CONSEP_CLASSES, m).tolist() == [0, 3, 2, 4, 0, 3]
    assert class_lut(PANNUKE_CLASSES, CONSEP_CLASSES, {1: 3, 3: "spindle", 4: 1, 5: "epithelial"}).tolist() == [0, 3, 2, 4, 1, 3]
    with pytest.raises(LayoutError, match="target class 'stroma' is not in 'consep4'"):
        class_lut(PANNUKE_CLASSES, CONSEP_CLASSES, {"dead": "stroma"})
    with pytest.raises(LayoutError, match="source class id 9 is outside 1..5"):
        class_lut(PANNUKE_CLASSES, CONSEP_CLASSES, {9: 1})


@pytest.mark.parametrize("text, msg", [("dead", "SOURCE=TARGET"), ("dead=", "SOURCE=TARGET"), ("a=b=c", "SOURCE=TARGET"),
                                       ("a=b,A=c", "given twice"), (" , ", "holds no")])
def test_parse_class_map_errors(text, msg):
    with pytest.raises(LayoutError, match=msg):
        parse_class_map(text)


def test_to_class_set_keeps_each_nucleus_class():
    truth, _ = _truth_and_pred()
    moved = _in(truth, SORTED_CONSEP).to_class_set(CONSEP_CLASSES)
    assert moved.class_set == CONSEP_CLASSES
    np.testing.assert_array_equal(moved.classes, truth.classes)
    assert truth.to_class_set(CONSEP_CLASSES) is truth


def test_scores_through_a_reordered_class_set_equal_the_original_order():
    truth, pred = _truth_and_pred()
    reordered = _in(pred, SORTED_CONSEP)
    assert class_pq(truth, reordered) == class_pq(truth, pred)
    d0, d1 = detection_classification(truth, pred), detection_classification(truth, reordered)
    assert d1 == d0
    # The pred is a perfect copy in classes but reordered: accuracy 1, not what position gives.
    assert detection_classification(truth, _in(truth, SORTED_CONSEP))["acc"] == 1.0
    e0, e1 = evaluate_set([truth], [pred]), evaluate_set([truth], [reordered])
    assert e1["class_pq"] == e0["class_pq"] and e1["detection"] == e0["detection"]
    # truths in two orders are brought into the first truth's class set as well
    e2 = evaluate_set([truth, _in(truth, SORTED_CONSEP)], [pred, reordered])
    assert e2["detection"]["acc"] == pytest.approx(d0["acc"])


def test_scoring_across_unmapped_class_sets_is_refused():
    truth, pred = _truth_and_pred()
    pan = Layout(pred.inst_map, pred.classes, pred.centroids, PANNUKE_CLASSES)
    for f in (class_pq, detection_classification, evaluate_set):
        with pytest.raises(ClassSetMismatch, match="neoplastic"):
            f(truth, pan) if f is not evaluate_set else f([truth], [pan])


def test_huge_instance_id_costs_memory_of_the_pixels_not_of_the_id():
    m = np.zeros((16, 16), np.int64)
    m[2:5, 2:5] = 2**31 - 1
    m[8, 8] = 7
    tracemalloc.start()
    try:
        new, old = relabel_contiguous(m)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20
    assert old.tolist() == [7, 2**31 - 1]
    assert new[8, 8] == 1 and (new[2:5, 2:5] == 2).all() and new.sum() == 1 + 2 * 9
    with pytest.raises(LayoutError, match=r"id 2147483647 in 256 pixels.*relabel_contiguous"):
        Layout.from_inst_map(m, None, CONSEP_CLASSES)


def test_relabel_contiguous_both_paths_agree():
    rng = np.random.default_rng(0)
    small = rng.integers(0, 6, (20, 20)) * 3
    big = np.where(small > 0, small + 2**30, 0)
    a, oa = relabel_contiguous(small)
    b, ob = relabel_contiguous(big)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(oa + 2**30, ob)
    nz = rng.integers(1, 5, (4, 4)) + 2**30  # no background at all
    c, oc = relabel_contiguous(nz)
    assert c.min() == 1 and (oc[c - 1] == nz).all()


# ---------------------------------------------------------------------- conditioning a model
def test_semantic_condition_draws_each_nucleus_in_its_own_class():
    torch = pytest.importorskip("torch")
    from nucsynth.models.semantic import SemanticModel

    model = SemanticModel.from_preset("tiny", 64, CONSEP_CLASSES)
    truth, _ = _truth_and_pred()
    assert torch.equal(model.condition([_in(truth, SORTED_CONSEP)]), model.condition([truth]))
    with pytest.raises(ClassSetMismatch, match="neoplastic"):
        model.condition([Layout(truth.inst_map, truth.classes, truth.centroids, PANNUKE_CLASSES)])


def _folder(root, names_by_id: dict[int, str]):
    """A plain folder (images/, labels/, classes.csv naming classes) of one 32 px patch."""
    from PIL import Image

    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    inst = np.zeros((32, 32), np.uint8)
    for i in names_by_id:
        inst[2 + 7 * (i - 1) : 7 + 7 * (i - 1), 4:10] = i
    Image.fromarray(inst).save(root / "labels" / "p_0.png")
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(root / "images" / "p_0.png")
    rows = "".join(f"p_0,{i},{n}\n" for i, n in names_by_id.items())
    (root / "classes.csv").write_text("image,id,class\n" + rows)
    return root


@pytest.fixture(scope="module")
def semantic_ckpt(tmp_path_factory) -> str:
    torch = pytest.importorskip("torch")
    from nucsynth.checkpoint import save_checkpoint
    from nucsynth.models.semantic import SemanticModel

    torch.manual_seed(0)
    model = SemanticModel.from_preset("tiny", 32, CONSEP_CLASSES)
    path = tmp_path_factory.mktemp("ckpt") / "semantic"
    save_checkpoint(path, model, model.build_network(), step=0)
    return str(path)


def test_synthesize_refuses_other_classes_before_sampling(tmp_path, semantic_ckpt, monkeypatch, capsys):
    from nucsynth.cli import main
    from nucsynth.models.semantic import SemanticModel

    def never(*a, **k):
        raise AssertionError("sampling started")

    monkeypatch.setattr(SemanticModel, "sample", never)
    src = _folder(tmp_path / "pan", {1: "neoplastic", 2: "dead", 3: "inflammatory"})
    out = tmp_path / "out.zarr"
    rc = main(["synthesize", "--checkpoint", semantic_ckpt, "--layouts", str(src), "--out", str(out), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists()
    assert "'dead'" in err and "'neoplastic'" in err and "--class-map" in err
    assert not list(tmp_path.glob(".*")), "no temporary store left behind"


def test_synthesize_maps_classes_by_name_and_by_class_map(tmp_path, semantic_ckpt, monkeypatch):
    from nucsynth.cli import main
    from nucsynth.io.store import DatasetStore
    from nucsynth.models.semantic import SemanticModel

    seen: list[Layout] = []
    real = SemanticModel.sample

    def spy(self, layouts, *a, **k):
        seen.extend(layouts)
        return real(self, layouts, *a, **k)

    monkeypatch.setattr(SemanticModel, "sample", spy)
    # CoNSeP's classes listed in another order by the folder's CSV (sorted: epithelial first)
    src = _folder(tmp_path / "c", {1: "other", 2: "spindle", 3: "epithelial", 4: "inflammatory"})
    rc = main(["synthesize", "--checkpoint", semantic_ckpt, "--layouts", str(src), "--out", str(tmp_path / "a.zarr"),
               "--steps", "1", "--guidance", "1", "--device", "cpu"])
    assert rc == 0
    assert seen[-1].class_set == CONSEP_CLASSES and seen[-1].classes.tolist() == [1, 4, 3, 2]
    assert DatasetStore.open(tmp_path / "a.zarr")[0].layout.classes.tolist() == [1, 4, 3, 2]
    src = _folder(tmp_path / "p", {1: "neoplastic", 2: "dead", 3: "inflammatory"})
    rc = main(["synthesize", "--checkpoint", semantic_ckpt, "--layouts", str(src), "--out", str(tmp_path / "b.zarr"),
               "--steps", "1", "--guidance", "1", "--device", "cpu", "--class-map", "neoplastic=epithelial,dead=other,connective=spindle"])
    assert rc == 0 and seen[-1].classes.tolist() == [3, 1, 2]


# ---------------------------------------------------------------------- evaluate
def test_fidelity_reads_a_segmenter_of_reordered_classes_by_name(tmp_path, monkeypatch):
    import json

    from nucsynth.cli import main
    from nucsynth.evaluate import downstream as D
    from nucsynth.evaluate.segmenter import HoVerSegmenter, SegmenterConfig, save_segmenter
    from nucsynth.generate.tissue import procedural_sample
    from nucsynth.io.store import DatasetStore

    truths = [procedural_sample((48, 48), seed=s, density=60, class_shares=[1, 1, 1, 1]) for s in range(2)]
    DatasetStore.create(tmp_path / "s.zarr", CONSEP_CLASSES).append(truths)
    model = save_segmenter(tmp_path / "seg", HoVerSegmenter(SegmenterConfig(num_classes=4, widths=(8, 16))), SORTED_CONSEP)

    def perfect(net, images, cs, **kw):  # the network's output: right nuclei, ids of ITS class set
        return [Layout(t.layout.inst_map, _in(t.layout, SORTED_CONSEP).classes, t.layout.centroids, cs)
                for t in truths[: len(images)]]

    monkeypatch.setattr(D, "predict_layouts", perfect)
    assert main(["evaluate", "fidelity", str(tmp_path / "s.zarr"), "--model", str(model), "--out", str(tmp_path / "f"),
                 "--device", "cpu"]) == 0
    res = json.loads((tmp_path / "f" / "fidelity.json").read_text())
    assert [r["score"] for r in res["per_sample"]] == [1.0, 1.0]
    pan = save_segmenter(tmp_path / "pan", HoVerSegmenter(SegmenterConfig(num_classes=5, widths=(8, 16))), PANNUKE_CLASSES)
    assert main(["evaluate", "fidelity", str(tmp_path / "s.zarr"), "--model", str(pan), "--device", "cpu"]) == 2


def test_joint_points_of_a_reordered_class_set_mark_each_nucleus_in_its_own_class(monkeypatch):
    pytest.importorskip("torch")
    from nucsynth.models.joint import JointModel

    model = JointModel.from_preset("tiny", 64, CONSEP_CLASSES)
    model.net = model.build_network()
    seen = []
    monkeypatch.setattr(JointModel, "_sample_maps", lambda self, net, points, texts, *a: seen.append((points, texts)))
    truth, _ = _truth_and_pred()
    pts = Layout.from_points(truth.shape, truth.centroids, truth.classes, CONSEP_CLASSES)
    model.sample_maps([pts], steps=1)
    model.sample_maps([_in(pts, SORTED_CONSEP)], steps=1)
    assert (seen[0][0] == seen[1][0]).all() and seen[0][1] == seen[1][1]
    with pytest.raises(ClassSetMismatch, match="neoplastic"):
        model.sample_maps([Layout(pts.inst_map, pts.classes, pts.centroids, PANNUKE_CLASSES)], steps=1)


def test_rare_pool_of_mixed_class_sets_matches_by_name_or_refuses():
    from nucsynth.edit.balance import collect_rare_pool

    truth, _ = _truth_and_pred()  # 3 nuclei of each CoNSeP class, all whole
    assert len(collect_rare_pool([truth])) == 3  # CoNSeP's rare class: other
    # the same nuclei listed in another class order: still the 3 "other" nuclei, not "epithelial"
    both = collect_rare_pool([truth, _in(truth, SORTED_CONSEP)])
    assert len(both) == 6 and all(np.array_equal(a, b) for a, b in zip(both[:3], both[3:]))
    pan = Layout(truth.inst_map, truth.classes, truth.centroids, PANNUKE_CLASSES)
    with pytest.raises(ClassSetMismatch, match="dead"):
        collect_rare_pool([truth, pan])  # PanNuke's rare "dead" never joins CoNSeP's "other" pool
    assert len(collect_rare_pool([pan.to_class_set(CONSEP_CLASSES, {"neoplastic": "other", "dead": "unknown",
                                                                    "connective": "spindle"})])) == 3
