"""Helpers shared by the readers: image and label loading, .mat access, class merges.

Every helper raises :class:`~nucsynth.io.errors.FormatError` naming the file on bad input.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from nucsynth.io.errors import FormatError
from nucsynth.layout import ClassSet, Layout, LayoutError, Sample, relabel_contiguous

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
LABEL_SUFFIXES = (".tif", ".tiff", ".png")

# A patch of a larger tile is named "<tile>_<k>" where the tile itself ends in "_<n>"
# (CoNSeP patches: "train_10_003" -> tile "train_10"). A name without that double suffix
# is a tile of its own ("train_10" -> "train_10").
_PATCH_NAME = re.compile(r"^(?P<tile>.+_\d+)_\d+$")


def tile_of(stem: str) -> str:
    """The source-tile name of an image called ``stem`` (see ``_PATCH_NAME``)."""
    m = _PATCH_NAME.match(stem)
    return m.group("tile") if m else stem


def _high_depth_to_uint8(path: Path, arr: np.ndarray, source_bits: int | None) -> np.ndarray:
    """An 8-bit copy of a 16-bit image whose true depth is ``source_bits``; refused without it."""
    top = int(arr.max()) if arr.size else 0
    if source_bits is None:
        raise FormatError(
            path,
            f"image is {arr.dtype.itemsize * 8}-bit (largest value {top}); images must be 8-bit RGB. Convert it, or "
            "read it with source_bits=N (nucsynth prepare --source-bits N), N its true bit depth (e.g. 12 or 16), "
            "to scale 0..2^N-1 onto 0..255",
        )
    if not 9 <= int(source_bits) <= 16:
        raise ValueError(f"source_bits must be the true bit depth of a 16-bit image, 9..16; got {source_bits}")
    full = (1 << int(source_bits)) - 1
    if top > full:
        raise FormatError(path, f"image holds value {top}, above the {source_bits}-bit range 0..{full}: pass its true bit depth")
    return np.rint(arr.astype(np.float64) * (255.0 / full)).astype(np.uint8)


def _to_rgb(path: Path, arr: np.ndarray, source_bits: int | None) -> np.ndarray:
    """(H, W, 3) uint8 from a decoded grey / RGB / RGBA array (channels last or, for TIFF, first)."""
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[-1] not in (3, 4):
        arr = np.moveaxis(arr, 0, -1)  # planar TIFF (C, H, W)
    if arr.ndim == 3 and arr.shape[-1] in (2, 4):
        arr = arr[..., :-1]  # drop alpha
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise FormatError(path, f"expected a grey or RGB image, got an array of shape {arr.shape} (several pages or channels?)")
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype in (np.uint16, np.dtype(">u2")):
        return _high_depth_to_uint8(path, arr, source_bits)
    raise FormatError(path, f"image samples are {arr.dtype}, not 8-bit integers; convert it to 8-bit RGB first")


def _png_bit_depth(path: Path) -> int | None:
    """The bit depth stored in a PNG header (IHDR byte 24), None for other files."""
    with path.open("rb") as f:
        head = f.read(25)
    if len(head) == 25 and head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        return head[24]
    return None


def read_image(path: str | Path, source_bits: int | None = None) -> np.ndarray:
    """An RGB uint8 (H, W, 3) image from PNG / JPEG / TIFF / BMP.

    Grey images are repeated to 3 channels; an alpha channel is dropped. 16-bit images are
    refused with a FormatError (never silently cut to 8 bits) unless ``source_bits`` gives
    their true depth (9..16, e.g. 12 for 12-bit camera data): values 0..2^N-1 are then
    scaled to 0..255 (rounded); a value above that range is an error. Float images are
    refused. 16-bit PNGs are decoded with OpenCV (``opencv-python-headless``).
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if source_bits is not None and not 9 <= int(source_bits) <= 16:
        raise ValueError(f"source_bits must be the true bit depth of a 16-bit image, 9..16; got {source_bits}")
    if not path.is_file():
        raise FormatError(path, "image file not found")
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        try:
            decoded = tifffile.imread(path)
        except Exception:  # compressions tifffile cannot decode without extra codecs: try Pillow
            decoded = None
        if decoded is not None:
            return np.ascontiguousarray(_to_rgb(path, decoded, source_bits))
    if _png_bit_depth(path) == 16:  # Pillow decodes 16-bit RGB PNGs to 8 bits without a word
        try:
            import cv2
        except ImportError:
            _high_depth_to_uint8(path, np.zeros(1, np.uint16), source_bits)  # refuses when not asked to convert
            raise FormatError(path, "converting a 16-bit PNG needs OpenCV (pip install opencv-python-headless)") from None
        arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if arr is None:
            raise FormatError(path, "cannot decode the 16-bit PNG (truncated?)")
        if arr.ndim == 3:
            arr = arr[..., [2, 1, 0, 3][: arr.shape[2]]] if arr.shape[2] >= 3 else arr  # OpenCV keeps BGR(A)
        return np.ascontiguousarray(_to_rgb(path, arr, source_bits))
    try:
        with Image.open(path) as im:
            raw_modes = [str(t[3]) for t in (im.tile or [])]
            im.load()
            if any(";16" in m for m in raw_modes) and not im.mode.startswith("I;16"):
                # Pillow would hand back the 16-bit samples cut to 8 bits: never silently
                _high_depth_to_uint8(path, np.zeros(1, np.uint16), source_bits)
                raise FormatError(path, f"this {im.format} 16-bit image cannot be converted here: convert it to 8-bit RGB")
            if im.mode in ("RGB", "RGBA", "L", "LA", "P", "CMYK", "YCbCr"):
                arr = np.asarray(im.convert("RGB"))
            elif im.mode.startswith("I;16"):
                arr = _to_rgb(path, np.asarray(im).astype(np.uint16), source_bits)
            else:
                raise FormatError(
                    path, f"image mode {im.mode!r} is not 8-bit RGB or grey; convert it to 8-bit RGB first"
                )
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise FormatError(path, f"cannot decode the image (truncated or not an image): {e}") from None
    return np.ascontiguousarray(arr, dtype=np.uint8)


