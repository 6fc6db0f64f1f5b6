"""PanNuke, Lizard, plain-folder and QuPath GeoJSON readers on fixtures built in each
format's documented layout (no real files of these formats are available), plus detection."""

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.io as sio
import tifffile
from PIL import Image

from conftest import disk_layout_arrays
from nucsynth.io import (
    FormatError,
    detect_format,
    read_folder,
    read_geojson,
    read_lizard,
    read_pannuke,
    read_source,
    write_geojson,
)
from nucsynth.layout import CONSEP_CLASSES, LIZARD_CLASSES, NUCLEUS_CLASSES, PANNUKE_CLASSES, Layout, Sample


def _rgb(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, tuple(shape) + (3,), dtype=np.uint8)


# ---------------------------------------------------------------------- PanNuke
def make_pannuke(folder: Path, n: int = 2, release_layout: bool = False) -> Path:
    """images.npy (float64 0-255 as released), masks.npy (N,H,W,6), types.npy."""
    h = w = 32
    images = np.stack([_rgb((h, w), i) for i in range(n)]).astype(np.float64)
    masks = np.zeros((n, h, w, 6), np.float64)
    masks[0, 2:8, 2:8, 0] = 7  # neoplastic nucleus id 7
    masks[0, 10:16, 10:16, 1] = 7  # inflammatory nucleus, same id in another channel: a different nucleus
    masks[0, 20:25, 3:9, 4] = 2  # epithelial
    masks[..., 5] = (masks[..., :5].sum(-1) == 0).astype(np.float64)
    types = np.array(["Colon", "Breast"][:n] + ["Lung"] * max(0, n - 2))
    if release_layout:
        (folder / "images" / "fold1").mkdir(parents=True)
        (folder / "masks" / "fold1").mkdir(parents=True)
        np.save(folder / "images" / "fold1" / "images.npy", images)
        np.save(folder / "images" / "fold1" / "types.npy", types)
        np.save(folder / "masks" / "fold1" / "masks.npy", masks)
    else:
        folder.mkdir(parents=True)
        np.save(folder / "images.npy", images)
        np.save(folder / "masks.npy", masks)
        np.save(folder / "types.npy", types)
    return folder


@pytest.mark.parametrize("release_layout", [False, True])
def test_pannuke_channels_to_classes(tmp_path, release_layout):
    folder = make_pannuke(tmp_path / "p", release_layout=release_layout)
    s0, s1 = read_pannuke(folder)
    assert s0.layout.class_set == PANNUKE_CLASSES
    assert s0.layout.classes.tolist() == [1, 2, 5]
    assert s0.image.dtype == np.uint8
    np.testing.assert_allclose(s0.layout.centroids[0], (4.5, 4.5))
    assert s0.provenance["tissue"] == "Colon" and s1.layout.num_nuclei == 0
    assert s0.provenance["tile"] != s1.provenance["tile"]
    assert detect_format(folder) == "pannuke"


def test_pannuke_bad_inputs(tmp_path):
    folder = make_pannuke(tmp_path / "p")
    np.save(folder / "masks.npy", np.zeros((2, 32, 32, 5)))
    with pytest.raises(FormatError, match=r"masks\.npy.*6"):
        read_pannuke(folder)
    folder = make_pannuke(tmp_path / "q")
    raw = (folder / "images.npy").read_bytes()
    (folder / "images.npy").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(FormatError, match=r"images\.npy.*truncated"):
        read_pannuke(folder)
    folder = make_pannuke(tmp_path / "r")
    np.save(folder / "images.npy", np.full((2, 32, 32, 3), 0.5))
    with pytest.raises(FormatError, match=r"images\.npy.*whole numbers 0-255"):
        read_pannuke(folder)
    folder = make_pannuke(tmp_path / "s")
    (folder / "types.npy").unlink()
    with pytest.raises(FormatError, match=r"types\.npy"):
        read_pannuke(folder)


