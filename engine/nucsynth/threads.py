"""The engine's CPU thread policy, in one place.

Four facts drive it (measured on a shared 2-core machine, docs/benchmarks.md):

- OpenMP threads that busy-wait between parallel regions steal the cores that the other
  threads (and other processes) need: torch's default pool ran 5-10x slower than one
  thread while other processes were busy. A *passive* wait policy (threads sleep at once)
  removes that. libgomp reads ``OMP_WAIT_POLICY`` once, when torch loads it, so
  :func:`configure_environment` runs from ``nucsynth/__init__.py`` before anything in the
  engine imports torch; a value the user set is kept.
- The default number of threads is the number of cores this process may actually use:
  its CPU affinity, capped by a cgroup CPU quota (containers), not ``os.cpu_count()``.
- Small work does not pay for a second thread: splitting each operation of a network call
  on a few hundred positions costs more in hand-offs than it saves, even on an idle machine
  (a 64 px render of the shipped latent model, 16 x 16 latents, took 1.09 x as long on two
  threads as on one; 96 px took 0.84 x). :func:`threads_for_work` runs such work on one
  thread. The choice depends only on the work's size, so the same inputs still give the
  same output.
- Nested pools multiply: torch intra-op threads x inter-op threads x data-loader worker
  processes x OpenCV's own pool. The policy gives torch's intra-op pool the cores left
  after the worker processes, one inter-op thread, and OpenCV the same count as torch
  (data-loader workers already run torch with one thread each).

:func:`set_threads` applies the policy; every ``nucsynth`` command calls it once through
``--threads`` (see :mod:`nucsynth.cli`).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "available_cpus",
    "cgroup_cpu_limit",
    "configure_environment",
    "default_threads",
    "set_threads",
    "threads_for_work",
    "wait_policy",
    "SMALL_WORK_POSITIONS",
]

# Renders whose diffusion state has fewer positions than this (batch x height x width)
# run on one thread: on an idle 2-core machine a guided render of one 16 x 16 latent
# (64 px) was faster on one thread, one of 24 x 24 (96 px) took 0.84 x the time on two
# (docs/benchmarks.md, "Thread policy under load").
SMALL_WORK_POSITIONS = 512

# Whether torch was already imported when the engine set the wait policy: if so libgomp
# had read its environment before us and the policy is whatever was set then.
_TORCH_LOADED_FIRST: bool | None = None


def configure_environment() -> None:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` unless the user chose a policy.

    Must run before torch (and its OpenMP runtime) is loaded; ``nucsynth/__init__.py``
    calls it first thing. Calling it again is harmless.
    """
    global _TORCH_LOADED_FIRST
    if _TORCH_LOADED_FIRST is None:
        _TORCH_LOADED_FIRST = "torch" in sys.modules
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def wait_policy() -> str:
    """The OpenMP wait policy in effect: ``"passive"``, ``"active"``, or ``"spin-then-sleep"``
    (OpenMP's default, also reported when torch was loaded before the engine could set it)."""
    if _TORCH_LOADED_FIRST:
        return "spin-then-sleep (torch was imported before nucsynth)"
    value = os.environ.get("OMP_WAIT_POLICY", "").strip().lower()
    return value if value in ("passive", "active") else "spin-then-sleep"


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _cgroup_dirs(root: Path, proc_cgroup: Path) -> list[tuple[int, Path]]:
    """(version, folder) of this process's CPU cgroup and every ancestor, innermost first."""
    text = _read(proc_cgroup)
    if text is None:
        return []
    dirs: list[tuple[int, Path]] = []
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        if controllers == "":  # cgroup v2 unified hierarchy
            version, base = 2, root if (root / "cgroup.controllers").exists() else root / "unified"
        elif "cpu" in controllers.split(","):
            version, base = 1, root / "cpu"
            if not base.exists():
                base = root / controllers
        else:
            continue
        p = Path(rel.lstrip("/"))
        chain = [p, *p.parents]
        dirs.extend((version, base / c) for c in chain)
    return dirs


