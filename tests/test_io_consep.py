"""CoNSeP / HoVer-Net reader: real data counts, class merges, coordinate order, bad inputs."""

from pathlib import Path

import numpy as np
import pytest
import scipy.io as sio
from PIL import Image

from conftest import disk_layout_arrays
from nucsynth.io import CONSEP7_CLASSES, GLYSAC_CLASSES, FormatError, read_consep, read_consep_file, read_source
from nucsynth.layout import CONSEP_CLASSES


def _centroids_xy(inst: np.ndarray) -> np.ndarray:
    n = int(inst.max())
    out = np.zeros((n, 2))
    for i in range(1, n + 1):
        yy, xx = np.nonzero(inst == i)
        out[i - 1] = (xx.mean(), yy.mean())
    return out


def make_consep(folder: Path, files: dict[str, tuple[np.ndarray, np.ndarray]], with_centroid: bool = True) -> Path:
    """A CoNSeP-layout folder: Images/<name>.png + Labels/<name>.mat (inst_map, inst_type, ...)."""
    (folder / "Images").mkdir(parents=True)
    (folder / "Labels").mkdir()
    for name, (inst, classes) in files.items():
        rng = np.random.default_rng(len(name))
        Image.fromarray(rng.integers(0, 256, inst.shape + (3,), dtype=np.uint8)).save(folder / "Images" / f"{name}.png")
        type_map = np.concatenate([[0], classes])[inst].astype(np.int32)
        mat = {"inst_map": inst.astype(np.int32), "type_map": type_map, "inst_type": np.asarray(classes, np.int32)[:, None]}
        if with_centroid:
            mat["inst_centroid"] = _centroids_xy(inst)
        sio.savemat(folder / "Labels" / f"{name}.mat", mat)
    return folder


@pytest.mark.realdata
def test_real_consep_counts(consep_dir):
    samples = read_consep(consep_dir)
    assert len(samples) == 432
    counts = sum(s.layout.class_counts() for s in samples)
    assert counts.tolist() == [0, 432, 4507, 6609, 6668]
    assert counts.sum() == 18216
    s = samples[0]
    assert s.image.dtype == np.uint8 and s.image.shape == (256, 256, 3)
    assert s.layout.class_set == CONSEP_CLASSES
    assert s.provenance["tile"] == Path(s.provenance["source"]).stem.rsplit("_", 1)[0]
    assert s.provenance["class_merge"] is None
    assert len({x.provenance["tile"] for x in samples}) == 27


@pytest.mark.realdata
def test_real_consep_centroids_are_yx(consep_dir):
    """inst_centroid is (x, y) in the file: after reading, centroids match the (y, x) centre of mass."""
    s = read_consep_file(sorted((consep_dir / "Labels").glob("*.mat"))[0])
    inst = s.layout.inst_map
    for i in (1, s.layout.num_nuclei):
        yy, xx = np.nonzero(inst == i)
        np.testing.assert_allclose(s.layout.centroids[i - 1], (yy.mean(), xx.mean()), atol=1e-9)


def test_synthetic_roundtrip_and_xy_conversion(tmp_path):
    inst, classes = disk_layout_arrays(shape=(40, 60), centres=((8, 50, 4), (30, 10, 6)), classes=(2, 4))
    folder = make_consep(tmp_path / "c", {"train_3_001": (inst, np.array(classes))})
    (s,) = read_consep(folder)
    np.testing.assert_array_equal(s.layout.inst_map, inst)
    np.testing.assert_array_equal(s.layout.classes, classes)
    np.testing.assert_allclose(s.layout.centroids, [[8, 50], [30, 10]], atol=1e-9)
    assert s.provenance["tile"] == "train_3"
    assert s.provenance["format"] == "consep"


def test_seven_class_folder_is_merged_explicitly(tmp_path):
    inst, _ = disk_layout_arrays(centres=((8, 8, 3), (20, 20, 3), (35, 35, 3), (8, 36, 3)), classes=(1, 2, 3, 4))
    raw = np.array([3, 4, 6, 7])  # healthy epi, malignant epi, muscle, endothelial
    folder = make_consep(tmp_path / "c", {"train_1": (inst, raw)})
    (merged,) = read_consep(folder)  # default: a 7-class folder is merged to the 4 HoVer-Net classes
    assert merged.layout.classes.tolist() == [3, 3, 4, 4]
    assert merged.layout.class_set == CONSEP_CLASSES
    assert merged.provenance["class_merge"] == "consep7"
    (kept,) = read_consep(folder, merge_classes=False)
    assert kept.layout.classes.tolist() == raw.tolist()
    assert kept.layout.class_set == CONSEP7_CLASSES
    assert kept.provenance["class_merge"] is None


