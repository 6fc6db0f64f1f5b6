"""``nucsynth edit``: balance / enlarge / gradmix from a store or source into a store."""

from __future__ import annotations

import numpy as np
import pytest

from nucsynth.cli import main
from nucsynth.generate.tissue import procedural_sample
from nucsynth.io.store import DatasetStore
from nucsynth.layout import CONSEP_CLASSES


@pytest.fixture(scope="module")
def source_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("edit") / "src.zarr"
    store = DatasetStore.create(path, CONSEP_CLASSES, attrs={"source": "procedural"})
    samples = [procedural_sample((128, 128), seed=s, density=70, class_shares=[1, 2, 2, 2]) for s in range(4)]
    store.append(samples, splits=["train", "train", "train", "val"])
    return path


def _counts(path) -> np.ndarray:
    return DatasetStore.open(path).class_counts()


def test_edit_balance(source_store, tmp_path, capsys):
    out = tmp_path / "bal.zarr"
    assert main(["edit", str(source_store), str(out), "--mode", "balance", "--target-share", "0.4",
                 "--border", "10", "--seed", "2", "--split", "all"]) == 0
    text = capsys.readouterr().out
    assert "before" in text and "after" in text and "other" in text and "rare class 'other'" in text
    src, dst = DatasetStore.open(source_store), DatasetStore.open(out)
    assert len(dst) == len(src) and list(dst.splits) == list(src.splits)
    assert _counts(out)[1] > _counts(source_store)[1]
    assert _counts(out).sum() == _counts(source_store).sum()
    # without --split a store's train split is edited: held-out patches are never turned into training data
    default = tmp_path / "default.zarr"
    assert main(["edit", str(source_store), str(default), "--mode", "enlarge", "--seed", "2"]) == 0
    assert len(DatasetStore.open(default)) == 3 and set(DatasetStore.open(default).splits) == {"train"}
    for a, b in zip(src, dst):
        assert np.array_equal(a.image, b.image)  # labels-only edit: the source image is kept
        assert b.provenance["edit"] == "balance" and b.provenance["image_matches_labels"] is False
        assert b.layout.inst_map.max() <= b.layout.num_nuclei
    # Same seed, same result.
    again = tmp_path / "bal2.zarr"
    main(["edit", str(source_store), str(again), "--mode", "balance", "--target-share", "0.4", "--border", "10",
          "--seed", "2", "--split", "all"])
    for a, b in zip(DatasetStore.open(out), DatasetStore.open(again)):
        assert a.layout.equals(b.layout)


def test_edit_enlarge_split_and_only_changed(source_store, tmp_path, capsys):
    out = tmp_path / "enl.zarr"
    assert main(["edit", str(source_store), str(out), "--mode", "enlarge", "--split", "train",
                 "--fraction", "1", "--max-shift", "2", "--only-changed"]) == 0
    dst = DatasetStore.open(out)
    assert len(dst) == 3 and set(dst.splits) == {"train"}  # every train patch has a nucleus to move
    assert np.array_equal(dst.class_counts(), DatasetStore.open(source_store).class_counts("train"))
    for s in dst:
        assert s.provenance["max_shift"] == 2
    assert "changed by --mode enlarge" in capsys.readouterr().out


def test_edit_gradmix_from_source_with_pool(source_store, tmp_path):
    out = tmp_path / "gm.zarr"
    assert main(["edit", str(source_store), str(out), "--mode", "gradmix", "--pool", str(source_store),
                 "--border", "10", "--target-share", "0.3"]) == 0
    src, dst = DatasetStore.open(source_store), DatasetStore.open(out)
    changed = [not np.array_equal(a.image, b.image) for a, b in zip(src, dst)]
    assert any(changed)
    assert all(b.provenance["image_matches_labels"] for b in dst)