def read_label_image(path: str | Path) -> np.ndarray:
    """A 2-D integer instance map from TIFF or PNG (any integer depth)."""
    path = Path(path)
    if not path.is_file():
        raise FormatError(path, "label image not found")
    arr: np.ndarray | None = None
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        try:
            arr = tifffile.imread(path)
        except Exception:  # compressions tifffile cannot decode without extra codecs
            arr = None
    if arr is None:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as im:
                im.load()
                arr = np.asarray(im)
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise FormatError(path, f"cannot decode the label image (truncated or not an image): {e}") from None
    arr = np.squeeze(np.asarray(arr))
    if arr.ndim != 2:
        raise FormatError(path, f"an instance map must be a single-channel 2-D image, got shape {arr.shape}")
    if arr.dtype.kind not in "iub":
        raise FormatError(path, f"an instance map must hold integers, got dtype {arr.dtype}")
    if arr.size and arr.min() < 0:
        raise FormatError(path, f"instance ids must be >= 0, found {arr.min()}")
    if arr.size and int(arr.max()) > np.iinfo(np.int32).max:
        raise FormatError(path, f"instance id {int(arr.max())} exceeds the int32 range (up to {np.iinfo(np.int32).max}); "
                                "renumber the nuclei 1..N")
    return arr.astype(np.int64)


def load_mat(path: str | Path, required: Iterable[str]) -> dict[str, Any]:
    """Variables of a MATLAB .mat file (v4-v7.2), checking that ``required`` keys exist."""
    import scipy.io as sio

    path = Path(path)
    if not path.is_file():
        raise FormatError(path, "label file not found")
    try:
        mat = sio.loadmat(path)
    except NotImplementedError:
        raise FormatError(path, "MATLAB v7.3 (HDF5) files are not supported; re-save with -v7") from None
    except Exception as e:  # scipy raises several types for truncated / foreign files
        raise FormatError(path, f"cannot read the .mat file (truncated or not a .mat file): {e}") from None
    missing = [k for k in required if k not in mat]
    if missing:
        keys = sorted(k for k in mat if not k.startswith("__"))
        raise FormatError(path, f"missing key(s) {missing}; found {keys}")
    return mat


def int_vector(path: Path, value: Any, key: str, n: int | None = None) -> np.ndarray:
    """``value`` as an int64 vector (an (N, 1) or (1, N) matrix is flattened)."""
    arr = np.asarray(value)
    if arr.size == 0:
        return np.zeros(0, np.int64)
    if arr.ndim > 2 or (arr.ndim == 2 and 1 not in arr.shape):
        raise FormatError(path, f"{key!r} must be a vector or an (N, 1) matrix, got shape {arr.shape}")
    arr = arr.ravel()
    if arr.dtype.kind == "f" and not np.all(arr == np.round(arr)):
        raise FormatError(path, f"{key!r} must hold whole numbers")
    if arr.dtype.kind not in "iubf":
        raise FormatError(path, f"{key!r} must be numeric, got dtype {arr.dtype}")
    if n is not None and arr.size != n:
        raise FormatError(path, f"{key!r} has {arr.size} entries, expected {n}")
    return arr.astype(np.int64)


def xy_to_yx(path: Path, value: Any, key: str, n: int) -> np.ndarray:
    """An (N, 2) array of (x, y) points converted to the engine's (y, x) order."""
    arr = np.asarray(value, dtype=np.float64)
    if arr.size == 0 and n == 0:
        return np.zeros((0, 2))
    if arr.shape != (n, 2):
        raise FormatError(path, f"{key!r} must have shape ({n}, 2) of (x, y) points, got {arr.shape}")
    return arr[:, ::-1].copy()


