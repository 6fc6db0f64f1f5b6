"""Outputs: nothing is overwritten without ``overwrite``; with it, the old output stays in
place until the new one is complete.

Every command that writes a file or folder the user named goes through this module:

- :func:`check_output` runs before any long work: it refuses an existing output unless
  ``overwrite``, a folder that cannot be written, and tidies what killed runs left next to
  the output (:func:`tidy`).
- :func:`staged` yields a hidden temporary path next to the output (same file system);
  the caller builds the new file or folder there; on success it is put in place by
  :func:`replace_path`, on failure it is removed and the output is untouched.
- :func:`replace_path` swaps a finished folder with the old one in ONE step where the
  system allows it (Linux ``renameat2(RENAME_EXCHANGE)``), so a crash at any moment
  leaves the old or the new output at the path, never neither. Elsewhere it falls back to
  two renames; a crash between them leaves the old output under a hidden name that the
  next run on the same output puts back (:func:`tidy`). Files are replaced with one
  atomic ``os.replace``.

Temporary names are ``.<name>.<purpose>-<pid>-<8 hex>`` next to the output. A leftover
whose process is gone is the remains of a killed run: :func:`tidy` restores an old output
that was moved aside (when nothing is at the path) and removes everything else.

Errors of the file system (read-only folder, disk full, no permission) become one-line
:class:`OutputError` messages that name the user's path, never the temporary one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

__all__ = [
    "OutputError",
    "Leftover",
    "temporary_path",
    "replace_path",
    "check_output",
    "check_not_input",
    "staged",
    "partial_path",
    "Journal",
    "write_text",
    "write_json",
    "leftovers",
    "leftovers_in",
    "tidy",
    "describe_os_error",
    "as_os_error",
]

# .<name>.<purpose>-<pid>-<tag>; older releases wrote .<name>.<purpose>-<32 hex> (no pid)
# and checkpoints .<name>.tmp-<pid> / .<name>.old-<pid>.
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<purpose>[a-z]+)-(?P<pid>\d+)-(?P<tag>[0-9a-f]{8})$")
_LEGACY_UUID = re.compile(r"^\.(?P<name>.+)\.(?P<purpose>[a-z]+)-(?P<tag>[0-9a-f]{32})$")
_LEGACY_PID = re.compile(r"^\.(?P<name>.+)\.(?P<purpose>tmp|old)-(?P<pid>\d+)$")
REPLACED = "replaced"  # purpose of an old output moved aside during a replacement

Report = Callable[[str], None]


class OutputError(OSError):
    """An output cannot be written (read-only folder, disk full, permission); the message
    names the user's path. Nothing at that path was changed."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.errno = code  # the underlying errno (ENOSPC, EROFS, ...) when there is one


def _stderr(msg: str) -> None:
    print(f"nucsynth: {msg}", file=sys.stderr, flush=True)


def describe_os_error(e: OSError, path: str | Path, doing: str = "write") -> str:
    """One line for a file-system error ``e`` met while writing ``path`` (the user's path)."""
    code = getattr(e, "errno", None)
    if code == errno.ENOSPC:
        why = "the disk is full"
    elif code == errno.EDQUOT:
        why = "the disk quota is exceeded"
    elif code == errno.EROFS:
        why = "the file system is read-only"
    elif code in (errno.EACCES, errno.EPERM):
        why = "permission denied"
    else:
        why = e.strerror or str(e)
    return f"cannot {doing} {path}: {why}"


def as_os_error(e: BaseException) -> OSError | None:
    """``e`` itself if it is an OSError; for writers that report I/O failures as their own
    exception type with an "(os error N)" message (safetensors), the equivalent OSError."""
    if isinstance(e, OSError):
        return e
    m = re.search(r"os error (\d+)", str(e))
    if m is None:
        return None
    code = int(m.group(1))
    return OSError(code, os.strerror(code))


def temporary_path(path: str | Path, purpose: str = "writing") -> Path:
    """A hidden sibling of ``path`` to build the new output in (see the module doc)."""
    path = Path(path)
    if not re.fullmatch(r"[a-z]+", purpose):
        raise ValueError(f"purpose must be lowercase letters, got {purpose!r}")
    return path.parent / f".{path.name}.{purpose}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries to disk (after a rename); a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap ``a`` and ``b`` atomically (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):  # no glibc >= 2.28 / musl without it
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False  # the file system cannot exchange: fall back to two renames
    raise OSError(err, os.strerror(err), str(b))


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink(missing_ok=True)


