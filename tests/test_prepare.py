"""`nucsynth prepare`: source -> store; exact round trip; the split keeps each tile together."""

from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import scipy.io as sio
from PIL import Image

from nucsynth.cli import main
from nucsynth.commands.prepare import split_groups
from nucsynth.data.tiling import tile_sample
from nucsynth.generate.tissue import procedural_sample
from nucsynth.io import DatasetStore, read_consep
from nucsynth.layout import CONSEP_CLASSES


def _tiles_by_split(store: DatasetStore) -> dict[str, set[str]]:
    out: dict[str, set[str]] = defaultdict(set)
    for i in range(len(store)):
        out[store.provenance(i)["tile"]].add(str(store.splits[i]))
    return out


# ---------------------------------------------------------------------- real data
@pytest.fixture(scope="module")
def consep_store(consep_dir, tmp_path_factory):
    """`nucsynth prepare` run once on the real CoNSeP patches (256 px: no re-tiling)."""
    out = tmp_path_factory.mktemp("prep") / "consep.zarr"
    assert main(["prepare", str(consep_dir), str(out), "--patch-size", "256", "--seed", "0"]) == 0
    return out, read_consep(consep_dir)


@pytest.mark.realdata
def test_real_prepare_round_trips_every_array(consep_store):
    path, sources = consep_store
    st = DatasetStore.open(path, CONSEP_CLASSES)
    assert len(st) == 432 and st.patch_shape == (256, 256)
    assert st.class_counts().tolist() == [0, 432, 4507, 6609, 6668]
    for k, (src, got) in enumerate(zip(sources, st)):
        # 256 px sources are not re-cut: the stored patch is the source itself
        np.testing.assert_array_equal(got.image, src.image)
        np.testing.assert_array_equal(got.layout.inst_map, src.layout.inst_map)
        np.testing.assert_array_equal(got.layout.classes, src.layout.classes)
        np.testing.assert_allclose(got.layout.centroids, src.layout.centroids, atol=1e-9)
        if k % 16 == 0:  # one patch per tile: bit-exact against what prepare computed
            ((_, _, want),) = tile_sample(src, 256, pad="reflect")
            np.testing.assert_array_equal(got.layout.centroids, want.layout.centroids)
            assert got.provenance == want.provenance
    assert st.images.shape == (432, 256, 256, 3) and st.inst_maps.dtype == np.int32
    np.testing.assert_array_equal(st.inst_maps[431].compute(), sources[431].layout.inst_map)


@pytest.mark.realdata
def test_real_split_keeps_each_tile_together(consep_store):
    path, _ = consep_store
    st = DatasetStore.open(path)
    by_tile = _tiles_by_split(st)
    assert len(by_tile) == 27
    assert all(len(splits) == 1 for splits in by_tile.values())
    val_tiles = [t for t, s in by_tile.items() if s == {"val"}]
    assert len(val_tiles) == round(0.2 * 27)
    assert sorted(val_tiles) == st.attrs["split_groups"]["val"]
    assert st.indices("val").size == 16 * len(val_tiles)


# ---------------------------------------------------------------------- synthetic sources
def make_source(folder: Path, n_tiles: int = 4, size: int = 64) -> Path:
    """A CoNSeP-layout folder of whole H&E-like tiles (procedural), one tile per image."""
    (folder / "Images").mkdir(parents=True)
    (folder / "Labels").mkdir()
    for t in range(n_tiles):
        s = procedural_sample((size, size), seed=t)
        Image.fromarray(s.image).save(folder / "Images" / f"tile_{t}.png")
        sio.savemat(folder / "Labels" / f"tile_{t}.mat", {
            "inst_map": s.layout.inst_map, "inst_type": s.layout.classes[:, None].astype(np.int32),
            "inst_centroid": s.layout.centroids[:, ::-1]})
    return folder