# ---------------------------------------------------------------------- Lizard
def make_lizard(folder: Path) -> tuple[Path, np.ndarray]:
    inst, _ = disk_layout_arrays()
    inst = np.where(inst > 0, inst * 10, 0)  # ids 10, 20, 30: matched by `id`, not row order
    (folder / "Lizard_Images1").mkdir(parents=True)
    (folder / "Lizard_Labels" / "Labels").mkdir(parents=True)
    Image.fromarray(_rgb(inst.shape)).save(folder / "Lizard_Images1" / "crag_1.png")
    ids = np.array([[30], [10], [20]])
    classes = np.array([[6], [2], [5]])
    cen_xy = np.array([[12, 36], [12, 10], [30, 30]], float)  # (x, y) of ids 30, 10, 20
    sio.savemat(folder / "Lizard_Labels" / "Labels" / "crag_1.mat",
                {"inst_map": inst.astype(np.int32), "id": ids, "class": classes, "centroid": cen_xy, "bbox": np.zeros((3, 4))})
    return folder, inst


def test_lizard_ids_classes_centroids(tmp_path):
    folder, inst = make_lizard(tmp_path / "l")
    (s,) = read_lizard(folder)
    assert s.layout.class_set == LIZARD_CLASSES
    # new ids in increasing old id: 10 -> 1 (class 2), 20 -> 2 (class 5), 30 -> 3 (class 6)
    assert s.layout.classes.tolist() == [2, 5, 6]
    np.testing.assert_array_equal(s.layout.inst_map, inst // 10)
    np.testing.assert_allclose(s.layout.centroids, [[10, 12], [30, 30], [36, 12]])
    assert detect_format(folder) == "lizard"


def test_lizard_bad_inputs(tmp_path):
    folder, inst = make_lizard(tmp_path / "l")
    mat = folder / "Lizard_Labels" / "Labels" / "crag_1.mat"
    sio.savemat(mat, {"inst_map": inst, "id": np.array([[10], [20], [30]]), "centroid": np.zeros((3, 2))})
    with pytest.raises(FormatError, match=r"crag_1\.mat.*missing key.*class"):
        read_lizard(folder)
    sio.savemat(mat, {"inst_map": inst, "id": np.array([[10], [20]]), "class": np.array([[1], [2]]), "centroid": np.zeros((2, 2))})
    with pytest.raises(FormatError, match=r"crag_1\.mat.*\[30\].*no class"):
        read_lizard(folder)
    sio.savemat(mat, {"inst_map": inst, "id": np.array([[10], [20], [30]]), "class": np.array([[1], [2], [9]]),
                      "centroid": np.zeros((3, 2))})
    with pytest.raises(FormatError, match=r"crag_1\.mat.*class ids \[9\]"):
        read_lizard(folder)
    sio.savemat(mat, {"inst_map": inst, "id": np.array([[10], [20], [30]]), "class": np.array([[1], [2], [3]]),
                      "centroid": np.zeros((3, 3))})
    with pytest.raises(FormatError, match=r"crag_1\.mat.*centroid.*shape"):
        read_lizard(folder)


# ---------------------------------------------------------------------- plain folder
def make_folder(folder: Path, csv_text: str | None, label_suffix: str = ".tif") -> tuple[Path, np.ndarray]:
    inst, _ = disk_layout_arrays()
    inst = np.where(inst == 3, 9, inst).astype(np.uint16)  # ids 1, 2, 9
    (folder / "images").mkdir(parents=True)
    (folder / "labels").mkdir()
    Image.fromarray(_rgb(inst.shape)).save(folder / "images" / "slide_4_0.png")
    if label_suffix == ".tif":
        tifffile.imwrite(folder / "labels" / "slide_4_0.tif", inst)
    else:
        Image.fromarray(inst).save(folder / "labels" / f"slide_4_0{label_suffix}")
    if csv_text is not None:
        (folder / "classes.csv").write_text(csv_text)
    return folder, inst


def test_folder_with_class_names(tmp_path):
    folder, _ = make_folder(tmp_path / "f", "image,id,class\nslide_4_0,1,spindle\nslide_4_0,2,Other\nslide_4_0,9,epithelial\n")
    (s,) = read_folder(folder, class_set=CONSEP_CLASSES)
    assert s.layout.classes.tolist() == [4, 1, 3]
    assert s.layout.num_nuclei == 3 and s.layout.inst_map.max() == 3
    assert s.provenance["tile"] == "slide_4"
    (t,) = read_folder(folder)  # no class set, names all of one known set: that set
    assert t.layout.class_set == CONSEP_CLASSES and t.layout.classes.tolist() == [4, 1, 3]
    assert detect_format(folder) == "folder"
    folder, _ = make_folder(tmp_path / "g", "image,id,class\nslide_4_0,1,tumour\nslide_4_0,2,Stroma\nslide_4_0,9,tumour\n")
    (u,) = read_folder(folder)  # names of no known set: a set built from the sorted names
    assert u.layout.class_set.names == ("Stroma", "tumour") and u.layout.classes.tolist() == [2, 1, 2]


def test_folder_png_labels_and_no_csv(tmp_path):
    folder, _ = make_folder(tmp_path / "f", None, ".png")
    (s,) = read_folder(folder)
    assert s.layout.class_set == NUCLEUS_CLASSES and s.layout.classes.tolist() == [0, 0, 0]


def test_folder_bad_inputs(tmp_path):
    folder, _ = make_folder(tmp_path / "a", "image,id,class\nslide_4_0,1,spindle\n")
    with pytest.raises(FormatError, match=r"classes\.csv.*\[2, 9\] have no class row"):
        read_folder(folder, class_set=CONSEP_CLASSES)
    folder, _ = make_folder(tmp_path / "b", "image,klass\nslide_4_0,1\n")
    with pytest.raises(FormatError, match=r"classes\.csv.*image,id,class"):
        read_folder(folder)
    folder, _ = make_folder(tmp_path / "c", "image,id,class\nslide_4_0,1,alien\nslide_4_0,2,other\nslide_4_0,9,other\n")
    with pytest.raises(FormatError, match=r"classes\.csv.*'alien'"):
        read_folder(folder, class_set=CONSEP_CLASSES)
    folder, _ = make_folder(tmp_path / "d", None)
    (folder / "images" / "slide_4_0.png").unlink()
    with pytest.raises(FormatError, match=r"slide_4_0\.tif.*no image"):
        read_folder(folder)
    folder, _ = make_folder(tmp_path / "e", None)
    tifffile.imwrite(folder / "labels" / "slide_4_0.tif", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(FormatError, match=r"slide_4_0\.tif.*single-channel"):
        read_folder(folder)


# ---------------------------------------------------------------------- GeoJSON
def _layout():
    inst, classes = disk_layout_arrays()
    inst[40:44, 2:4] = 4  # a small rectangle
    inst[46, 46] = 5  # one pixel
    inst[20:30, 20:23] = np.where(inst[20:30, 20:23] == 2, 0, inst[20:30, 20:23])  # a notch
    return Layout.from_inst_map(inst, list(classes) + [4, 0], CONSEP_CLASSES)


def test_geojson_round_trip_is_exact(tmp_path):
    lay = _layout()
    write_geojson(lay, tmp_path / "a.geojson")
    back = read_geojson(tmp_path / "a.geojson")
    assert back.equals(lay)
    img = _rgb(lay.shape)
    s = read_geojson(tmp_path / "a.geojson", image=img, class_set=CONSEP_CLASSES)
    assert isinstance(s, Sample) and s.layout.equals(lay)


def test_geojson_round_trip_random_masks(tmp_path):
    """Holes, several pieces, diagonal touches: outlines rasterize back to the same pixels."""
    from skimage.measure import label

    rng = np.random.default_rng(3)
    for trial in range(20):
        blobs = label(rng.random((16, 16)) < 0.55, connectivity=1)
        inst = np.where(blobs > 0, blobs % 3 + 1, 0).astype(np.int32)
        if len(np.unique(inst)) < 4:
            continue
        lay = Layout.from_inst_map(inst, [1, 2, 3], CONSEP_CLASSES)
        write_geojson(lay, tmp_path / "r.geojson")
        assert read_geojson(tmp_path / "r.geojson").equals(lay), trial


def test_geojson_qupath_conventions(tmp_path):
    """QuPath coordinates start at the pixel corner: the square x, y in [3, 6] covers pixels 3..5."""
    doc = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[3, 3], [6, 3], [6, 6], [3, 6], [3, 3]]]},
         "properties": {"objectType": "detection", "classification": {"name": "Tumor", "color": -65536}}},
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [10.5, 2.5]},
         "properties": {"classification": {"name": "Immune", "color": [0, 0, 255]}}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 8], [2, 8], [2, 10], [0, 10], [0, 8]]]},
         "properties": {}},
    ]}
    (tmp_path / "q.geojson").write_text(json.dumps(doc))
    lay = read_geojson(tmp_path / "q.geojson", shape=(12, 12))
    ys, xs = np.nonzero(lay.inst_map == 1)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (3, 5, 3, 5)
    assert lay.class_set.names == ("Tumor", "Immune")
    assert lay.class_set.colours[0] == (255, 0, 0)
    assert lay.classes.tolist() == [1, 2, 0]
    np.testing.assert_allclose(lay.centroids[1], (2, 10))  # the point nucleus, (y, x)
    assert not (lay.inst_map == 2).any()


def test_geojson_bad_inputs(tmp_path):
    p = tmp_path / "b.geojson"
    write_geojson(_layout(), p)
    text = p.read_text()
    p.write_text(text[: len(text) // 2])
    with pytest.raises(FormatError, match=r"b\.geojson.*JSON"):
        read_geojson(p)
    p.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "LineString", "coordinates": [[0, 0], [1, 1]]}, "properties": {}}]}))
    with pytest.raises(FormatError, match=r"b\.geojson.*LineString"):
        read_geojson(p)
    p.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [4, 0], [4, 4]]]},
         "properties": {"classification": {"name": "Alien"}}}]}))
    with pytest.raises(FormatError, match=r"b\.geojson.*Alien"):
        read_geojson(p, class_set=CONSEP_CLASSES)
    p.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[50, 50], [54, 50], [54, 54]]]}, "properties": {}}]}))
    with pytest.raises(FormatError, match=r"b\.geojson.*outside the 10x10"):
        read_geojson(p, shape=(10, 10))


def test_read_source_geojson_needs_image(tmp_path):
    p = tmp_path / "a.geojson"
    write_geojson(_layout(), p)
    with pytest.raises(ValueError, match="needs its image"):
        read_source(p)
    Image.fromarray(_rgb(_layout().shape)).save(tmp_path / "a.png")
    (s,) = read_source(p, image=tmp_path / "a.png")
    assert s.layout.equals(_layout())


