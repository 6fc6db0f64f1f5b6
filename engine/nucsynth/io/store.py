"""The dataset store: one zarr v3 group per dataset of equally sized patches.

Layout of the group (format version 2)::

    <store>/                      group attrs["nucsynth_store"] = {
                                      "format": "nucsynth-dataset", "version": 2,
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
      checksums   (N, 3)       uint32  CRC-32 of patch i: image, inst_map, table row

``images`` and ``inst_maps`` are created by the first append (their H, W come from the
first patch; every later patch must have the same size); every one of their chunks is
written, so a missing chunk file is damage. The table checksum covers the patch's
nucleus rows (offsets, classes, centroids), its split and its provenance
(:func:`row_checksums`). Version 1 stores (no checksums) are read without verification;
``nucsynth check --repair`` rewrites them as version 2.

Crash safety. Creation builds the group in a hidden temporary folder next to the target
and renames it into place, so a store path either does not exist or holds a complete
(empty) store. An append first grows the arrays and writes the new rows beyond the
committed ``count``, then updates ``count`` / ``num_nuclei`` in the group attributes as
its very last step. Readers only ever look at the first ``count`` rows, so a crash
mid-append leaves the previous contents readable and unchanged; the next append simply
overwrites the uncommitted rows (a store whose first append was cut has its patch arrays
made afresh). Every chunk and metadata file is itself written through a temporary file
and a rename by zarr's local store.

One writer at a time. Opening for appending takes an advisory lock (``flock``) on the
store folder, held until :meth:`DatasetStore.close` (or the object is collected); the
operating system releases it when the process dies, even by ``kill -9``. A second writer
gets :class:`StoreBusyError` naming the holder's PID, or waits with ``wait=True``.
Readers take no lock: they see the rows committed when they opened the store.

Integrity. Every patch read through ``store[i]`` or iteration is checked against its
checksums; damage raises :class:`StoreDamagedError` naming the patch. ``.images`` /
``.inst_maps`` (dask) are not checked; :meth:`DatasetStore.check` scans everything and
:func:`repair_store` drops what cannot be read.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, overload

import numpy as np

from nucsynth import outputs
from nucsynth.io.errors import FormatError
from nucsynth.layout import ClassSet, Layout, Sample

__all__ = [
    "DatasetStore",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "StoreBusyError",
    "StoreDamagedError",
    "IntegrityReport",
    "row_checksums",
    "repair_store",
    "temporary_path",
    "move_into_place",
]

FORMAT_NAME = "nucsynth-dataset"
FORMAT_VERSION = 2
_READABLE_VERSIONS = (1, 2)
_ATTR = "nucsynth_store"
_BATCH = 32  # patches read per block when iterating
_WRITE_BYTES = 64 << 20  # buffer about this much per write: few zarr calls, bounded memory
_TABLE_CHUNK = 65536  # rows per chunk of the flat nucleus tables
_STR_CHUNK = 1024  # rows per chunk of the per-patch string arrays
_SUM_CHUNK = 4096  # rows per chunk of the checksum table
_SUM_COLUMNS = ("images", "inst_maps", "table")
_ARRAYS = ("images", "inst_maps", "offsets", "classes", "centroids", "splits", "provenance", "checksums")


class StoreBusyError(OSError):
    """Another process (or another open handle) is writing the store."""

    def __init__(self, message: str) -> None:
        super().__init__(message)


class StoreDamagedError(FormatError):
    """A patch (or a table) of the store cannot be read or fails its checksum."""


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
        "id": uuid.uuid4().hex,  # tells two stores apart (e.g. the data a training run was resumed with)
    }


def temporary_path(path: str | Path, purpose: str = "creating") -> Path:
    """A hidden sibling of ``path`` to build a store in (:func:`nucsynth.outputs.temporary_path`)."""
    return outputs.temporary_path(path, purpose)


def move_into_place(tmp: Path, path: Path, overwrite: bool) -> None:
    """Put the finished folder ``tmp`` at ``path`` (:func:`nucsynth.outputs.replace_path`):
    an existing ``path`` is replaced only with ``overwrite``, and never left missing."""
    outputs.replace_path(tmp, path, overwrite)


def row_checksums(image: np.ndarray, inst_map: np.ndarray, start: int, classes: np.ndarray,
                  centroids: np.ndarray, split: str, provenance: str) -> tuple[int, int, int]:
    """CRC-32 of one patch: (image bytes, inst_map bytes, table row).

    The table row is the patch's first nucleus index and count, its classes (int64) and
    centroids (float64), split and provenance JSON text, all little-endian.
    """
    img = zlib.crc32(_bytes_view(image, np.uint8))
    inst = zlib.crc32(_bytes_view(inst_map, "<i4"))
    t = zlib.crc32(np.array([start, len(classes)], dtype="<i8").tobytes())
    t = zlib.crc32(np.ascontiguousarray(classes, dtype="<i8").tobytes(), t)
    t = zlib.crc32(np.ascontiguousarray(centroids, dtype="<f8").tobytes(), t)
    t = zlib.crc32(split.encode("utf-8") + b"\0" + provenance.encode("utf-8"), t)
    return img, inst, t


def _bytes_view(a: np.ndarray, dtype: Any) -> memoryview:
    """The bytes of ``a`` as ``dtype`` in C order, without a copy when it already is."""
    return memoryview(np.ascontiguousarray(a, dtype=dtype)).cast("B")


# ---------------------------------------------------------------------- the writer lock
def _lock_holder(fd: int) -> int | None:
    """PID holding a flock on the file of ``fd`` (Linux /proc/locks), or None."""
    st = os.fstat(fd)
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split()
        if "->" in parts or len(parts) < 6 or parts[1] != "FLOCK":
            continue
        dev_ino = parts[5].split(":")
        if len(dev_ino) == 3 and dev_ino[2] == str(st.st_ino):
            try:
                if int(dev_ino[0], 16) == os.major(st.st_dev) and int(dev_ino[1], 16) == os.minor(st.st_dev):
                    return int(parts[4])
            except ValueError:
                continue
    return None


class _WriterLock:
    """An exclusive advisory lock on a store folder (flock on the folder itself, so zarr
    sees no extra file). Released by :meth:`release` or when the process dies."""

    def __init__(self, path: Path, wait: bool | float = False) -> None:
        import time

        self.path = path
        self.fd: int | None = None
        try:
            import fcntl
        except ImportError:  # Windows: folders cannot be flock'ed there; no writer lock (docs/formats.md)
            return
        deadline = None if wait is True or wait is False else time.monotonic() + float(wait)
        while True:
            try:
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
            except OSError as e:
                raise FormatError(path, f"cannot open the store folder for writing: {e.strerror}") from None
            try:
                if wait is True:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                else:
                    self._try(fd, deadline)
            except BaseException:
                os.close(fd)
                raise
            # The folder may have been replaced (repair) while we waited: lock the new one.
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                os.close(fd)
                raise FileNotFoundError(f"no dataset store at {path} (removed while waiting for its writer)") from None
            if same:
                self.fd = fd
                return
            os.close(fd)

    def _try(self, fd: int, deadline: float | None) -> None:
        import fcntl
        import time

        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if deadline is None or time.monotonic() >= deadline:
                    pid = _lock_holder(fd)
                    who = f"PID {pid}" if pid is not None else "another process"
                    if pid == os.getpid():
                        who += " (this process: close the other handle first)"
                    waited = "" if deadline is None else " after waiting"
                    raise StoreBusyError(
                        f"store {self.path} is being written by {who}{waited}; wait for it to finish "
                        "or pass --wait (wait=True) to wait for it") from None
                time.sleep(0.1)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None

    def __del__(self) -> None:
        self.release()


@dataclass
class IntegrityReport:
    """What :meth:`DatasetStore.check` found.

    ``damaged``: patch index -> descriptions of what is wrong (these patches cannot be read
    correctly; :func:`repair_store` drops them). ``unverified``: patches whose stored
    checksums are lost but whose data reads (kept by repair, which writes new checksums).
    ``problems``: store-wide findings (unreadable tables, leftovers of killed writes).
    """

    path: Path
    count: int
    version: int
    damaged: dict[int, list[str]] = field(default_factory=dict)
    unverified: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    partial_files: list[Path] = field(default_factory=list)
    uncommitted: int = 0

    @property
    def ok(self) -> bool:
        """No damaged patch and no store-wide problem."""
        return not self.damaged and not self.problems

    def lines(self) -> list[str]:
        """The report as text lines (one per damaged patch)."""
        out = [f"{self.path}: {self.count} patches (format version {self.version})"]
        if self.version < 2:
            out.append("  version 1 store: no checksums, only readability was checked; "
                       "--repair rewrites it as version 2 with checksums")
        out += [f"  {p}" for p in self.problems]
        for i in sorted(self.damaged):
            out.append(f"  patch {i}: " + "; ".join(self.damaged[i]))
        if self.unverified:
            out.append(f"  {len(self.unverified)} patch(es) readable but their stored checksums are lost: "
                       f"{_ranges(self.unverified)} (--repair writes new ones)")
        if self.partial_files:
            out.append(f"  {len(self.partial_files)} temporary file(s) of killed writes inside the store "
                       "(--repair removes them)")
        if self.uncommitted:
            out.append(f"  {self.uncommitted} uncommitted row(s) of an interrupted append (ignored; "
                       "the next append overwrites them)")
        if self.ok:
            out.append("  all patches intact" if self.version >= 2 else "  all patches readable")
        else:
            out.append(f"  {len(self.damaged)} of {self.count} patches damaged")
        return out


def _ranges(idx: Sequence[int]) -> str:
    idx = sorted(idx)
    parts, i = [], 0
    while i < len(idx):
        j = i
        while j + 1 < len(idx) and idx[j + 1] == idx[j] + 1:
            j += 1
        parts.append(str(idx[i]) if i == j else f"{idx[i]}-{idx[j]}")
        i = j + 1
    return ", ".join(parts)


def _drain_zarr(timeout: float = 30.0) -> None:
    """Let the chunk writes zarr still has in flight finish after one of them failed (disk
    full, ...): otherwise they die at exit with pages of tracebacks after our one-line error."""
    import asyncio

    try:
        from zarr.core.sync import loop as zarr_loop
    except ImportError:  # another zarr layout: nothing to drain
        return
    lp = zarr_loop[0]
    if lp is None or not lp.is_running():
        return

    async def drain() -> None:
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        await asyncio.gather(*others, return_exceptions=True)  # also marks their errors as seen

    try:
        asyncio.run_coroutine_threadsafe(drain(), lp).result(timeout)
    except Exception:
        pass


class DatasetStore(Sequence[Sample]):
    """A zarr-backed sequence of equally sized Samples (see the module doc for the layout).

    Make one with :meth:`create`, reopen with :meth:`open`; ``store[i]`` gives a Sample
    (provenance included; checked against its checksums), ``len(store)`` the number of
    patches, ``.images`` / ``.inst_maps`` lazy dask arrays. A store opened for appending
    holds the writer lock until :meth:`close` (also a context manager).
    """

    def __init__(self, path: Path, group: Any, mode: str, lock: _WriterLock | None = None) -> None:
        self.path = Path(path)
        self._group = group
        self._mode = mode
        self._lock = lock
        self._tables: dict[str, np.ndarray] | None = None
        self._arrays: dict[str, Any] = {}  # zarr array handles (each lookup reads metadata)

    def _arr(self, name: str) -> Any:
        if name not in self._arrays:
            arr = self._group[name]
            if name in ("images", "inst_maps"):
                # Write every chunk, all-zero ones too: a missing chunk file then always means damage.
                arr = arr.with_config({"write_empty_chunks": True})
            self._arrays[name] = arr
        return self._arrays[name]

    def close(self) -> None:
        """Release the writer lock (the store stays readable through this object)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        if self._mode == "a":
            self._mode = "r"

    def __enter__(self) -> "DatasetStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ create / open
    @classmethod
    def create(
        cls,
        path: str | Path,
        class_set: ClassSet,
        attrs: dict[str, Any] | None = None,
        overwrite: bool = False,
    ) -> "DatasetStore":
        """Create an empty store at ``path`` (opened for appending, writer lock held).

        Refuses an existing path unless ``overwrite=True`` (FileExistsError), and an
        existing store that another process is writing (:class:`StoreBusyError`). The new
        store is built in a temporary folder and put in place in one step
        (:func:`nucsynth.outputs.replace_path`), so a failure never leaves a partial store
        and never loses the old one.
        """
        import zarr

        path = Path(path)
        outputs.check_output(path, overwrite, option="store")
        user_attrs = json.loads(json.dumps(attrs or {}, default=_json_default))
        old_lock = None
        if path.is_dir() and (path / "zarr.json").is_file():
            old_lock = _WriterLock(path)  # never replace a store someone is appending to
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_path(path)
        try:
            g = zarr.open_group(str(tmp), mode="w", zarr_format=3)
            g.create_array("offsets", shape=(1,), chunks=(_TABLE_CHUNK,), dtype="int64", fill_value=0)
            g.create_array("classes", shape=(0,), chunks=(_TABLE_CHUNK,), dtype="int64", fill_value=0)
            g.create_array("centroids", shape=(0, 2), chunks=(_TABLE_CHUNK, 2), dtype="float64", fill_value=0.0)
            g.create_array("splits", shape=(0,), chunks=(_STR_CHUNK,), dtype=str)
            g.create_array("provenance", shape=(0,), chunks=(_STR_CHUNK,), dtype=str)
            g.create_array("checksums", shape=(0, len(_SUM_COLUMNS)), chunks=(_SUM_CHUNK, len(_SUM_COLUMNS)),
                           dtype="uint32", fill_value=0)
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
        except OSError as e:
            if isinstance(e, (FileExistsError, outputs.OutputError)):
                raise
            raise outputs.OutputError(outputs.describe_os_error(e, path), e.errno) from None
        finally:
            if old_lock is not None:
                old_lock.release()
            if tmp.exists():
                outputs._remove_quietly(tmp)
        return cls.open(path, class_set, mode="a")

    @classmethod
    def open(
        cls, path: str | Path, class_set: ClassSet | None = None, mode: str = "r", wait: bool | float = False
    ) -> "DatasetStore":
        """Open an existing store; ``mode="a"`` allows :meth:`append`.

        Appending takes the writer lock: another writer raises :class:`StoreBusyError`
        (naming its PID) unless ``wait`` (True: wait as long as it takes; a number: at most
        that many seconds). Raises FileNotFoundError for a missing path,
        :class:`FormatError` for a folder that is not a store, has an unknown format version
        or damaged metadata, and ValueError when ``class_set`` is given and differs.
        """
        import zarr

        if mode not in ("r", "a"):
            raise ValueError(f"mode must be 'r' (read) or 'a' (append), got {mode!r}")
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no dataset store at {path}")
        lock = _WriterLock(path, wait) if mode == "a" and path.is_dir() else None
        try:
            try:
                g = zarr.open_group(str(path), mode="r" if mode == "r" else "r+", zarr_format=3)
            except Exception as e:  # zarr raises several types for foreign folders
                raise FormatError(path, f"not a zarr v3 group ({type(e).__name__}: {e})") from None
            meta = g.attrs.get(_ATTR)
            if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
                raise FormatError(path, "not a NucSynth dataset store (no 'nucsynth_store' attributes)")
            if meta.get("version") not in _READABLE_VERSIONS:
                raise FormatError(
                    path,
                    f"store format version {meta.get('version')!r} is not supported; this nucsynth reads "
                    f"versions {', '.join(map(str, _READABLE_VERSIONS))} (upgrade nucsynth or re-run `nucsynth prepare`)",
                )
            store = cls(path, g, mode, lock)
            store._check_structure()
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        if class_set is not None and store.class_set != class_set:
            store.close()
            raise ValueError(
                f"{path}: the store holds classes {store.class_set.name!r} {list(store.class_set.names)} "
                f"but {class_set.name!r} {list(class_set.names)} was requested"
            )
        return store

    def _check_structure(self) -> None:
        """Cheap check at open: every array is there and covers the committed rows."""
        n, m = len(self), self.num_nuclei
        need = {"offsets": n + 1, "classes": m, "centroids": m, "splits": n, "provenance": n}
        if self.version >= 2:
            need["checksums"] = n
        if n > 0:
            need.update(images=n, inst_maps=n)
        for name, rows in need.items():
            try:
                arr = self._arr(name)
            except Exception as e:
                raise StoreDamagedError(self.path, f"array {name!r} is missing or its metadata is damaged "
                                                   f"({type(e).__name__}); run `nucsynth check {self.path}`") from None
            if arr.shape[0] < rows:
                raise StoreDamagedError(self.path, f"array {name!r} has {arr.shape[0]} rows but the store commits "
                                                   f"{rows}; run `nucsynth check {self.path}`")

    # ------------------------------------------------------------------ metadata
    @property
    def _meta(self) -> dict[str, Any]:
        return dict(self._group.attrs[_ATTR])

    @property
    def version(self) -> int:
        """Format version of this store (1: no checksums; 2: current)."""
        return int(self._meta["version"])

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
        """(H, W) of every patch, or None before the first committed append."""
        if len(self) == 0 or "inst_maps" not in self._group:
            return None
        return tuple(self._arr("inst_maps").shape[1:])  # type: ignore[return-value]

    def __len__(self) -> int:
        return int(self._meta["count"])

    def __repr__(self) -> str:
        return f"DatasetStore({str(self.path)!r}, {len(self)} patches, classes={self.class_set.name!r})"

    # ------------------------------------------------------------------ lazy arrays
    def _dask(self, name: str) -> Any:
        import dask.array as da

        if len(self) == 0 or name not in self._group:
            raise ValueError(f"{self.path}: the store is empty (no patches appended yet)")
        return da.from_zarr(self._arr(name))[: len(self)]

    @property
    def images(self) -> Any:
        """Lazy dask array (N, H, W, 3) uint8, one chunk per patch (not checksum-verified)."""
        return self._dask("images")

    @property
    def inst_maps(self) -> Any:
        """Lazy dask array (N, H, W) int32, one chunk per patch (not checksum-verified)."""
        return self._dask("inst_maps")

    def _table(self) -> dict[str, np.ndarray]:
        """The small per-patch and per-nucleus arrays, read once and cached."""
        if self._tables is None:
            n, m = len(self), self.num_nuclei
            t: dict[str, np.ndarray] = {}
            for name, stop in (("offsets", n + 1), ("classes", m), ("centroids", m), ("splits", n),
                               ("provenance", n), ("checksums", n)):
                if name == "checksums" and self.version < 2:
                    continue
                try:
                    values = self._arr(name)[:stop]
                except Exception as e:
                    raise StoreDamagedError(self.path, f"the {name!r} table cannot be read ({type(e).__name__}: {e}); "
                                                       f"run `nucsynth check {self.path}`") from None
                t[name] = (np.array(list(values), dtype=str) if stop else np.zeros(0, str)) \
                    if name in ("splits", "provenance") else np.asarray(values)
            self._tables = t
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
        return self._sample(j, *self._read_patch(j), self.class_set)

    def _damaged(self, j: int, what: str) -> StoreDamagedError:
        return StoreDamagedError(self.path, f"patch {j} is damaged ({what}); `nucsynth check {self.path}` lists "
                                            "the damage and --repair drops damaged patches")

    def _read_patch(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        out = []
        for name in ("images", "inst_maps"):
            try:
                out.append(np.asarray(self._arr(name)[j]))
            except Exception as e:  # a truncated or garbled chunk fails to decode
                raise self._damaged(j, f"its {name} chunk cannot be decoded: {type(e).__name__}") from None
        return out[0], out[1]

    def _sample(self, j: int, image: np.ndarray, inst_map: np.ndarray, class_set: ClassSet, verify: bool = True) -> Sample:
        t = self._table()
        a, b = int(t["offsets"][j]), int(t["offsets"][j + 1])
        if verify and "checksums" in t:
            got = row_checksums(image, inst_map, a, t["classes"][a:b], t["centroids"][a:b], str(t["splits"][j]),
                                str(t["provenance"][j]))
            bad = [name for name, g, w in zip(_SUM_COLUMNS, got, t["checksums"][j]) if g != int(w)]
            if bad:
                raise self._damaged(j, " and ".join(f"{x} checksum mismatch" for x in bad))
        if not 0 <= a <= b <= len(t["classes"]):
            raise self._damaged(j, f"nucleus rows {a}:{b} out of range")
        try:
            prov = json.loads(t["provenance"][j])
            layout = Layout(inst_map, t["classes"][a:b], t["centroids"][a:b], class_set)
        except ValueError as e:
            raise self._damaged(j, f"{type(e).__name__}: {e}") from None
        return Sample(layout, image, prov)

    def __iter__(self) -> Iterator[Sample]:
        # Read blocks of patches at once: one zarr call fetches many chunks concurrently.
        n, cs = len(self), self.class_set
        for start in range(0, n, _BATCH):
            stop = min(n, start + _BATCH)
            try:
                images = np.asarray(self._arr("images")[start:stop])
                inst = np.asarray(self._arr("inst_maps")[start:stop])
            except Exception:  # some chunk is damaged: read one by one to name it
                for j in range(start, stop):
                    yield self._sample(j, *self._read_patch(j), cs)
                continue
            for k in range(stop - start):
                yield self._sample(start + k, images[k], inst[k], cs)

    # ------------------------------------------------------------------ append
    def _require_writable(self) -> None:
        if self._mode != "a":
            raise ValueError(f"{self.path} is open read-only; open it with mode='a' to append")

    def _ensure_patch_arrays(self, shape: tuple[int, int]) -> None:
        g = self._group
        have_arrays = "inst_maps" in self._arrays or ("inst_maps" in g and "images" in g)
        if have_arrays and len(self) > 0:
            have = tuple(self._arr("inst_maps").shape[1:])
            if have != shape:
                raise ValueError(
                    f"{self.path}: patches are {have} px in this store, got one of {shape}; "
                    "tile the source to the store's patch size first"
                )
            return
        if have_arrays and tuple(self._arr("inst_maps").shape[1:]) == shape and tuple(self._arr("images").shape[1:3]) == shape:
            return
        # No committed patch yet: (re)make both arrays, whatever an interrupted first append left.
        from zarr.codecs import BloscCodec

        h, w = shape
        # LZ4 with byte shuffle: several times faster to write than zstd at similar size.
        comp = BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")
        self._arrays.pop("images", None)
        self._arrays.pop("inst_maps", None)
        g.create_array("images", shape=(0, h, w, 3), chunks=(1, h, w, 3), dtype="uint8", fill_value=0,
                       compressors=comp, overwrite=True)
        g.create_array("inst_maps", shape=(0, h, w), chunks=(1, h, w), dtype="int32", fill_value=0,
                       compressors=comp, overwrite=True)

    def append(
        self, samples: Iterable[Sample], splits: str | Sequence[str] | Callable[[Sample], str] = "train"
    ) -> int:
        """Append samples (all of the store's patch size and class set); returns how many.

        ``splits`` is one split name for all, one per sample, or a function of the sample
        (handy when ``samples`` is a generator). Existing chunks are never rewritten; the
        patch count is committed last, so an error or a crash at any point leaves the store
        as it was (module doc). File-system errors (disk full, read-only) raise
        :class:`nucsynth.outputs.OutputError` naming the store.
        """
        self._require_writable()
        if self.version < 2:
            raise FormatError(self.path, "format version 1 store (no checksums) cannot be appended to; "
                                         f"`nucsynth check {self.path} --repair` rewrites it as version 2")
        try:
            return self._append(samples, splits)
        except OSError as e:
            _drain_zarr()
            if isinstance(e, outputs.OutputError):
                raise
            raise outputs.OutputError(outputs.describe_os_error(e, self.path, "append to")
                                      + f" (the store still holds its {len(self)} committed patches)", e.errno) from None

    def _append(self, samples: Iterable[Sample], splits: str | Sequence[str] | Callable[[Sample], str]) -> int:
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
        starts = m + np.concatenate([[0], np.cumsum(counts)[:-1]])
        sums = np.array([row_checksums(s.image, s.layout.inst_map, int(a), s.layout.classes, s.layout.centroids,
                                       lab, p) for s, a, lab, p in zip(batch, starts, labels, prov)], np.uint32)
        # Grow to exactly the new extent (this also cuts back rows left by a crashed append).
        for name, rows in (("images", n + b), ("inst_maps", n + b), ("splits", n + b), ("provenance", n + b),
                           ("checksums", n + b), ("offsets", n + b + 1), ("classes", m1), ("centroids", m1)):
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
        g("checksums")[n : n + b] = sums
        return m1

    # ------------------------------------------------------------------ integrity
    def check(self, progress: Callable[[int, int], None] | None = None) -> IntegrityReport:
        """Read every committed patch and table and compare with the stored checksums.

        Returns an :class:`IntegrityReport` naming each damaged patch and why (chunk file
        missing, chunk that cannot be decoded, checksum mismatch). ``progress(done, total)``
        is called every block of patches.
        """
        n, m = len(self), self.num_nuclei
        rep = IntegrityReport(self.path, n, self.version)
        damaged = rep.damaged
        tables: dict[str, np.ndarray] = {}
        bad_rows: dict[str, list[tuple[int, int, str]]] = {}
        for name, stop in (("offsets", n + 1), ("classes", m), ("centroids", m), ("splits", n),
                           ("provenance", n), ("checksums", n)):
            if name == "checksums" and self.version < 2:
                continue
            tables[name], bad_rows[name] = self._read_chunked(name, stop)
        off = tables["offsets"]

        def note(i: int, msg: str) -> None:
            damaged.setdefault(i, []).append(msg)

        for name in ("offsets", "splits", "provenance"):
            for a, b, why in bad_rows[name]:
                for i in range(max(0, a - (name == "offsets")), min(n, b)):
                    note(i, f"{name} {why}")
        for name in ("classes", "centroids"):
            for a, b, why in bad_rows[name]:
                hit = np.flatnonzero((off[1:] > a) & (off[:-1] < b))
                for i in hit.tolist():
                    note(int(i), f"nucleus {name} {why}")
        lost_sums = set()
        for a, b, why in bad_rows.get("checksums", []):
            lost_sums.update(range(a, min(n, b)))
        if "checksums" in tables:  # a missing chunk reads as zeros: the sums are lost, not the data
            step = int(self._arr("checksums").chunks[0])
            for k in range(-(-n // step)):
                if not self._chunk_file("checksums", k).is_file():
                    lost_sums.update(range(k * step, min(n, (k + 1) * step)))
        if np.any(np.diff(off) < 0) or (n and (off[0] != 0 or off[-1] != m)):
            rep.problems.append("the offsets table is inconsistent (nucleus rows out of order or not covering the table)")
        for start in range(0, n, _BATCH):
            for j in range(start, min(n, start + _BATCH)):
                self._check_patch(j, tables, damaged, j in lost_sums, rep)
            if progress is not None:
                progress(min(n, start + _BATCH), n)
        rep.damaged = dict(sorted(damaged.items()))
        rep.partial_files = sorted(self.path.rglob("*.partial"))
        try:
            rep.uncommitted = max(0, int(self._arr("images").shape[0]) - n) if "images" in self._group else 0
        except Exception:
            rep.uncommitted = 0
        return rep

    def _read_chunked(self, name: str, stop: int) -> tuple[np.ndarray, list[tuple[int, int, str]]]:
        """Rows [0, stop) of a table, chunk by chunk: (values, [(first, end, why) of unreadable chunks])."""
        arr = self._arr(name)
        step = int(arr.chunks[0])
        parts, bad = [], []
        for a in range(0, stop, step):
            b = min(stop, a + step)
            try:
                v = arr[a:b]
                v = np.array(list(v), dtype=str) if name in ("splits", "provenance") else np.asarray(v)
            except Exception as e:
                bad.append((a, b, f"chunk {a // step} cannot be decoded ({type(e).__name__})"))
                shape = (b - a,) + tuple(arr.shape[1:])
                v = np.full(shape, "", dtype=str) if name in ("splits", "provenance") else np.zeros(shape, arr.dtype)
            # (A missing table chunk reads as fill values, which may be legitimate: checksums decide.)
            parts.append(v)
        if not parts:
            shape = (0,) + tuple(arr.shape[1:])
            return (np.zeros(0, str) if name in ("splits", "provenance") else np.zeros(shape, arr.dtype)), bad
        return np.concatenate(parts), bad

    def _chunk_file(self, name: str, k: int) -> Path:
        ndim = len(self._arr(name).shape)
        return self.path / name / "c" / str(k) / Path(*(["0"] * (ndim - 1))) if ndim > 1 else self.path / name / "c" / str(k)

    def _check_patch(self, j: int, t: dict[str, np.ndarray], damaged: dict[int, list[str]], sums_lost: bool,
                     rep: IntegrityReport) -> None:
        data = {}
        for name in ("images", "inst_maps"):
            if not self._chunk_file(name, j).is_file() and self.version >= 2:
                damaged.setdefault(j, []).append(f"{name} chunk file missing ({self._chunk_file(name, j).relative_to(self.path)})")
                continue
            try:
                data[name] = np.asarray(self._arr(name)[j])
            except Exception as e:
                damaged.setdefault(j, []).append(f"{name} chunk cannot be decoded ({type(e).__name__})")
        if j in damaged or "checksums" not in t:
            return
        a, b = int(t["offsets"][j]), int(t["offsets"][j + 1])
        if not 0 <= a <= b <= len(t["classes"]):
            damaged.setdefault(j, []).append(f"nucleus rows {a}:{b} out of range")
            return
        got = row_checksums(data["images"], data["inst_maps"], a, t["classes"][a:b], t["centroids"][a:b],
                            str(t["splits"][j]), str(t["provenance"][j]))
        if sums_lost:
            rep.unverified.append(j)
            return
        for name, g, w in zip(_SUM_COLUMNS, got, t["checksums"][j]):
            if g != int(w):
                what = "nucleus table / split / provenance" if name == "table" else f"{name} chunk"
                damaged.setdefault(j, []).append(f"{what} damaged (checksum mismatch)")


def repair_store(path: str | Path, drop: Iterable[int], wait: bool | float = False,
                 report: IntegrityReport | None = None) -> int:
    """Rewrite the store at ``path`` without the patches ``drop``; returns how many remain.

    Holds the writer lock throughout; the rewritten store (format version 2, checksums
    recomputed, creation provenance kept, ``repaired`` added to its attributes) replaces the
    old one in one step (:func:`nucsynth.outputs.replace_path`), so a crash leaves the old
    store. Leftover ``*.partial`` files go with the old folder.
    """
    path = Path(path)
    drop_set = {int(i) for i in drop}
    old = DatasetStore.open(path, mode="a", wait=wait)
    try:
        cs, meta = old.class_set, old._meta
        keep = [j for j in range(len(old)) if j not in drop_set]
        t = old._table()
        tmp = temporary_path(path, "repairing")
        new = DatasetStore.create(tmp, cs, attrs=meta.get("attrs", {}))
        try:
            def rows() -> Iterator[Sample]:
                for j in keep:
                    image, inst = old._read_patch(j)
                    yield old._sample(j, image, inst, cs, verify=False)

            new.append(rows(), splits=[str(t["splits"][j]) for j in keep])
            new_meta = new._meta
            new_meta["created"] = meta["created"]
            new_meta["repaired"] = {"at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                                    "dropped": sorted(drop_set), "from_version": int(meta["version"]),
                                    "count_before": len(old)}
            new._group.attrs[_ATTR] = new_meta
            new.close()
            outputs.replace_path(tmp, path, overwrite=True)
        except BaseException:
            new.close()
            outputs._remove_quietly(tmp)
            raise
        return len(keep)
    finally:
        old.close()
