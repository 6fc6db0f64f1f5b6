"""One training batch's forward and backward as micro-batches on CPU worker threads.

Why: torch splits each operation of a step across its intra-op threads, and every
operation ends at a barrier where all threads wait for the slowest. On a busy machine one
of them is often descheduled, so two threads were no faster than one (segmenter training
steps took 0.90-1.13 x one thread's time with two other processes busy,
docs/benchmarks.md). Here each worker thread runs whole micro-batches through the network,
forward and backward, with no barrier until the step's end, and takes the next
micro-batch as soon as it is free.

What stays exact:

- The loss is still the whole batch's: the network's outputs of all micro-batches are
  joined before the loss is computed, so losses pooled over the batch (soft Dice, MSGE
  normalized by the batch's nucleus pixels) keep their definition. Only the network's
  backward runs per micro-batch. This needs a network whose samples do not interact
  (GroupNorm or LayerNorm, never BatchNorm): its output for a micro-batch is then its
  output for those samples in the whole batch.
- Each parameter's gradient is the sum of the micro-batches' gradients in micro-batch
  order, whichever thread computed them. While every worker runs its operations on one
  thread (``threads`` <= ``count``), the weights are therefore the same for any thread
  count, bit for bit; with more threads than micro-batches each worker gets
  ``threads // count`` intra-op threads, which is still deterministic for a given count.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch
import torch.nn as nn

__all__ = ["MicroBatches"]

T = TypeVar("T")
R = TypeVar("R")
Outputs = dict[str, torch.Tensor]


class MicroBatches:
    """Runs ``backward`` of one batch as ``count`` micro-batches on up to ``threads`` workers.

    Use as a context manager around a training loop: on entry torch's intra-op thread count
    becomes the per-worker count (also for the loss and the optimizer step, so that their
    reductions do not depend on the thread budget), on exit it is restored.

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

    def _map(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
        """``fn`` over ``items`` on the workers; results in the items' order."""
        if self._pool is None:
            return [fn(item) for item in items]
        return list(self._pool.map(fn, items))

    def backward(self, net: nn.Module, inputs: torch.Tensor,
                 loss_fn: Callable[[Outputs], tuple[torch.Tensor, T]]) -> tuple[torch.Tensor, T]:
        """Forward ``inputs`` (B, ...) through ``net`` in micro-batches, compute
        ``loss_fn(outputs)`` on the joined outputs (a dict of (B, ...) tensors), and set each
        trainable parameter's ``.grad`` to the batch's gradient (None where unused), replacing
        what was there. Returns what ``loss_fn`` returned: (scalar loss, anything).

        Raises ValueError when the batch has fewer samples than micro-batches.
        """
        if inputs.shape[0] < self.count:
            raise ValueError(f"a batch of {inputs.shape[0]} cannot be split into {self.count} micro-batches")
        params = [p for p in net.parameters() if p.requires_grad]
        outs: list[Outputs] = self._map(net, inputs.tensor_split(self.count))
        # Cut the graph at the outputs: the loss's backward runs once, on the joined batch.
        cut = [{k: v.detach().requires_grad_(v.requires_grad) for k, v in o.items()} for o in outs]
        loss, extra = loss_fn({k: torch.cat([c[k] for c in cut]) for k in outs[0]})
        loss.backward()

        def network_backward(i: int) -> Sequence[torch.Tensor | None]:
            used = [k for k, v in cut[i].items() if v.grad is not None]
            if not used:
                return [None] * len(params)
            return torch.autograd.grad([outs[i][k] for k in used], params, [cut[i][k].grad for k in used],
                                       allow_unused=True)

        grads = self._map(network_backward, range(self.count))
        for j, p in enumerate(params):
            total = None
            for g in grads:  # fixed order: the sum does not depend on which thread finished first
                if g[j] is not None:
                    total = g[j].clone() if total is None else total.add_(g[j])
            p.grad = total
        return loss, extra
