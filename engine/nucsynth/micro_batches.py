"""A network's forward and backward as micro-batches on CPU worker threads, for training.

Why: torch splits each operation of a step across its intra-op threads, and every
operation ends at a barrier where all threads wait for the slowest. On a busy machine one
of them is often descheduled, so two threads were no faster than one (segmenter training
steps took 0.90-1.13 x one thread's time with two other processes busy,
docs/benchmarks.md). Here each worker thread runs whole micro-batches through the network,
forward and backward, with no barrier until the network's outputs are joined, and takes
the next micro-batch as soon as it is free.

What stays exact:

- Only the network runs per micro-batch; its outputs are joined into the whole batch's
  before the loss sees them, so losses pooled over the batch (soft Dice, MSGE normalized
  by the batch's nucleus pixels) keep their definition. This needs a network whose
  samples do not interact (GroupNorm or LayerNorm, never BatchNorm): its output for a
  micro-batch is then its output for those samples in the whole batch.
- Each parameter's gradient is the sum of the micro-batches' gradients in micro-batch
  order, whichever thread computed them. While every worker runs its operations on one
  thread (``threads`` <= ``count``), the weights are therefore the same for any thread
  count, bit for bit; with more threads than micro-batches each worker gets
  ``threads // count`` intra-op threads, which is still deterministic for a given count.
- A network with active dropout modules draws from torch's global generator; its
  micro-batches then run one after the other, in order, so the draws stay reproducible.
  (A network that draws random numbers in its forward in another way would not be: none
  of the engine's does.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch
import torch.nn as nn

__all__ = ["MicroBatches", "MicroBatchedNetwork", "CPU_MICRO_BATCHES"]

# Micro-batches per batch of CPU training by default (the segmenter's CPU presets, new
# `nucsynth train` runs): two threads each run whole micro-batches. Four gave the same
# speed under load and cost 1.10 x on one thread (two: 1.02 x), measured on the segmenter
# (docs/benchmarks.md).
CPU_MICRO_BATCHES = 2

T = TypeVar("T")
R = TypeVar("R")


class MicroBatches:
    """Runs a network on ``count`` micro-batches per batch on up to ``threads`` workers.

    Use as a context manager around a training loop and call the network through
    :meth:`wrap`. On entry torch's intra-op thread count becomes the per-worker count (also
    for the loss and the optimizer step, so that their reductions do not depend on the
    thread budget); on exit it is restored.

    ``count``: micro-batches per batch (>= 1); part of what determines the weights, so it
    belongs in the training config. ``threads``: the thread budget (default: torch's
    current intra-op thread count, which ``--threads`` sets). Raises ValueError for a count
    or budget below 1.
    """

    def __init__(self, count: int, threads: int | None = None) -> None:
        if isinstance(count, bool) or int(count) != count or count < 1:
            raise ValueError(f"micro-batch count must be a whole number >= 1, got {count!r}")
        budget = torch.get_num_threads() if threads is None else threads
        if isinstance(budget, bool) or int(budget) != budget or budget < 1:
            raise ValueError(f"thread budget must be a whole number >= 1, got {threads!r}")
        self.count = int(count)
        self.workers = min(int(budget), self.count)
        self.threads_per_worker = max(1, int(budget) // self.workers)
        self._pool: ThreadPoolExecutor | None = None
        self._threads_before: int | None = None

    @classmethod
    def for_device(cls, count: int, device: torch.device) -> "MicroBatches":
        """``count`` micro-batches on CPU; one pass (a no-op) on other devices, where the
        network's own parallelism is the fast path."""
        return cls(count if device.type == "cpu" else 1)

    def __enter__(self) -> "MicroBatches":
        self._threads_before = torch.get_num_threads()
        torch.set_num_threads(self.threads_per_worker)
        if self.workers > 1:
            # Each worker sets its own OpenMP team size once (the count is per OS thread).
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="micro-batch",
                                            initializer=torch.set_num_threads, initargs=(self.threads_per_worker,))
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._threads_before is not None:
            torch.set_num_threads(self._threads_before)
            self._threads_before = None

    def map(self, fn: Callable[[T], R], items: Iterable[T], in_order: bool = False) -> list[R]:
        """``fn`` over ``items`` on the workers (one after the other with ``in_order``);
        results in the items' order."""
        if self._pool is None or in_order:
            return [fn(item) for item in items]
        return list(self._pool.map(fn, items))

    def wrap(self, net: nn.Module) -> "nn.Module | MicroBatchedNetwork":
        """``net`` called in micro-batches: same arguments and outputs as ``net``; the
        backward of the outputs sets the same gradients as one pass would, up to rounding.
        With one micro-batch, ``net`` itself."""
        return net if self.count == 1 else MicroBatchedNetwork(net, self)