def cgroup_cpu_limit(root: str | os.PathLike = "/sys/fs/cgroup", proc_cgroup: str | os.PathLike = "/proc/self/cgroup") -> float | None:
    """The CPU quota of this process's cgroups in cores (e.g. 1.5), or None when unlimited.

    Reads cgroup v2 ``cpu.max`` ("QUOTA PERIOD" or "max PERIOD") and cgroup v1
    ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` of the process's group and its ancestors;
    the smallest quota wins. Unreadable or absent files mean no limit.
    """
    limits: list[float] = []
    for version, folder in _cgroup_dirs(Path(root), Path(proc_cgroup)):
        if version == 2:
            text = _read(folder / "cpu.max")
            if text:
                quota, _, period = text.partition(" ")
                if quota != "max" and period:
                    limits.append(int(quota) / int(period))
        else:
            quota_s, period_s = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
            if quota_s and period_s and int(quota_s) > 0 and int(period_s) > 0:
                limits.append(int(quota_s) / int(period_s))
    return min(limits) if limits else None


def available_cpus() -> int:
    """Cores this process may use: its CPU affinity, capped by its cgroup quota (>= 1).

    A fractional quota rounds up (1.5 cores -> 2 threads): the throughput of the quota is
    only reached with more threads than whole cores in it.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_limit()
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores)


def default_threads(workers: int = 0) -> int:
    """Torch intra-op threads by default: the cores left after ``workers`` data-loader
    processes (each of which runs torch with one thread), at least one."""
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    return max(1, available_cpus() - workers)


def set_threads(threads: int | None = None, workers: int = 0) -> int:
    """Apply the thread policy; returns the number of torch intra-op threads chosen.

    ``threads``: torch intra-op threads; None takes ``OMP_NUM_THREADS`` when the user set
    it, else :func:`default_threads` for ``workers`` data-loader processes. The count also
    goes to OpenCV's pool, and torch gets one inter-op thread (nothing in the engine runs
    inter-op tasks, so more would only add idle threads). When torch or OpenCV is not
    loaded yet, the count is put in their environment variables instead, so that a
    command that never needs torch does not pay for importing it.

    Raises ValueError when ``threads`` is not a whole number >= 1.
    """
    if threads is not None and (isinstance(threads, bool) or int(threads) != threads or threads < 1):
        raise ValueError(f"threads must be a whole number >= 1, got {threads!r}")
    if threads is not None:
        n = int(threads)
    elif os.environ.get("OMP_NUM_THREADS", "").strip().isdigit() and int(os.environ["OMP_NUM_THREADS"]) >= 1:
        n = int(os.environ["OMP_NUM_THREADS"])
    else:
        n = default_threads(workers)
    torch = sys.modules.get("torch")
    if torch is None:
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(n)
    else:
        torch.set_num_threads(n)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # the inter-op pool is set once per process, before first use
            pass
    cv2 = sys.modules.get("cv2")
    if cv2 is None:
        os.environ["OPENCV_FOR_THREADS_NUM"] = str(n)
    else:
        cv2.setNumThreads(n)
    return n


@contextlib.contextmanager
def threads_for_work(positions: int) -> Iterator[int]:
    """Within the block, torch runs on one thread when ``positions`` (batch x height x width
    of the diffusion state, e.g. 1 x 16 x 16 latents for one 64 px render) is below
    :data:`SMALL_WORK_POSITIONS`, else on the threads already set; yields the count in
    effect. The previous count is restored on exit, also after an error.

    The choice depends only on ``positions``, never on the machine's load, so a render stays
    deterministic (outputs may differ between thread counts in the last float bits).
    """
    import torch

    before = torch.get_num_threads()
    if positions >= SMALL_WORK_POSITIONS or before == 1:
        yield before
        return
    torch.set_num_threads(1)
    try:
        yield 1
    finally:
        torch.set_num_threads(before)
