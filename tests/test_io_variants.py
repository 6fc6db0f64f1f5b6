"""Format variants real users' files come in: bit depth, byte-order marks, PanNuke's
background-first re-save, huge instance ids. Every input is built here."""

from __future__ import annotations

import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.io as sio
import tifffile
from PIL import Image

from nucsynth.io import FormatError, read_consep, read_folder, read_pannuke
from nucsynth.io._common import read_image
from nucsynth.layout import CONSEP_CLASSES, PANNUKE_CLASSES

RNG = np.random.default_rng(0)
IMG12 = RNG.integers(0, 4096, (16, 16, 3)).astype(np.uint16)  # 12-bit camera data in 16-bit words


def _peak_mb(fn):
    tracemalloc.start()
    try:
        out = fn()
        return out, tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


# ---------------------------------------------------------------------- 16-bit images
def _write16(path: Path, arr: np.ndarray) -> Path:
    if path.suffix == ".png":
        cv2 = pytest.importorskip("cv2")
        assert cv2.imwrite(str(path), arr[..., ::-1] if arr.ndim == 3 else arr)
    else:
        tifffile.imwrite(path, arr, photometric="rgb" if arr.ndim == 3 else "minisblack")
    return path


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16bit_rgb_is_refused_not_cut(tmp_path, suffix):
    p = _write16(tmp_path / f"a{suffix}", IMG12)
    with pytest.raises(FormatError, match=r"a\.(png|tif): image is 16-bit \(largest value \d+\).*source_bits"):
        read_image(p)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16bit_converted_only_on_explicit_depth(tmp_path, suffix):
    p = _write16(tmp_path / f"a{suffix}", IMG12)
    want = np.rint(IMG12.astype(np.float64) * 255 / 4095).astype(np.uint8)
    np.testing.assert_array_equal(read_image(p, source_bits=12), want)
    np.testing.assert_array_equal(read_image(p, source_bits=16), np.rint(IMG12 * (255 / 65535)).astype(np.uint8))
    with pytest.raises(FormatError, match=r"value \d+, above the 10-bit range 0..1023"):
        read_image(p, source_bits=10)
    with pytest.raises(ValueError, match="9..16"):
        read_image(p, source_bits=8)


def test_16bit_grey_png_and_8bit_images_unchanged(tmp_path):
    g = _write16(tmp_path / "g.png", IMG12[..., 0])
    with pytest.raises(FormatError, match="16-bit"):
        read_image(g)
    assert (read_image(g, source_bits=12)[..., 2] == np.rint(IMG12[..., 0] * (255 / 4095))).all()
    rgb8 = RNG.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    Image.fromarray(rgb8).save(tmp_path / "c.png")
    tifffile.imwrite(tmp_path / "p.tif", np.moveaxis(rgb8, -1, 0), photometric="rgb", planarconfig="separate")
    for name in ("c.png", "p.tif"):
        np.testing.assert_array_equal(read_image(tmp_path / name), rgb8)
        np.testing.assert_array_equal(read_image(tmp_path / name, source_bits=12), rgb8)  # 8-bit: option unused
    tifffile.imwrite(tmp_path / "f.tif", rgb8.astype(np.float32))
    with pytest.raises(FormatError, match="float32, not 8-bit"):
        read_image(tmp_path / "f.tif")


def _folder(root: Path, inst: np.ndarray, image: np.ndarray, csv: str | None = None, csv_bytes: bytes | None = None) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    tifffile.imwrite(root / "labels" / "a_0.tif", inst)
    if image.dtype == np.uint16:
        tifffile.imwrite(root / "images" / "a_0.tif", image, photometric="rgb")
    else:
        Image.fromarray(image).save(root / "images" / "a_0.png")
    if csv is not None or csv_bytes is not None:
        (root / "classes.csv").write_bytes(csv_bytes if csv_bytes is not None else csv.encode())
    return root


def test_folder_16bit_image_option(tmp_path):
    inst = np.zeros((16, 16), np.uint16)
    inst[2:6, 2:6] = 3
    f = _folder(tmp_path / "f", inst, IMG12)
    with pytest.raises(FormatError, match=r"a_0\.tif: image is 16-bit"):
        read_folder(f)
    (s,) = read_folder(f, source_bits=12)
    assert s.image.max() > 200  # not nearly black: the 12-bit range fills 0..255


