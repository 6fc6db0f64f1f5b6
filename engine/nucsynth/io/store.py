"""The dataset store: one zarr v3 group per dataset of equally sized patches.

Layout of the group (format version 1)::

    <store>/                      group attrs["nucsynth_store"] = {
                                      "format": "nucsynth-dataset", "version": 1,
                                      "count": N, "num_nuclei": M,
                                      "class_set": ClassSet.to_dict(),
                                      "created": {creation provenance}, "attrs": {user attrs}}
      images      (N, H, W, 3) uint8,  chunks (1, H, W, 3)   one chunk per patch
      inst_maps   (N, H, W)    int32,  chunks (1, H, W)
      offsets     (N + 1,)     int64   nuclei of patch i are rows offsets[i]:offsets[i+1]
      classes     (M,)         int64   class of each nucleus (ragged table, stored flat)
      centroids   (M, 2)       float64 (y, x) of each nucleus
      splits      (N,)         string  "train", "val", ...
      provenance  (N,)         string  JSON object per patch (source, tile, y0, x0, ...)

``images`` and ``inst_maps`` are created by the first append (their H, W come from the
first patch; every later patch must have the same size).

Crash safety. Creation builds the group in a hidden temporary folder next to the target
and renames it into place, so a store path either does not exist or holds a complete
(empty) store. An append first grows the arrays and writes the new rows beyond the
committed ``count``, then updates ``count`` / ``num_nuclei`` in the group attributes as
its very last step. Readers only ever look at the first ``count`` rows, so a crash
mid-append leaves the previous contents readable and unchanged; the next append simply
overwrites the uncommitted rows. (Every chunk and metadata file is itself written
through a temporary file and a rename by zarr's local store.) One writer at a time.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, overload

import numpy as np

from nucsynth.io.errors import FormatError
from nucsynth.layout import ClassSet, Layout, Sample

__all__ = ["DatasetStore", "FORMAT_NAME", "FORMAT_VERSION", "temporary_path", "move_into_place"]

FORMAT_NAME = "nucsynth-dataset"
FORMAT_VERSION = 1
_ATTR = "nucsynth_store"
_BATCH = 32  # patches read per block when iterating
_WRITE_BYTES = 64 << 20  # buffer about this much per write: few zarr calls, bounded memory
_TABLE_CHUNK = 65536  # rows per chunk of the flat nucleus tables
_STR_CHUNK = 1024  # rows per chunk of the per-patch string arrays


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"provenance value {o!r} of type {type(o).__name__} is not JSON-serializable")


def _creation_provenance() -> dict[str, Any]:
    from nucsynth import __version__

    return {
        "nucsynth_version": __version__,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
    }


def temporary_path(path: str | Path, purpose: str = "creating") -> Path:
    """A hidden sibling of ``path`` to build a store in before :func:`move_into_place`."""
    path = Path(path)
    return path.parent / f".{path.name}.{purpose}-{uuid.uuid4().hex}"


def move_into_place(tmp: Path, path: Path, overwrite: bool) -> None:
    """Rename the finished folder ``tmp`` to ``path``; an existing ``path`` is replaced only
    with ``overwrite`` (it is moved aside first and deleted after the rename)."""
    if path.exists():
        if not overwrite:
            raise FileExistsError(f"{path} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
        old = temporary_path(path, "replaced")
        os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    else:
        os.rename(tmp, path)


class DatasetStore(Sequence[Sample]):
    """A zarr-backed sequence of equally sized Samples (see the module doc for the layout).

    Make one with :meth:`create`, reopen with :meth:`open`; ``store[i]`` gives a Sample
    (provenance included), ``len(store)`` the number of patches, ``.images`` /
    ``.inst_maps`` lazy dask arrays.
    """

    def __init__(self, path: Path, group: Any, mode: str) -> None:
        self.path = Path(path)
        self._group = group
        self._mode = mode
        self._tables: dict[str, np.ndarray] | None = None
        self._arrays: dict[str, Any] = {}  # zarr array handles (each lookup reads metadata)

    def _arr(self, name: str) -> Any:
        if name not in self._arrays:
            self._arrays[name] = self._group[name]
        return self._arrays[name]

    # ------------------------------------------------------------------ create / open
    @classmethod
    def create(
        cls,
        path: str | Path,
        class_set: ClassSet,
        attrs: dict[str, Any] | None = None,
        overwrite: bool = False,
    ) -> "DatasetStore":
        """Create an empty store at ``path`` (opened for appending).

        Refuses an existing path unless ``overwrite=True``; the new store is built in a
        temporary folder and renamed into place, so a failure never leaves a partial store.
        """
        import zarr

        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
        user_attrs = json.loads(json.dumps(attrs or {}, default=_json_default))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_path(path)
        try:
            g = zarr.open_group(str(tmp), mode="w", zarr_format=3)
            g.create_array("offsets", shape=(1,), chunks=(_TABLE_CHUNK,), dtype="int64", fill_value=0)
            g.create_array("classes", shape=(0,), chunks=(_TABLE_CHUNK,), dtype="int64", fill_value=0)
            g.create_array("centroids", shape=(0, 2), chunks=(_TABLE_CHUNK, 2), dtype="float64", fill_value=0.0)
            g.create_array("splits", shape=(0,), chunks=(_STR_CHUNK,), dtype=str)
            g.create_array("provenance", shape=(0,), chunks=(_STR_CHUNK,), dtype=str)
            g["offsets"][0] = 0
            g.attrs[_ATTR] = {
                "format": FORMAT_NAME,
                "version": FORMAT_VERSION,
                "count": 0,
                "num_nuclei": 0,
                "class_set": class_set.to_dict(),
                "created": _creation_provenance(),
                "attrs": user_attrs,
            }
            move_into_place(tmp, path, overwrite)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return cls.open(path, class_set, mode="a")

    @classmethod
    def open(cls, path: str | Path, class_set: ClassSet | None = None, mode: str = "r") -> "DatasetStore":
        """Open an existing store; ``mode="a"`` allows :meth:`append`.

        Raises FileNotFoundError for a missing path, :class:`FormatError` for a folder that
        is not a store or has an unknown format version, and ValueError when ``class_set``
        is given and differs from the store's.
        """
        import zarr

        if mode not in ("r", "a"):
            raise ValueError(f"mode must be 'r' (read) or 'a' (append), got {mode!r}")
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no dataset store at {path}")
        try:
            g = zarr.open_group(str(path), mode="r" if mode == "r" else "r+", zarr_format=3)
        except Exception as e:  # zarr raises several types for foreign folders
            raise FormatError(path, f"not a zarr v3 group ({type(e).__name__}: {e})") from None
        meta = g.attrs.get(_ATTR)
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
            raise FormatError(path, "not a NucSynth dataset store (no 'nucsynth_store' attributes)")
        if meta.get("version") != FORMAT_VERSION:
            raise FormatError(
                path,
                f"store format version {meta.get('version')!r} is not supported; this nucsynth reads "
                f"version {FORMAT_VERSION} (upgrade nucsynth or re-run `nucsynth prepare`)",
            )
        store = cls(path, g, mode)
        if class_set is not None and store.class_set != class_set:
            raise ValueError(
                f"{path}: the store holds classes {store.class_set.name!r} {list(store.class_set.names)} "
                f"but {class_set.name!r} {list(class_set.names)} was requested"
            )
        return store

    # ------------------------------------------------------------------ metadata
    @property
    def _meta(self) -> dict[str, Any]:
        return dict(self._group.attrs[_ATTR])

    @property
    def class_set(self) -> ClassSet:
        """The store's ClassSet."""
        return ClassSet.from_dict(self._meta["class_set"])

    @property
    def attrs(self) -> dict[str, Any]:
        """User attributes given at creation (and later :meth:`update_attrs`), plus ``"created"``."""
        meta = self._meta
        return {**meta.get("attrs", {}), "created": meta["created"]}

    def update_attrs(self, **values: Any) -> None:
        """Add or replace user attributes (JSON-serializable)."""
        self._require_writable()
        meta = self._meta
        meta["attrs"] = {**meta.get("attrs", {}), **json.loads(json.dumps(values, default=_json_default))}
        self._group.attrs[_ATTR] = meta

    @property
    def num_nuclei(self) -> int:
        """Total number of nuclei over all committed patches."""
        return int(self._meta["num_nuclei"])

    @property
    def patch_shape(self) -> tuple[int, int] | None:
        """(H, W) of every patch, or None before the first append."""
        if "inst_maps" not in self._group:
            return None
        return tuple(self._group["inst_maps"].shape[1:])  # type: ignore[return-value]

    def __len__(self) -> int:
        return int(self._meta["count"])

    def __repr__(self) -> str:
        return f"DatasetStore({str(self.path)!r}, {len(self)} patches, classes={self.class_set.name!r})"

    # ------------------------------------------------------------------ lazy arrays
    def _dask(self, name: str) -> Any:
        import dask.array as da

        if name not in self._group:
            raise ValueError(f"{self.path}: the store is empty (no patches appended yet)")
        return da.from_zarr(self._arr(name))[: len(self)]

    @property
    def images(self) -> Any:
        """Lazy dask array (N, H, W, 3) uint8, one chunk per patch."""
        return self._dask("images")

    @property
    def inst_maps(self) -> Any:
        """Lazy dask array (N, H, W) int32, one chunk per patch."""
        return self._dask("inst_maps")

    def _table(self) -> dict[str, np.ndarray]:
        """The small per-patch and per-nucleus arrays, read once and cached."""
        if self._tables is None:
            n, m = len(self), self.num_nuclei
            g = self._group
            self._tables = {
                "offsets": np.asarray(g["offsets"][: n + 1]),
                "classes": np.asarray(g["classes"][:m]),
                "centroids": np.asarray(g["centroids"][:m]),
                "splits": np.array(list(g["splits"][:n]), dtype=str) if n else np.zeros(0, str),
                "provenance": np.array(list(g["provenance"][:n]), dtype=str) if n else np.zeros(0, str),
            }
        return self._tables

    @property
    def splits(self) -> np.ndarray:
        """Split label of every patch (N,) as strings."""
        return self._table()["splits"].copy()

    def indices(self, split: str) -> np.ndarray:
        """Indices of the patches in ``split`` (an empty array if none)."""
        return np.flatnonzero(self._table()["splits"] == split)

    def class_counts(self, split: str | None = None) -> np.ndarray:
        """Nuclei per class over the store (or one split): index 0 unknown, 1..K the classes."""
        t, k = self._table(), self.class_set.num_classes + 1
        if split is None:
            return np.bincount(t["classes"], minlength=k)
        per_row = np.repeat(t["splits"] == split, np.diff(t["offsets"]))
        return np.bincount(t["classes"][per_row], minlength=k)

    def provenance(self, i: int) -> dict[str, Any]:
        """Provenance of patch ``i``."""
        return json.loads(self._table()["provenance"][self._index(i)])

    # ------------------------------------------------------------------ items
    def _index(self, i: int) -> int:
        n = len(self)
        j = int(i) + n if int(i) < 0 else int(i)
        if not 0 <= j < n:
            raise IndexError(f"patch index {i} out of range for a store of {n} patches")
        return j

    @overload
    def __getitem__(self, i: int) -> Sample: ...
    @overload
    def __getitem__(self, i: slice) -> list[Sample]: ...

    def __getitem__(self, i: int | slice) -> Sample | list[Sample]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        j = self._index(i)
        return self._sample(j, np.asarray(self._arr("images")[j]), np.asarray(self._arr("inst_maps")[j]), self.class_set)

    def _sample(self, j: int, image: np.ndarray, inst_map: np.ndarray, class_set: ClassSet) -> Sample:
        t = self._table()
        a, b = int(t["offsets"][j]), int(t["offsets"][j + 1])
        layout = Layout(inst_map, t["classes"][a:b], t["centroids"][a:b], class_set)
        return Sample(layout, image, json.loads(t["provenance"][j]))

    def __iter__(self) -> Iterator[Sample]:
        # Read blocks of patches at once: one zarr call fetches many chunks concurrently.
        n, cs = len(self), self.class_set
        for start in range(0, n, _BATCH):
            stop = min(n, start + _BATCH)
            images = np.asarray(self._arr("images")[start:stop])
            inst = np.asarray(self._arr("inst_maps")[start:stop])
            for k in range(stop - start):
                yield self._sample(start + k, images[k], inst[k], cs)

    # ------------------------------------------------------------------ append
    def _require_writable(self) -> None:
        if self._mode != "a":
            raise ValueError(f"{self.path} is open read-only; open it with mode='a' to append")

    def _ensure_patch_arrays(self, shape: tuple[int, int]) -> None:
        g = self._group
        if "inst_maps" in self._arrays or "inst_maps" in g:
            have = tuple(self._arr("inst_maps").shape[1:])
            if have != shape:
                raise ValueError(
                    f"{self.path}: patches are {have} px in this store, got one of {shape}; "
                    "tile the source to the store's patch size first"
                )
            return
        from zarr.codecs import BloscCodec

        h, w = shape
        # LZ4 with byte shuffle: several times faster to write than zstd at similar size.
        comp = BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")
        g.create_array("images", shape=(0, h, w, 3), chunks=(1, h, w, 3), dtype="uint8", fill_value=0, compressors=comp)
        g.create_array("inst_maps", shape=(0, h, w), chunks=(1, h, w), dtype="int32", fill_value=0, compressors=comp)

    def append(
        self, samples: Iterable[Sample], splits: str | Sequence[str] | Callable[[Sample], str] = "train"
    ) -> int:
        """Append samples (all of the store's patch size and class set); returns how many.

        ``splits`` is one split name for all, one per sample, or a function of the sample
        (handy when ``samples`` is a generator). Existing chunks are never rewritten; the
        patch count is committed last (see the module doc).
        """
        self._require_writable()
        cs = self.class_set
        n0, m0 = len(self), self.num_nuclei
        n, m = n0, m0
        split_fn = splits if callable(splits) else None
        split_list = None if isinstance(splits, str) or split_fn is not None else [str(x) for x in splits]  # type: ignore[union-attr]
        batch: list[Sample] = []
        labels: list[str] = []
        buffered = 0
        for k, s in enumerate(samples):
            if not isinstance(s, Sample):
                raise TypeError(f"append takes Samples, got {type(s).__name__} at position {k}")
            if s.layout.class_set != cs:
                raise ValueError(f"sample {k} uses class set {s.layout.class_set.name!r}; the store holds {cs.name!r}")
            if split_list is not None and k >= len(split_list):
                raise ValueError(f"{len(split_list)} split labels given for more samples")
            label = str(split_fn(s)) if split_fn is not None else split_list[k] if split_list is not None else str(splits)
            if not label:
                raise ValueError(f"sample {k}: split labels must be non-empty strings")
            batch.append(s)
            labels.append(label)
            buffered += s.image.nbytes + s.layout.inst_map.nbytes
            if buffered >= _WRITE_BYTES:
                m = self._write_batch(batch, labels, n, m)
                n += len(batch)
                batch, labels, buffered = [], [], 0
        if batch:
            m = self._write_batch(batch, labels, n, m)
            n += len(batch)
        if split_list is not None and len(split_list) != n - n0:
            raise ValueError(f"{len(split_list)} split labels given for {n - n0} samples")
        if n > n0:
            meta = self._meta
            meta["count"], meta["num_nuclei"] = n, m  # the commit point: readers see the new rows now
            self._group.attrs[_ATTR] = meta
            self._tables = None
            self._arrays.clear()
        return n - n0

    def _write_batch(self, batch: list[Sample], labels: list[str], n: int, m: int) -> int:
        """Write ``batch`` as rows n.. and its nuclei as rows m..; returns the new nucleus count."""
        for shape in {s.layout.shape for s in batch}:
            self._ensure_patch_arrays(shape)
        g = self._arr
        b = len(batch)
        counts = np.array([s.layout.num_nuclei for s in batch], np.int64)
        m1 = m + int(counts.sum())
        prov = [json.dumps(s.provenance, default=_json_default, sort_keys=True) for s in batch]
        # Grow to exactly the new extent (this also cuts back rows left by a crashed append).
        for name, rows in (("images", n + b), ("inst_maps", n + b), ("splits", n + b), ("provenance", n + b),
                           ("offsets", n + b + 1), ("classes", m1), ("centroids", m1)):
            arr = g(name)
            arr.resize((rows,) + tuple(arr.shape[1:]))
        g("images")[n : n + b] = np.stack([s.image for s in batch])
        g("inst_maps")[n : n + b] = np.stack([s.layout.inst_map for s in batch])
        g("offsets")[n + 1 : n + b + 1] = m + np.cumsum(counts)
        if m1 > m:
            g("classes")[m:m1] = np.concatenate([s.layout.classes for s in batch])
            g("centroids")[m:m1] = np.concatenate([s.layout.centroids for s in batch])
        g("splits")[n : n + b] = np.array(labels, dtype=str)
        g("provenance")[n : n + b] = np.array(prov, dtype=str)
        return m1
