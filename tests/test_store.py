"""The zarr dataset store: exact round trip, append, lazy arrays, crash safety, clear errors."""

import json

import numpy as np
import pytest

import nucsynth.io.store as store_mod
from conftest import disk_layout_arrays
from nucsynth.io import DatasetStore, FormatError
from nucsynth.layout import CONSEP_CLASSES, NUCLEUS_CLASSES, Layout, Sample


def make_samples(n: int, shape=(48, 48), seed=0) -> list[Sample]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        k = i % 3
        centres = [(10, 12, 5), (30, 30, 7), (12, 36, 4)][:k + 1] if i % 4 else []
        inst, _ = disk_layout_arrays(shape=shape, centres=centres or ((0, 0, -1),), classes=())
        inst[inst > len(centres)] = 0
        classes = rng.integers(0, 5, len(centres))
        lay = Layout.from_inst_map(inst, classes, CONSEP_CLASSES) if centres else Layout.from_points(shape, np.zeros((0, 2)), [], CONSEP_CLASSES)
        if i == 5:  # a nucleus with no pixels (a point) must survive too
            lay = Layout(lay.inst_map, np.append(lay.classes, 2), np.vstack([lay.centroids, [[40.25, 3.5]]]), CONSEP_CLASSES)
        img = rng.integers(0, 256, shape + (3,), dtype=np.uint8)
        out.append(Sample(lay, img, {"source": f"img{i}.png", "tile": f"t{i // 2}", "y0": i, "params": {"a": [1, 2]}}))
    return out


def assert_same(a: Sample, b: Sample) -> None:
    np.testing.assert_array_equal(a.image, b.image)
    assert a.image.dtype == b.image.dtype
    np.testing.assert_array_equal(a.layout.inst_map, b.layout.inst_map)
    assert b.layout.inst_map.dtype == np.int32
    np.testing.assert_array_equal(a.layout.classes, b.layout.classes)
    np.testing.assert_array_equal(a.layout.centroids, b.layout.centroids)  # exact, not approx
    assert a.layout.class_set == b.layout.class_set
    assert a.provenance == b.provenance


def test_round_trip_exact(tmp_path):
    samples = make_samples(9)
    st = DatasetStore.create(tmp_path / "s.zarr", CONSEP_CLASSES, attrs={"origin": "test"})
    st.append(samples[:4])
    st.append(samples[4:], splits=["val", "train", "val", "train", "val"])
    back = DatasetStore.open(tmp_path / "s.zarr", CONSEP_CLASSES)
    assert len(back) == 9 and back.patch_shape == (48, 48)
    for a, b in zip(samples, back):
        assert_same(a, b)
    assert_same(samples[-1], back[-1])
    assert back.splits.tolist() == ["train"] * 4 + ["val", "train", "val", "train", "val"]
    assert back.indices("val").tolist() == [4, 6, 8]
    expect = sum(s.layout.class_counts() for s in samples)
    np.testing.assert_array_equal(back.class_counts(), expect)
    np.testing.assert_array_equal(back.class_counts("val"), sum(samples[i].layout.class_counts() for i in (4, 6, 8)))
    assert back.attrs["origin"] == "test" and "nucsynth_version" in back.attrs["created"]
    assert back.num_nuclei == int(expect.sum())


def test_lazy_dask_arrays_chunked_per_patch(tmp_path):
    samples = make_samples(5)
    st = DatasetStore.create(tmp_path / "s.zarr", CONSEP_CLASSES)
    st.append(samples)
    imgs, inst = st.images, st.inst_maps
    assert imgs.shape == (5, 48, 48, 3) and imgs.dtype == np.uint8 and imgs.chunks[0] == (1,) * 5
    assert inst.dtype == np.int32 and inst.chunks[0] == (1,) * 5
    np.testing.assert_array_equal(imgs.compute(), np.stack([s.image for s in samples]))
    np.testing.assert_array_equal(inst[2].compute(), samples[2].layout.inst_map)


def test_append_does_not_rewrite_existing_chunks(tmp_path):
    st = DatasetStore.create(tmp_path / "s.zarr", CONSEP_CLASSES)
    st.append(make_samples(3))
    chunk = tmp_path / "s.zarr" / "images" / "c" / "0" / "0" / "0" / "0"
    before = chunk.stat().st_mtime_ns, chunk.read_bytes()
    st.append(make_samples(3, seed=1))
    assert (chunk.stat().st_mtime_ns, chunk.read_bytes()) == before
    assert len(DatasetStore.open(tmp_path / "s.zarr")) == 6