def inst_map_2d(path: Path, value: Any, key: str = "inst_map") -> np.ndarray:
    """A validated 2-D non-negative integer instance map."""
    arr = np.asarray(value)
    if arr.ndim != 2 or arr.size == 0:
        raise FormatError(path, f"{key!r} must be a non-empty 2-D array, got shape {arr.shape}")
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise FormatError(path, f"{key!r} must hold whole-number ids")
    elif arr.dtype.kind not in "iub":
        raise FormatError(path, f"{key!r} must be an integer array, got dtype {arr.dtype}")
    if arr.min() < 0:
        raise FormatError(path, f"{key!r} has negative ids (min {arr.min()})")
    if arr.max() > np.iinfo(np.int32).max:
        raise FormatError(path, f"{key!r} ids exceed the int32 range")
    return arr.astype(np.int32)


def layout_from_ids(
    path: Path,
    inst_map: np.ndarray,
    ids: np.ndarray,
    classes: np.ndarray,
    class_set: ClassSet,
    centroids: np.ndarray | None = None,
) -> Layout:
    """A Layout from an instance map whose nuclei are listed by ``ids`` (any order, gaps ok).

    Nucleus ``ids[i]`` has class ``classes[i]`` (and centroid ``centroids[i]`` in (y, x), if
    given). New ids are 1..N in increasing order of the old id; listed ids with no pixels
    stay as point nuclei (centroid from the file, so ``centroids`` is then needed). Pixels of
    an id that is not listed are an error: they would be a nucleus with no class.
    """
    ids = np.asarray(ids, np.int64)
    if ids.size != np.unique(ids).size:
        raise FormatError(path, "nucleus ids are listed more than once")
    if ids.size and ids.min() < 1:
        raise FormatError(path, f"nucleus ids must be >= 1, found {ids.min()}")
    present = np.unique(inst_map)
    present = present[present != 0]
    unlisted = np.setdiff1d(present, ids)
    if unlisted.size:
        raise FormatError(path, f"instance ids {unlisted[:5].tolist()} appear in the map but have no class entry")
    order = np.argsort(ids, kind="stable")
    ids, classes = ids[order], np.asarray(classes, np.int64)[order]
    # id -> rank by binary search: memory follows the pixels and nuclei, never the largest id
    # (every nonzero pixel's id is listed, checked above).
    new_map = np.zeros(inst_map.shape, np.int32)
    fg = inst_map != 0
    new_map[fg] = (np.searchsorted(ids, inst_map[fg]) + 1).astype(np.int32)
    has_pixels = np.isin(ids, present)
    if centroids is None:
        if not has_pixels.all():
            raise FormatError(path, f"nucleus ids {ids[~has_pixels][:5].tolist()} have no pixels and no centroid")
        return _validated(path, lambda: Layout.from_inst_map(new_map, classes, class_set))
    cen = np.asarray(centroids, np.float64)[order]
    return _validated(path, lambda: Layout(new_map, classes, cen, class_set))


def layout_from_inst_map(path: Path, inst_map: np.ndarray, classes_by_id: np.ndarray | None, class_set: ClassSet) -> Layout:
    """A Layout from a map with ids 1..N and ``classes_by_id[i]`` = class of id i+1; gaps relabelled.

    ``classes_by_id`` may be None (all classes unknown, 0).
    """
    n = int(inst_map.max())
    if classes_by_id is not None and classes_by_id.size < n:
        raise FormatError(path, f"instance map holds id {n} but only {classes_by_id.size} classes are given")
    new, old = relabel_contiguous(inst_map)
    if classes_by_id is None:  # sized by the nuclei present, never by the largest id
        classes = np.zeros(old.size, np.int64)
    else:
        classes = classes_by_id[old - 1] if old.size else np.zeros(0, np.int64)
    return _validated(path, lambda: Layout.from_inst_map(new, classes, class_set))


def _validated(path: Path, build):
    try:
        return build()
    except LayoutError as e:
        raise FormatError(path, str(e)) from None


def make_sample(path: Path, layout: Layout, image: np.ndarray, provenance: dict[str, Any]) -> Sample:
    """A Sample, with image/label mismatches reported against ``path``."""
    if image.shape[:2] != layout.shape:
        raise FormatError(path, f"image is {image.shape[:2]} but the labels are {layout.shape}: they must match")
    return _validated(path, lambda: Sample(layout, image, provenance))


def find_image(folder: Path, stem: str, label_path: Path, suffixes: Iterable[str] = IMAGE_SUFFIXES) -> Path:
    """The image called ``stem`` + one of ``suffixes`` in ``folder`` (error names the label)."""
    for suf in suffixes:
        for cand in (folder / f"{stem}{suf}", folder / f"{stem}{suf.upper()}"):
            if cand.is_file():
                return cand
    raise FormatError(label_path, f"no image {stem}{{{','.join(suffixes)}}} for this label file in {folder}")


def check_class_ids(path: Path, classes: np.ndarray, class_set: ClassSet, where: str) -> None:
    """Refuse class ids outside 0..K with a message naming the file and the class set."""
    k = class_set.num_classes
    bad = classes[(classes < 0) | (classes > k)]
    if bad.size:
        raise FormatError(
            path,
            f"{where} holds class ids {sorted(set(bad.tolist()))[:8]} outside 0..{k} of the class set "
            f"{class_set.name!r} {list(class_set.names)}; pass the matching class merge or class set",
        )


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
