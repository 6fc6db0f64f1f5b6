"""Which torch device the engine runs on, and what that device has room for, in one place."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["pick_device", "describe_device", "inference_memory_format", "in_inference_format", "available_memory",
           "feature_cache_budget"]

# Share of the free memory that kept condition features may take (the rest is for the
# network's activations and everything else the process does).
_CACHE_SHARE = 0.25
_CACHE_FALLBACK = 1 << 30  # when the free memory cannot be read


def pick_device(requested: str | None = None) -> "torch.device":  # noqa: F821
    """The device to use: ``requested`` if given (checked), else CUDA, then MPS, then CPU.

    Raises ValueError when the requested device does not exist on this machine.
    """
    import torch

    if requested:
        try:
            dev = torch.device(requested)
        except RuntimeError as e:
            raise ValueError(f"unknown device {requested!r}: expected cpu, cuda, cuda:N or mps") from e
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"device {requested!r} was asked for but CUDA is not available here")
            if dev.index is not None and dev.index >= torch.cuda.device_count():
                raise ValueError(f"device {requested!r}: only {torch.cuda.device_count()} CUDA device(s) present")
        if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ValueError(f"device {requested!r} was asked for but MPS is not available here")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def describe_device(device: "torch.device") -> str:  # noqa: F821
    """A short human description, e.g. 'CUDA 0: NVIDIA H100' or 'CPU (2 threads, passive wait)'."""
    import torch

    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        return f"CUDA {idx}: {torch.cuda.get_device_name(idx)}"
    if device.type == "mps":
        return "Apple MPS"
    from nucsynth.threads import wait_policy

    return f"CPU ({torch.get_num_threads()} threads, {wait_policy()} wait)"


def inference_memory_format(device: "torch.device") -> "torch.memory_format":  # noqa: F821
    """The memory format the engine's convolution networks run inference in on ``device``
    (the segmenter also trains in it: its small steps gain a little, docs/metrics.md).

    CPU: ``channels_last`` (measured on the SPADE U-Net, 1 thread, CPU time of one forward:
    0.81x of NCHW for ``tiny`` and 0.83x for ``base`` at 256 px, 1.0x for ``tiny`` at
    64 px; outputs equal to ~1e-6). Elsewhere the default (contiguous), not measured here.
    """
    import torch

    return torch.channels_last if device.type == "cpu" else torch.contiguous_format


def in_inference_format(x: "torch.Tensor") -> "torch.Tensor":  # noqa: F821
    """``x`` in :func:`inference_memory_format` of its device when no gradient is being
    taken (inference), else ``x`` unchanged (training keeps the layout autograd expects)."""
    import torch

    return x if torch.is_grad_enabled() else x.contiguous(memory_format=inference_memory_format(x.device))


def _meminfo_available(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_memory_room(root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")) -> int | None:
    """Bytes left under this process's cgroup memory limit (v2 or v1), None if unlimited."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        if controllers == "":  # v2
            folder, limit_name, usage_name = root / rel.lstrip("/"), "memory.max", "memory.current"
        elif "memory" in controllers.split(","):  # v1
            folder, limit_name, usage_name = root / "memory" / rel.lstrip("/"), "memory.limit_in_bytes", "memory.usage_in_bytes"
        else:
            continue
        try:
            limit = (folder / limit_name).read_text().strip()
            if limit == "max" or int(limit) >= 1 << 60:  # v1 writes a huge number for "no limit"
                continue
            return max(0, int(limit) - int((folder / usage_name).read_text().strip()))
        except (OSError, ValueError):
            continue
    return None


def available_memory(device: "torch.device") -> int | None:  # noqa: F821
    """Bytes free for new tensors on ``device``, or None when it cannot be told.

    CUDA: the driver's free memory. CPU: the kernel's MemAvailable, capped by what is left
    under the process's cgroup memory limit (containers). MPS and others: None.
    """
    import torch

    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu" and os.name == "posix":
        room = [m for m in (_meminfo_available(), _cgroup_memory_room()) if m is not None]
        return min(room) if room else None
    return None


def feature_cache_budget(device: "torch.device") -> int:  # noqa: F821
    """Bytes that kept condition features (:class:`nucsynth.nets.blocks.ConditionFeatures`)
    may take on ``device``: a quarter of its free memory, 1 GiB when that is unknown."""
    free = available_memory(device)
    return _CACHE_FALLBACK if free is None else int(free * _CACHE_SHARE)