def replace_path(tmp: str | Path, path: str | Path, overwrite: bool) -> None:
    """Put the finished file or folder ``tmp`` at ``path``.

    An existing ``path`` is replaced only with ``overwrite`` (else FileExistsError), and
    then so that a crash at any moment leaves the old or the new output (module doc).
    """
    tmp, path = Path(tmp), Path(path)
    exists = path.exists() or path.is_symlink()
    if exists and not overwrite:
        raise FileExistsError(f"{path} already exists; pass --overwrite to replace it")
    if not exists:
        if tmp.is_dir():
            os.rename(tmp, path)  # fails if another process created a non-empty folder meanwhile
        else:
            try:
                os.link(tmp, path)  # refuses an existing file: never a silent overwrite
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                os.rename(tmp, path)  # a file system without hard links
            else:
                os.unlink(tmp)
    elif not tmp.is_dir() and not path.is_dir():
        os.replace(tmp, path)  # atomic for files
    elif _exchange(tmp, path):
        _remove(tmp)  # tmp now holds the old output; a crash here leaves a leftover tidy() removes
    else:
        aside = temporary_path(path, REPLACED)
        os.rename(path, aside)
        os.rename(tmp, path)  # a crash between the two renames: tidy() puts `aside` back
        _remove(aside)
    fsync_dir(path.parent)


# ---------------------------------------------------------------------- leftovers of killed runs
@dataclass(frozen=True)
class Leftover:
    """A hidden temporary file or folder next to an output."""

    path: Path
    output: Path  # the output it belongs to
    purpose: str
    pid: int | None  # None: written by an older release that did not record it
    alive: bool  # its process is still running (or it cannot be told)

    @property
    def moved_aside(self) -> bool:
        """An old output moved aside during a replacement."""
        return self.purpose in (REPLACED, "old")


def _alive(pid: int | None) -> bool:
    if pid is None:
        return True  # cannot tell: never remove
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def leftovers_in(folder: str | Path) -> list[Leftover]:
    """Every temporary file/folder in ``folder`` (hidden names of this module), oldest first."""
    folder = Path(folder)
    try:
        names = [n for n in os.listdir(folder) if n.startswith(".")]
    except OSError:
        return []
    found = []
    for n in names:
        m = _TEMP.match(n) or _LEGACY_PID.match(n) or _LEGACY_UUID.match(n)
        if m is None:
            continue
        pid = int(m.group("pid")) if "pid" in m.groupdict() else None
        found.append(Leftover(folder / n, folder / m.group("name"), m.group("purpose"), pid, _alive(pid)))
    return sorted(found, key=lambda x: _mtime(x.path))


def _final_output(p: Path) -> Path:
    """The output a (possibly nested) temporary name belongs to: ``..a.x-1-ab.y-1-cd`` -> ``a``."""
    while True:
        m = _TEMP.match(p.name) or _LEGACY_PID.match(p.name) or _LEGACY_UUID.match(p.name)
        if m is None:
            return p
        p = p.parent / m.group("name")


def leftovers(path: str | Path) -> list[Leftover]:
    """Temporary files/folders of the output ``path`` (same folder, hidden names; also those
    of its temporary folders, e.g. a store being built inside a replacement), oldest first."""
    path = Path(path)
    return [lo for lo in leftovers_in(path.parent) if _final_output(lo.output) == path]


def _mtime(p: Path) -> float:
    try:
        return p.lstat().st_mtime
    except OSError:
        return 0.0


def _size(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    total = 0
    for root, _, files in os.walk(p):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, f)).st_size
    return total


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"