def test_edit_bad_input(source_store, tmp_path, capsys):
    existing = tmp_path / "exists.zarr"
    existing.mkdir()
    assert main(["edit", str(source_store), str(existing), "--mode", "enlarge"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["edit", str(tmp_path / "nope"), str(tmp_path / "o.zarr"), "--mode", "enlarge"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["edit", str(source_store), str(tmp_path / "o.zarr"), "--mode", "enlarge", "--target-share", "0.2"]) == 2
    assert "apply to --mode balance" in capsys.readouterr().err
    assert main(["edit", str(source_store), str(tmp_path / "o.zarr"), "--mode", "balance", "--target-share", "2"]) == 2
    assert "--target-share" in capsys.readouterr().err
    assert main(["edit", str(source_store), str(tmp_path / "o.zarr"), "--mode", "balance", "--split", "test"]) == 2
    assert "no patch in split 'test'" in capsys.readouterr().err
    assert not (tmp_path / "o.zarr").exists()
    # A pool without rare nuclei.
    pool = tmp_path / "pool.zarr"
    DatasetStore.create(pool, CONSEP_CLASSES).append([procedural_sample((64, 64), seed=1, class_shares=[0, 1, 1, 1])])
    assert main(["edit", str(source_store), str(tmp_path / "o.zarr"), "--mode", "balance", "--pool", str(pool)]) == 2
    assert "no whole rare-class nucleus" in capsys.readouterr().err
    assert not (tmp_path / "o.zarr").exists()


def test_edit_real_consep_balance(consep_dir, tmp_path, capsys):
    """On real CoNSeP patches (two tiles) balancing raises 'other' from its 2.4 % to the target."""
    from nucsynth.io import read_consep_file

    labels = sorted((consep_dir / "Labels").glob("train_1_*.mat")) + sorted((consep_dir / "Labels").glob("train_2_*.mat"))
    samples = [read_consep_file(f) for f in labels]
    path = tmp_path / "tiles.zarr"
    DatasetStore.create(path, samples[0].layout.class_set).append(samples)
    out = tmp_path / "bal.zarr"
    assert main(["edit", str(path), str(out), "--mode", "balance", "--target-share", "0.2"]) == 0
    before, after = _counts(path), _counts(out)
    assert before[1] / before.sum() < 0.05
    assert after[1] / after.sum() >= 0.15
    assert after.sum() == before.sum()


def _pannuke_pool(path, classes):
    """A store in PanNuke's class set: small discs (whole, away from the border) of ``classes``."""
    from skimage.draw import disk

    from nucsynth.layout import PANNUKE_CLASSES, Layout, Sample

    inst = np.zeros((64, 64), np.int32)
    for i in range(len(classes)):
        inst[disk((10 + 14 * (i // 4), 10 + 14 * (i % 4)), 2.5)] = i + 1
    lay = Layout.from_inst_map(inst, classes, PANNUKE_CLASSES)
    DatasetStore.create(path, PANNUKE_CLASSES).append([Sample(lay, np.full((64, 64, 3), 128, np.uint8))])
    return path


def test_edit_pool_of_another_class_set_needs_a_mapping(source_store, tmp_path, capsys):
    pool = _pannuke_pool(tmp_path / "pan.zarr", [1] * 8)  # neoplastic only; PanNuke's rare class is "dead"
    out = tmp_path / "o.zarr"
    assert main(["edit", str(source_store), str(out), "--mode", "balance", "--pool", str(pool), "--border", "10"]) == 2
    err = capsys.readouterr().err
    assert not out.exists() and "pan.zarr" in err and "'neoplastic'" in err and "--class-map" in err
    assert main(["edit", str(source_store), str(out), "--mode", "balance", "--pool", str(pool), "--border", "10",
                 "--class-map", "neoplastic=other,dead=unknown,connective=spindle"]) == 0
    assert _counts(out)[1] > _counts(source_store)[1]  # neoplastic shapes became CoNSeP "other" as mapped
    with pytest.raises(SystemExit):
        main(["edit", str(source_store), str(out), "--mode", "balance", "--pool"])
    assert main(["edit", str(source_store), str(tmp_path / "x.zarr"), "--mode", "balance", "--class-map", "a=b"]) == 2


@pytest.mark.parametrize("mode", ["enlarge", "gradmix"])
def test_edited_patches_keep_their_padding_record_but_not_the_source_ids(tmp_path, mode):
    """An edited layout's nuclei are no longer the source's (stitching must not join them by
    ``source_ids``); its image is the real padded one (``source_shape`` still applies)."""
    from nucsynth.data.tiling import tile_sample

    big = procedural_sample((160, 160), seed=3, density=70, class_shares=[1, 2, 2, 2])
    src = tmp_path / "tiled.zarr"
    store = DatasetStore.create(src, CONSEP_CLASSES)
    store.append([p for _, _, p in tile_sample(big, 128, pad="reflect")])
    store.close()
    out = tmp_path / "out.zarr"
    assert main(["edit", str(src), str(out), "--mode", mode, "--split", "all", "--border", "10", "--seed", "1"]) == 0
    for s in DatasetStore.open(out):
        assert "source_ids" not in s.provenance and s.provenance["source_shape"] == [160, 160]