def test_prepare_tiles_and_splits_by_tile(tmp_path, capsys):
    src = make_source(tmp_path / "src")
    out = tmp_path / "s.zarr"
    assert main(["prepare", str(src), str(out), "--patch-size", "32", "--val-fraction", "0.5", "--seed", "3"]) == 0
    st = DatasetStore.open(out)
    assert len(st) == 16  # 4 tiles x 4 patches
    by_tile = _tiles_by_split(st)
    assert len(by_tile) == 4 and all(len(v) == 1 for v in by_tile.values())
    assert sorted(len(st.indices(k)) for k in ("train", "val")) == [8, 8]
    printed = capsys.readouterr().out
    assert "train: 8 patches" in printed and "val: 8 patches" in printed and "nuclei per class" in printed
    # same seed, same split
    out2 = tmp_path / "t.zarr"
    assert main(["prepare", str(src), str(out2), "--patch-size", "32", "--val-fraction", "0.5", "--seed", "3"]) == 0
    assert DatasetStore.open(out2).splits.tolist() == st.splits.tolist()
    assert st.attrs["patch_size"] == 32 and st.attrs["format"] == "consep"


def test_prepare_stain_normalization(tmp_path):
    src = make_source(tmp_path / "src", n_tiles=2)
    target = procedural_sample((64, 64), seed=11).image
    target = np.clip(target.astype(int) * [0.8, 0.7, 1.0], 0, 255).astype(np.uint8)  # a bluer target
    Image.fromarray(target).save(tmp_path / "target.png")
    out = tmp_path / "s.zarr"
    assert main(["prepare", str(src), str(out), "--patch-size", "64", "--stain", "macenko",
                 "--stain-target", str(tmp_path / "target.png"), "--val-fraction", "0"]) == 0
    st = DatasetStore.open(out)
    assert st.attrs["stain"]["method"] == "macenko" and len(st.attrs["stain"]["stain_matrix"]) == 2
    assert st[0].provenance["stain"] == "macenko"
    original = np.asarray(Image.open(src / "Images" / "tile_0.png"))
    assert not np.array_equal(st[0].image, original)
    assert set(st.splits.tolist()) == {"train"}


def test_prepare_refuses_and_overwrites(tmp_path, capsys):
    src = make_source(tmp_path / "src", n_tiles=2)
    out = tmp_path / "s.zarr"
    assert main(["prepare", str(src), str(out), "--patch-size", "64"]) == 0
    assert main(["prepare", str(src), str(out), "--patch-size", "32"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert DatasetStore.open(out).patch_shape == (64, 64)  # untouched
    assert main(["prepare", str(src), str(out), "--patch-size", "32", "--overwrite"]) == 0
    assert DatasetStore.open(out).patch_shape == (32, 32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr", "src"]  # no temporary leftovers


@pytest.mark.parametrize("extra, message", [
    (["--stain", "vahadane"], "--stain-target"),
    (["--val-fraction", "1.0"], "val-fraction"),
    (["--patch-size", "0"], "patch-size"),
    (["--format", "pannuke"], "images.npy"),
])
def test_prepare_bad_arguments(tmp_path, capsys, extra, message):
    src = make_source(tmp_path / "src", n_tiles=1)
    assert main(["prepare", str(src), str(tmp_path / "s.zarr")] + extra) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "s.zarr").exists()


def test_merge_classes_only_for_mat_sources(tmp_path, capsys):
    src = tmp_path / "m" / "Annotations"
    src.mkdir(parents=True)
    (src / "a.xml").write_text("<Annotations/>")
    assert main(["prepare", str(src.parent), str(tmp_path / "s.zarr"), "--merge-classes", "consep7"]) == 2
    assert "--merge-classes" in capsys.readouterr().err


def test_split_groups_rules():
    groups = [f"t{i}" for i in range(10)]
    a = split_groups(groups, 0.2, seed=0)
    assert a == split_groups(list(reversed(groups)), 0.2, seed=0)  # order-independent, seeded
    assert sum(v == "val" for v in a.values()) == 2
    assert sum(v == "val" for v in split_groups(groups[:2], 0.01, 0).values()) == 1  # at least one
    assert set(split_groups(groups[:1], 0.5, 0).values()) == {"train"}  # never all
    assert set(split_groups(groups, 0.0, 0).values()) == {"train"}
    with pytest.raises(ValueError):
        split_groups(groups, 1.0, 0)


def test_prepare_pad_none_with_small_sources_writes_nothing(tmp_path, capsys):
    src = make_source(tmp_path / "src", n_tiles=1, size=64)
    out = tmp_path / "s.zarr"
    assert main(["prepare", str(src), str(out), "--patch-size", "100", "--pad", "none"]) == 2
    assert "no patch of 100 px" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