def tidy(path: str | Path, remove: bool = True, report: Report | None = _stderr) -> list[str]:
    """Deal with what killed runs left next to ``path``; returns (and reports) one line each.

    An old output moved aside is put back when nothing is at ``path`` (the replacement was
    cut between its two renames); other leftovers of finished processes are partial new
    outputs or old ones already replaced: removed (``remove=True``) or only listed.
    Leftovers of running processes, or of unknown processes, are listed and kept.
    """
    path = Path(path)
    lines: list[str] = []
    for lo in leftovers(path):
        who = f"process {lo.pid}" if lo.pid is not None else "an unknown process"
        if lo.alive:
            lines.append(f"{lo.path} belongs to {who}, which may still be writing {path}; left alone")
            continue
        if lo.moved_aside and lo.output == path and not (path.exists() or path.is_symlink()):
            if remove:
                os.rename(lo.path, path)
                lines.append(f"restored {path}: a killed run ({who}) had moved it aside to {lo.path.name} "
                             "while replacing it")
            else:
                lines.append(f"{lo.path} holds the previous {path}, moved aside by a killed run ({who})")
            continue
        size = _mb(_size(lo.path))
        what = "an old copy" if lo.moved_aside else "a partial output"
        if remove:
            try:
                _remove(lo.path)
            except OSError as e:
                lines.append(f"could not remove {lo.path} ({what} of {path} left by a killed run): {e.strerror}")
                continue
            lines.append(f"removed {lo.path.name} ({size}), {what} of {path} left by a killed run ({who})")
        else:
            lines.append(f"{lo.path} ({size}) is {what} of {path} left by a killed run ({who})")
    if report is not None:
        for line in lines:
            report(line)
    return lines


# ---------------------------------------------------------------------- checks and staging
def partial_path(out: str | Path) -> Path:
    """Where a resumable job builds ``out`` until it is complete: the hidden sibling
    ``.NAME.partial``. Unlike the temporary names above it is kept when the job is killed
    (:func:`tidy` leaves it alone), so that running the same job again resumes from it."""
    out = Path(out)
    return out.parent / f".{out.name}.partial"


def _json_scalar(x: Any) -> Any:
    """numpy scalars (np.int64, np.bool_, ...) as the Python values json can write."""
    if hasattr(x, "item"):
        return x.item()
    raise TypeError(f"{type(x).__name__} is not JSON serializable")