def test_detect_unknown(tmp_path):
    with pytest.raises(FormatError, match="cannot tell the format"):
        detect_format(tmp_path)
    with pytest.raises(ValueError, match="unknown format"):
        read_source(tmp_path, "tiff-stack")


def test_single_mat_files(tmp_path):
    folder, inst = make_lizard(tmp_path / "l")
    mat = folder / "Lizard_Labels" / "Labels" / "crag_1.mat"
    assert detect_format(mat) == "lizard"
    (s,) = read_source(mat)
    np.testing.assert_array_equal(s.layout.inst_map, inst // 10)


def test_lizard_truncated_missing_image_and_point_rows(tmp_path):
    folder, inst = make_lizard(tmp_path / "l")
    mat = folder / "Lizard_Labels" / "Labels" / "crag_1.mat"
    # a row whose id has no pixel stays as a point nucleus at its (x, y) centroid
    sio.savemat(mat, {"inst_map": inst, "id": np.array([[10], [20], [30], [40]]), "class": np.array([[1], [2], [3], [4]]),
                      "centroid": np.array([[12, 10], [30, 30], [36, 12], [5.5, 44.0]])})
    (s,) = read_lizard(folder)
    assert s.layout.num_nuclei == 4 and not (s.layout.inst_map == 4).any()
    np.testing.assert_allclose(s.layout.centroids[3], (44.0, 5.5))
    mat.write_bytes(mat.read_bytes()[:150])
    with pytest.raises(FormatError, match=r"crag_1\.mat.*truncated"):
        read_lizard(folder)
    folder, _ = make_lizard(tmp_path / "m")
    (folder / "Lizard_Images1" / "crag_1.png").unlink()
    with pytest.raises(FormatError, match=r"crag_1\.mat.*no image"):
        read_lizard(folder)