# ---------------------------------------------------------------------- class CSV with a BOM
def test_folder_class_csv_with_byte_order_mark(tmp_path):
    inst = np.zeros((16, 16), np.uint16)
    inst[2:6, 2:6], inst[9:12, 9:14] = 4, 7
    text = "image,id,class\r\na_0,4,spindle\r\na_0,7,other\r\n"  # as a spreadsheet program saves it
    f = _folder(tmp_path / "f", inst, np.zeros((16, 16, 3), np.uint8), csv_bytes=b"\xef\xbb\xbf" + text.encode())
    (s,) = read_folder(f)
    assert s.layout.class_set == CONSEP_CLASSES and s.layout.classes.tolist() == [4, 1]


# ---------------------------------------------------------------------- huge ids
def test_folder_label_image_holding_id_2_31_minus_1_within_a_few_mb(tmp_path):
    inst = np.zeros((16, 16), np.uint32)
    inst[2:6, 2:6] = 2**31 - 1
    inst[9:12, 9:14] = 5
    csv = "image,id,class\na_0,2147483647,spindle\na_0,5,other\n"
    f = _folder(tmp_path / "f", inst, np.zeros((16, 16, 3), np.uint8), csv=csv)
    (s,), peak = _peak_mb(lambda: read_folder(f))
    assert peak < 4, f"{peak:.1f} MB"
    assert s.layout.classes.tolist() == [1, 4] and (s.layout.inst_map[2:6, 2:6] == 2).all()
    (t,), peak = _peak_mb(lambda: read_folder(_folder(tmp_path / "g", inst, np.zeros((16, 16, 3), np.uint8))))
    assert peak < 4 and t.layout.num_nuclei == 2


def test_consep_type_map_with_huge_id_within_a_few_mb(tmp_path):
    (tmp_path / "Images").mkdir()
    (tmp_path / "Labels").mkdir()
    inst = np.zeros((16, 16), np.int32)
    inst[2:6, 2:6], inst[9:12, 9:14] = 2**31 - 1, 3
    tmap = np.where(inst == 3, 2, np.where(inst > 0, 4, 0)).astype(np.int32)
    sio.savemat(tmp_path / "Labels" / "t_1.mat", {"inst_map": inst, "type_map": tmap})
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "Images" / "t_1.png")
    (s,), peak = _peak_mb(lambda: read_consep(tmp_path))
    assert peak < 4, f"{peak:.1f} MB"
    assert s.layout.classes.tolist() == [2, 4]
    sio.savemat(tmp_path / "Labels" / "t_1.mat", {"inst_map": inst, "inst_type": np.array([[1], [2], [3]])})
    with pytest.raises(FormatError, match=r"t_1\.mat: inst_type has 3 entries but inst_map holds ids up to 2147483647"):
        read_consep(tmp_path)


# ---------------------------------------------------------------------- PanNuke variants
def _pannuke(folder: Path, masks: np.ndarray) -> Path:
    folder.mkdir(parents=True)
    n, h, w, _ = masks.shape
    np.save(folder / "images.npy", np.zeros((n, h, w, 3), np.float64))
    np.save(folder / "masks.npy", masks)
    np.save(folder / "types.npy", np.array(["Colon"] * n))
    return folder


def _release_masks() -> np.ndarray:
    masks = np.zeros((3, 32, 32, 6), np.float64)
    masks[0, 2:8, 2:8, 0] = 7  # neoplastic
    masks[0, 10:16, 10:16, 1] = 7  # inflammatory
    masks[0, 20:25, 3:9, 4] = 2  # epithelial
    masks[1, 4:9, 20:26, 3] = 11  # dead
    masks[..., 5] = (masks[..., :5].sum(-1) == 0)  # patch 2 is empty
    return masks


def test_pannuke_background_first_variant_is_detected(tmp_path):
    rel = _release_masks()
    a = read_pannuke(_pannuke(tmp_path / "rel", rel))
    b = read_pannuke(_pannuke(tmp_path / "bgf", np.concatenate([rel[..., 5:], rel[..., :5]], axis=-1)))
    assert [s.provenance["mask_channels"] for s in a] == ["release"] * 3
    assert [s.provenance["mask_channels"] for s in b] == ["background-first"] * 3
    for x, y in zip(a, b):
        assert x.layout.equals(y.layout)
    assert a[0].layout.classes.tolist() == [1, 2, 5] and a[1].layout.classes.tolist() == [4]
    assert a[2].layout.num_nuclei == 0 and b[2].layout.num_nuclei == 0  # not one patch-sized nucleus
    # An empty patch read alone decides by itself: its background channel is the one that is set.
    (e,) = read_pannuke(tmp_path / "bgf", indices=[2])
    assert e.layout.num_nuclei == 0


