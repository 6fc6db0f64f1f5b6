"""Which torch device the engine runs on, chosen in one place."""

from __future__ import annotations

__all__ = ["pick_device", "describe_device"]


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