def test_split_function(tmp_path):
    st = DatasetStore.create(tmp_path / "s.zarr", CONSEP_CLASSES)
    st.append(iter(make_samples(6)), splits=lambda s: "val" if s.provenance["tile"] == "t1" else "train")
    assert st.indices("val").tolist() == [2, 3]


def test_crash_mid_append_keeps_old_contents(tmp_path, monkeypatch):
    samples = make_samples(4)
    st = DatasetStore.create(tmp_path / "s.zarr", CONSEP_CLASSES)
    st.append(samples)
    monkeypatch.setattr(store_mod, "_WRITE_BYTES", 1)  # flush every sample, so rows get written

    def crashing():
        yield from make_samples(3, seed=7)
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        st.append(crashing())
    assert st._group["images"].shape[0] == 7  # rows were written beyond the committed count...
    back = DatasetStore.open(tmp_path / "s.zarr")
    assert len(back) == 4 and back.images.shape[0] == 4  # ...but readers never see them
    for a, b in zip(samples, back):
        assert_same(a, b)
    more = make_samples(2, seed=9)
    st.close()  # release the writer lock for the next writer
    again = DatasetStore.open(tmp_path / "s.zarr", mode="a")
    again.append(more, splits="val")
    back = DatasetStore.open(tmp_path / "s.zarr")
    assert len(back) == 6
    for a, b in zip(samples + more, back):
        assert_same(a, b)


def test_create_refuses_existing_and_overwrites_atomically(tmp_path):
    p = tmp_path / "s.zarr"
    DatasetStore.create(p, CONSEP_CLASSES).append(make_samples(2))
    with pytest.raises(FileExistsError, match="overwrite"):
        DatasetStore.create(p, CONSEP_CLASSES)
    assert len(DatasetStore.open(p)) == 2
    st = DatasetStore.create(p, NUCLEUS_CLASSES, overwrite=True)
    assert len(st) == 0 and st.class_set == NUCLEUS_CLASSES and st.patch_shape is None
    assert sorted(x.name for x in tmp_path.iterdir()) == ["s.zarr"]  # no temporary leftovers


def test_open_errors(tmp_path):
    p = tmp_path / "s.zarr"
    DatasetStore.create(p, CONSEP_CLASSES).append(make_samples(2))
    with pytest.raises(ValueError, match="consep4.*nucleus"):
        DatasetStore.open(p, NUCLEUS_CLASSES)
    with pytest.raises(FileNotFoundError):
        DatasetStore.open(tmp_path / "nope.zarr")
    (tmp_path / "plain").mkdir()
    with pytest.raises(FormatError, match="plain"):
        DatasetStore.open(tmp_path / "plain")
    meta_file = p / "zarr.json"
    meta = json.loads(meta_file.read_text())
    meta["attributes"]["nucsynth_store"]["version"] = 99
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(FormatError, match="version 99 is not supported"):
        DatasetStore.open(p)


def test_append_errors(tmp_path):
    p = tmp_path / "s.zarr"
    DatasetStore.create(p, CONSEP_CLASSES).append(make_samples(2))
    with pytest.raises(ValueError, match="read-only"):
        DatasetStore.open(p).append(make_samples(1))
    st = DatasetStore.open(p, mode="a")
    with pytest.raises(ValueError, match=r"\(48, 48\) px.*\(32, 32\)"):
        st.append(make_samples(1, shape=(32, 32)))
    other = Sample(Layout.from_points((48, 48), np.zeros((0, 2)), [], NUCLEUS_CLASSES), np.zeros((48, 48, 3), np.uint8))
    with pytest.raises(ValueError, match="class set 'nucleus'"):
        st.append([other])
    with pytest.raises(ValueError, match="2 split labels given for more"):
        st.append(make_samples(3), splits=["train", "val"])
    with pytest.raises(ValueError, match="3 split labels given for 2"):
        st.append(make_samples(2), splits=["train", "val", "val"])
    assert len(DatasetStore.open(p)) == 2
    with pytest.raises(IndexError):
        DatasetStore.open(p)[2]


def test_store_is_a_source(tmp_path):
    from nucsynth.io import detect_format, read_source

    samples = make_samples(3)
    DatasetStore.create(tmp_path / "s.zarr", CONSEP_CLASSES).append(samples)
    assert detect_format(tmp_path / "s.zarr") == "store"
    for a, b in zip(samples, read_source(tmp_path / "s.zarr")):
        assert_same(a, b)