def test_glysac_merge_option(tmp_path):
    inst, _ = disk_layout_arrays(centres=((8, 8, 3), (20, 20, 3), (35, 35, 3)), classes=(1, 2, 3))
    folder = make_consep(tmp_path / "g", {"img": (inst, np.array([9, 5, 8]))})
    (s,) = read_consep(folder, merge_classes="glysac")
    assert s.layout.class_set == GLYSAC_CLASSES
    assert s.layout.classes.tolist() == [1, 2, 3]  # other, lymphocyte, epithelial
    with pytest.raises(ValueError, match="unknown class merge"):
        read_consep(folder, merge_classes="nope")


def test_gaps_in_ids_are_relabelled(tmp_path):
    inst, _ = disk_layout_arrays()
    inst = np.where(inst == 2, 5, inst)  # ids 1, 3, 5
    classes = np.array([1, 0, 2, 0, 3])
    folder = make_consep(tmp_path / "c", {"a": (inst, classes)}, with_centroid=False)
    (s,) = read_consep(folder)
    assert s.layout.num_nuclei == 3
    assert sorted(np.unique(s.layout.inst_map).tolist()) == [0, 1, 2, 3]
    assert s.layout.classes.tolist() == [1, 2, 3]


def test_classes_from_type_map_when_inst_type_missing(tmp_path):
    inst, classes = disk_layout_arrays()
    folder = make_consep(tmp_path / "c", {"a": (inst, np.array(classes))})
    mat = sio.loadmat(folder / "Labels" / "a.mat")
    sio.savemat(folder / "Labels" / "a.mat", {"inst_map": mat["inst_map"], "type_map": mat["type_map"]})
    (s,) = read_consep(folder)
    assert s.layout.classes.tolist() == list(classes)


def test_read_source_detects_consep(tmp_path):
    inst, classes = disk_layout_arrays()
    folder = make_consep(tmp_path / "c", {"a": (inst, np.array(classes))})
    assert len(read_source(folder)) == 1
    assert len(read_source(folder, "consep", merge_classes=False)) == 1


# ---------------------------------------------------------------------- bad inputs
def _one(tmp_path):
    inst, classes = disk_layout_arrays()
    return make_consep(tmp_path / "c", {"a": (inst, np.array(classes))}), inst


def test_missing_key_names_file_and_key(tmp_path):
    folder, inst = _one(tmp_path)
    sio.savemat(folder / "Labels" / "a.mat", {"type_map": inst})
    with pytest.raises(FormatError, match=r"a\.mat.*missing key.*inst_map"):
        read_consep(folder)


def test_wrong_shape_names_file(tmp_path):
    folder, inst = _one(tmp_path)
    sio.savemat(folder / "Labels" / "a.mat", {"inst_map": inst, "inst_type": np.ones((3, 1)), "inst_centroid": np.zeros((3, 3))})
    with pytest.raises(FormatError, match=r"a\.mat.*inst_centroid.*shape"):
        read_consep(folder)
    sio.savemat(folder / "Labels" / "a.mat", {"inst_map": np.zeros((4, 4, 2), np.int32), "inst_type": np.ones((3, 1))})
    with pytest.raises(FormatError, match=r"a\.mat.*inst_map.*2-D"):
        read_consep(folder)


def test_image_label_size_mismatch(tmp_path):
    folder, inst = _one(tmp_path)
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(folder / "Images" / "a.png")
    with pytest.raises(FormatError, match=r"a\.mat.*must match"):
        read_consep(folder)


def test_truncated_mat(tmp_path):
    folder, _ = _one(tmp_path)
    p = folder / "Labels" / "a.mat"
    p.write_bytes(p.read_bytes()[:200])
    with pytest.raises(FormatError, match=r"a\.mat.*truncated"):
        read_consep(folder)


def test_truncated_image(tmp_path):
    folder, _ = _one(tmp_path)
    p = folder / "Images" / "a.png"
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(FormatError, match=r"a\.png"):
        read_consep(folder)


def test_missing_image_names_label(tmp_path):
    folder, _ = _one(tmp_path)
    (folder / "Images" / "a.png").unlink()
    with pytest.raises(FormatError, match=r"a\.mat.*no image"):
        read_consep(folder)


def test_class_ids_beyond_any_merge(tmp_path):
    inst, _ = disk_layout_arrays()
    folder = make_consep(tmp_path / "c", {"a": (inst, np.array([1, 2, 9]))})
    with pytest.raises(FormatError, match=r"a\.mat.*class id 9"):
        read_consep(folder)


def test_not_a_consep_folder(tmp_path):
    with pytest.raises(FormatError, match="Images/ and Labels/"):
        read_consep(tmp_path)


def test_single_mat_file_source(tmp_path):
    inst, classes = disk_layout_arrays()
    folder = make_consep(tmp_path / "c", {"a_1_2": (inst, np.array(classes))})
    (s,) = read_source(folder / "Labels" / "a_1_2.mat")
    assert s.provenance["tile"] == "a_1" and s.layout.classes.tolist() == list(classes)
