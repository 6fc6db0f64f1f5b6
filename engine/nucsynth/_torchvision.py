"""Import torchvision on machines where its compiled ops cannot load (an environment fix).

Used by the optional CLIP text encoder (open_clip imports torchvision) and by FID/IS
(the Inception-v3 architecture); nothing else in the engine needs torchvision.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

__all__ = ["import_torchvision"]

_TORCHVISION_OP_SCHEMAS: list[Any] = []  # keeps the stand-in op library registered


def import_torchvision() -> None:
    """Import torchvision, working around CUDA wheels on CPU-only machines.

    The PyPI torchvision wheel is a CUDA build; where its compiled ops cannot load,
    ``import torchvision`` fails with "operator torchvision::nms does not exist" (its meta
    registrations look the op up). Defining stand-in schemas for ``nms``/``qnms`` first
    lets the import finish; the engine never calls these ops. Where torchvision
    imports normally (its ops load), nothing is changed. open_clip imports torchvision, so
    call this just before importing open_clip.
    """
    if "torchvision" in sys.modules:
        return
    try:
        import torchvision  # noqa: F401
        return
    except RuntimeError as e:
        if "torchvision::nms does not exist" not in str(e):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]  # drop the half-imported package before retrying
    lib = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _TORCHVISION_OP_SCHEMAS.append(lib)
    import torchvision  # noqa: F401,F811