class MicroBatchedNetwork:
    """Calls ``net`` on micro-batches of its arguments (see :meth:`MicroBatches.wrap`).

    Arguments that are tensors (or lists / tuples) whose first dimension is the batch's (the
    first tensor argument's) are split; anything else goes whole to every micro-batch. The
    outputs (a tensor, or a tuple / list / dict of tensors) are joined along dimension 0.
    Without gradient recording it is one ordinary call. Other attributes are ``net``'s.
    """

    def __init__(self, net: nn.Module, micro: MicroBatches) -> None:
        self.net, self.micro = net, micro

    def __getattr__(self, name: str) -> Any:
        return getattr(self.net, name)

    def __call__(self, *args: Any) -> Any:
        batch = next((a.shape[0] for a in args if isinstance(a, torch.Tensor) and a.dim() > 0), None)
        if not torch.is_grad_enabled() or batch is None or self.micro.count == 1:
            return self.net(*args)
        if batch < self.micro.count:
            raise ValueError(f"a batch of {batch} cannot be split into {self.micro.count} micro-batches")
        if any(isinstance(a, (list, tuple)) and any(isinstance(x, torch.Tensor) and x.requires_grad for x in a)
               for a in args):
            raise TypeError("micro-batches pass gradients to tensor arguments only, not to tensors inside lists")
        params = [p for p in self.net.parameters() if p.requires_grad]
        inputs = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]
        state: dict[str, Any] = {"net": self.net, "micro": self.micro, "args": args, "batch": batch, "inputs": inputs}
        flat = _MicroBatchedCall.apply(state, *(args[i] for i in inputs), *params)
        return _unflatten(state["structure"], list(flat))


def _split(value: Any, batch: int, count: int) -> list[Any]:
    """``value`` cut into ``count`` micro-batches when it holds one entry per sample."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
        return list(value.tensor_split(count))
    if isinstance(value, (list, tuple)) and len(value) == batch:  # the tensors' cut points
        return [value[int(c[0]):int(c[-1]) + 1] for c in torch.arange(batch).tensor_split(count)]
    return [value] * count


def _flatten(out: Any) -> tuple[Any, list[torch.Tensor]]:
    if isinstance(out, torch.Tensor):
        return None, [out]
    if isinstance(out, dict):
        return ("dict", list(out)), list(out.values())
    if isinstance(out, (tuple, list)) and all(isinstance(o, torch.Tensor) for o in out):
        return (type(out), len(out)), list(out)
    raise TypeError(f"micro-batches join a tensor or a tuple / list / dict of tensors, the network returned {type(out)}")


def _unflatten(structure: Any, tensors: list[torch.Tensor]) -> Any:
    if structure is None:
        return tensors[0]
    kind, spec = structure
    if kind == "dict":
        return dict(zip(spec, tensors))
    return kind(tensors)


def _has_dropout(net: nn.Module) -> bool:
    return net.training and any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in net.modules())


class _MicroBatchedCall(torch.autograd.Function):
    """Forward: the network on each micro-batch (on the workers, each recording its own
    graph), outputs joined. Backward: each micro-batch's graph on the workers, gradients of
    parameters summed in micro-batch order, those of inputs joined."""

    @staticmethod
    def forward(ctx: Any, state: dict[str, Any], *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        micro, args, batch = state["micro"], state["args"], state["batch"]
        in_order = _has_dropout(state["net"])
        pieces = [_split(a, batch, micro.count) for a in args]
        leaves = {i: [p.detach().requires_grad_() for p in pieces[i]] for i in state["inputs"]}

        def run(k: int) -> list[torch.Tensor]:
            call = [leaves[i][k] if i in leaves else pieces[i][k] for i in range(len(args))]
            with torch.enable_grad():
                structure, outs = _flatten(state["net"](*call))
            state["structure"] = structure
            return outs

        outs = micro.map(run, range(micro.count), in_order)
        ctx.state, ctx.outs, ctx.leaves, ctx.in_order = state, outs, leaves, in_order
        params = tensors[len(state["inputs"]):]
        ctx.params = params
        return tuple(torch.cat([o[j].detach() for o in outs]) for j in range(len(outs[0])))

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[Any, ...]:
        state, outs, params = ctx.state, ctx.outs, ctx.params
        count = state["micro"].count
        sizes = [o[0].shape[0] for o in outs]
        per_piece = [g.split(sizes) if g is not None else [None] * count for g in grads]
        order = state["inputs"]

        def backward_piece(k: int) -> tuple[torch.Tensor | None, ...]:
            used = [j for j in range(len(grads)) if per_piece[j][k] is not None and outs[k][j].requires_grad]
            wrt = [*(ctx.leaves[i][k] for i in order), *params]
            if not used:
                return (None,) * len(wrt)
            return torch.autograd.grad([outs[k][j] for j in used], wrt, [per_piece[j][k] for j in used],
                                       allow_unused=True)

        results = state["micro"].map(backward_piece, range(count), ctx.in_order)
        n_in = len(order)
        input_grads = []
        for a in range(n_in):
            parts = [r[a] for r in results]
            input_grads.append(None if all(p is None for p in parts) else
                               torch.cat([p if p is not None else torch.zeros_like(ctx.leaves[order[a]][k])
                                          for k, p in enumerate(parts)]))
        param_grads = []
        for j in range(len(params)):
            total = None
            for r in results:  # fixed order: the sum does not depend on which thread finished first
                g = r[n_in + j]
                if g is not None:
                    total = g.clone() if total is None else total.add_(g)
            param_grads.append(total)
        ctx.outs = ctx.leaves = None  # the micro-batches' graphs are spent
        return (None, *input_grads, *param_grads)