class Journal:
    """The finished units of a long, resumable job (e.g. the runs of the downstream protocol),
    one JSON line each after a first line of the job's settings.

    :meth:`append` writes a line and forces it to disk, so a job killed at any moment loses
    at most the unit it was working on; :meth:`load` reads what an earlier run of the same
    job finished, and refuses a journal of other settings rather than mixing results.
    """

    def __init__(self, path: str | Path, settings: Mapping[str, Any],
                 upgrade: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> None:
        """``upgrade`` (optional) takes the settings read from a journal and returns them as
        this version records them (e.g. an option added since, at the value that reproduces
        the old behaviour), so that journals of earlier versions still resume."""
        self.path = Path(path)
        self.settings = json.loads(json.dumps(settings))  # as it reads back (tuples -> lists)
        self.upgrade = upgrade

    def load(self) -> list[dict[str, Any]]:
        """The units journaled by an earlier run with the same settings ([] when there is no
        journal). A last line cut short by a kill is dropped from the file.

        Raises ValueError when the journal was written with other settings (it names them)
        or its first line is not a settings record.
        """
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        lines = data.split(b"\n")
        try:
            have = json.loads(lines[0])["settings"]
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{self.path} is not a journal of this job (its first line is not a settings "
                             "record): delete it to start over") from None
        if self.upgrade is not None and isinstance(have, dict):
            have = self.upgrade(have)
        diff = [k for k in sorted(set(have) | set(self.settings)) if have.get(k) != self.settings.get(k)]
        rows, good = [], len(lines[0]) + 1
        for line in lines[1:-1]:  # the piece after the last newline is empty or was cut short
            try:
                rows.append(json.loads(line))
            except ValueError:
                break
            good += len(line) + 1
        if diff:
            raise ValueError(f"{self.path} holds {len(rows)} finished run(s) made with other settings (differing: "
                             f"{', '.join(diff)}): run with the same settings to resume them, or delete it to start over")
        if good != len(data):  # drop what a kill cut short, so that the next line starts clean
            with open(self.path, "r+b") as f:
                f.truncate(min(good, len(data)))
                if good > len(data):  # the settings line lost its newline
                    f.seek(0, os.SEEK_END)
                    f.write(b"\n")
        return rows

    def append(self, unit: Mapping[str, Any]) -> None:
        """Add one finished unit (JSON-serializable, NaN allowed), on disk when this returns."""
        new = not self.path.exists()
        if new:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                if new:
                    f.write(json.dumps({"settings": self.settings}) + "\n")
                f.write(json.dumps(dict(unit), default=_json_scalar) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            if new:  # a journal without its settings line would refuse every resume
                self.path.unlink(missing_ok=True)
            raise OutputError(describe_os_error(e, self.path), e.errno) from e

    def remove(self) -> None:
        """Delete the journal (the job's final output is in place)."""
        self.path.unlink(missing_ok=True)


def _writable_ancestor(path: Path) -> Path:
    """The nearest existing folder above ``path`` (where the output would be created)."""
    p = path.parent
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_output(path: str | Path, overwrite: bool, option: str = "--out", report: Report | None = _stderr) -> None:
    """Refuse an output that must not or cannot be written; call it before long work.

    FileExistsError when ``path`` exists and not ``overwrite``; :class:`OutputError` when
    its folder is not a folder, is read-only or not writable. Leftovers of killed runs are
    tidied first (:func:`tidy`).
    """
    path = Path(path)
    tidy(path, remove=True, report=report)
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise FileExistsError(f"{option} {path} already exists; pass --overwrite to replace it")
    folder = _writable_ancestor(path)
    if not folder.is_dir():
        raise OutputError(f"cannot write {path}: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        ro = _read_only_fs(folder)
        raise OutputError(f"cannot write {path}: {folder} is {'on a read-only file system' if ro else 'not writable'}")


def _read_only_fs(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def check_not_input(out: str | Path, inputs: Mapping[str, str | Path | None], option: str = "--out") -> None:
    """Refuse an output that is or holds one of the ``inputs`` (option -> path), or lies
    inside an input dataset store: replacing it would destroy the data it is made from,
    ``--overwrite`` or not. (A new file inside an ordinary input folder is harmless.)"""
    o = Path(out).expanduser().resolve()
    for opt, p in inputs.items():
        if p is None:
            continue
        i = Path(p).expanduser().resolve()
        inside_store = i in o.parents and (i / "zarr.json").is_file()
        if o == i or o in i.parents or inside_store:
            rel = "is" if o == i else ("holds" if o in i.parents else "lies inside")
            raise ValueError(f"{option} {out} {rel} the {opt} input {p}; choose another output path")


@contextlib.contextmanager
def staged(
    path: str | Path, overwrite: bool, purpose: str = "writing", option: str = "--out", report: Report | None = _stderr
) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; build the new output there (file or folder).

    On normal exit it is put in place (:func:`replace_path`); on any error it is removed
    and ``path`` is left as it was. File-system errors become an :class:`OutputError`
    naming ``path``.
    """
    path = Path(path)
    check_output(path, overwrite, option, report)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(describe_os_error(e, path)) from None
    tmp = temporary_path(path, purpose)
    try:
        yield tmp
        replace_path(tmp, path, overwrite)
    except FileExistsError:
        _remove_quietly(tmp)
        raise
    except OSError as e:
        _remove_quietly(tmp)
        if isinstance(e, OutputError) and e.errno is None:
            raise  # already names the user's path
        raise OutputError(describe_os_error(e, path) + f" (nothing was changed at {path})", e.errno) from None
    except BaseException as e:
        _remove_quietly(tmp)
        os_error = as_os_error(e)
        if os_error is not None:
            raise OutputError(describe_os_error(os_error, path) + f" (nothing was changed at {path})",
                              os_error.errno) from None
        raise


def _remove_quietly(p: Path) -> None:
    with contextlib.suppress(OSError):
        if p.exists() or p.is_symlink():
            _remove(p)


def write_text(path: str | Path, text: str, overwrite: bool, option: str = "--out") -> Path:
    """Write a text file through :func:`staged` (fsynced before it is put in place)."""
    path = Path(path)
    with staged(path, overwrite, option=option) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # as an ordinary new file would be
    return path


def write_json(path: str | Path, obj: Any, overwrite: bool, option: str = "--out") -> Path:
    """Write ``obj`` as indented JSON through :func:`staged`."""
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n", overwrite, option)


def current_umask() -> int:
    """The process's file-creation mask (read without changing it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask
