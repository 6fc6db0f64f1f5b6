"""Counting parameters and FLOPs of a network (``torch.utils.flop_counter``).

FLOPs are counted by running one forward pass under ``FlopCounterMode``. Build the module
and inputs on the ``meta`` device to count the paper-scale networks without allocating
memory or doing arithmetic (a 650 M-parameter U-Net is counted in about a second).
One multiply-add counts as 2 FLOPs, as torch's counter does.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_flops", "count_params"]


def count_flops(module: nn.Module, *inputs: Any, **kwargs: Any) -> int:
    """FLOPs of one forward pass ``module(*inputs, **kwargs)`` (no gradients are recorded).

    Works on every device including ``meta``; operators torch's counter does not know
    (element-wise ops, norms) are not counted, so the figure is the matmul/conv/attention cost.
    """
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        module(*inputs, **kwargs)
    return int(counter.get_total_flops())


def count_params(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of ``module`` (only those with ``requires_grad`` if asked)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