def test_pannuke_mixed_channel_orders_are_refused(tmp_path):
    rel = _release_masks()
    mixed = rel.copy()
    mixed[1] = np.concatenate([rel[1, ..., 5:], rel[1, ..., :5]], axis=-1)
    with pytest.raises(FormatError, match=r"masks\.npy: image 1 has its background in channel 0, other images in channel 5: the masks mix two channel orders"):
        read_pannuke(_pannuke(tmp_path / "m", mixed))


def test_pannuke_without_background_channel_warns(tmp_path):
    rel = _release_masks()
    rel[..., 5] = 0
    with pytest.warns(UserWarning, match="no patch has a background mask"):
        s = read_pannuke(_pannuke(tmp_path / "n", rel))
    assert s[0].layout.classes.tolist() == [1, 2, 5]


def test_pannuke_huge_id_within_a_few_mb(tmp_path):
    rel = _release_masks()
    rel[0, 2:8, 2:8, 0] = 2**31 - 1
    rel[0, 26:30, 26:30, 2] = 2.0**40  # beyond int32, still one nucleus
    rel[0, ..., 5] = (rel[0, ..., :5].sum(-1) == 0)
    f = _pannuke(tmp_path / "h", rel)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (s, _, _), peak = _peak_mb(lambda: read_pannuke(f))
    assert peak < 4, f"{peak:.1f} MB"
    assert s.layout.class_set == PANNUKE_CLASSES and sorted(s.layout.classes.tolist()) == [1, 2, 3, 5]


def test_prepare_16bit_folder_refused_in_one_line_then_converted_with_source_bits(tmp_path, capsys):
    from nucsynth.cli import main
    from nucsynth.io.store import DatasetStore

    inst = np.zeros((16, 16), np.uint16)
    inst[2:6, 2:6] = 3
    f = _folder(tmp_path / "f", inst, IMG12)
    out = tmp_path / "s.zarr"
    assert main(["prepare", str(f), str(out), "--patch-size", "16", "--val-fraction", "0"]) == 2
    (line,) = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
    assert line.startswith("nucsynth prepare: error: ") and "a_0.tif: image is 16-bit" in line and "--source-bits" in line
    assert not out.exists()
    assert main(["prepare", str(f), str(out), "--patch-size", "16", "--val-fraction", "0", "--source-bits", "12"]) == 0
    assert DatasetStore.open(out)[0].image.max() > 200
    assert main(["prepare", str(f), str(tmp_path / "t.zarr"), "--bad-vertices", "skip"]) == 2
    assert "--bad-vertices applies to monuseg sources, not 'folder'" in capsys.readouterr().err


@pytest.mark.parametrize("big", [2**31, 2**40, 2**63 + 5])
def test_label_ids_beyond_int32_are_refused_clearly(tmp_path, big):
    inst = np.zeros((16, 16), np.uint64)
    inst[2:6, 2:6] = big
    f = _folder(tmp_path / "f", inst, np.zeros((16, 16, 3), np.uint8))
    with pytest.raises(FormatError, match=rf"a_0\.tif: instance id {big} exceeds the int32 range.*renumber"):
        read_folder(f)


def test_folder_class_csv_as_spreadsheets_save_it(tmp_path):
    inst = np.zeros((16, 16), np.uint16)
    inst[2:6, 2:6], inst[9:12, 9:14] = 4, 7
    img = np.zeros((16, 16, 3), np.uint8)
    semi = "\ufeffImage;ID;Class\r\na_0;4;spindle\r\na_0;7;other\r\n"  # a ';' locale, capitalized header
    (s,) = read_folder(_folder(tmp_path / "a", inst, img, csv_bytes=semi.encode("utf-8")))
    assert s.layout.classes.tolist() == [4, 1]
    tab = "image\tid\tclass\na_0\t4\tspindle\na_0\t7\tother\n"
    (t,) = read_folder(_folder(tmp_path / "b", inst, img, csv=tab))
    assert t.layout.classes.tolist() == [4, 1]
    latin = "image,id,class\na_0,4,spindle\na_0,7,Ühm\n".encode("cp1252")  # "CSV (comma delimited)" of Windows
    with pytest.raises(FormatError, match=r"classes\.csv: not a UTF-8 text file.*save it as CSV UTF-8"):
        read_folder(_folder(tmp_path / "c", inst, img, csv_bytes=latin))
