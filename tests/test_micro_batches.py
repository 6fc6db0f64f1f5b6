"""Micro-batches on worker threads: the whole batch's gradient, the same for any thread count."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from nucsynth.micro_batches import MicroBatches


class _Net(nn.Module):
    """Per-sample network (GroupNorm) with a dict output, as the segmenter's."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.a, self.b = nn.Conv2d(8, 2, 1), nn.Conv2d(8, 1, 1)
        self.unused = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.body(x)
        return {"a": self.a(f), "b": self.b(f)}


def _pooled_loss(out: dict[str, torch.Tensor]) -> tuple[torch.Tensor, str]:
    # A ratio of sums over the whole batch (like soft Dice): not a mean of per-sample losses,
    # so computing it per micro-batch would give a different gradient.
    p = out["a"].softmax(1)[:, 1]
    ratio = (p * out["b"][:, 0].sigmoid()).sum() / (p.sum() + 1.0)
    return -ratio + out["b"].pow(2).mean(), "extra"


def _whole_batch_grads(net: nn.Module, x: torch.Tensor) -> list[torch.Tensor | None]:
    net.zero_grad(set_to_none=True)
    loss, _ = _pooled_loss(net(x))
    loss.backward()
    return [None if p.grad is None else p.grad.clone() for p in net.parameters()]


@pytest.mark.parametrize("count,threads", [(2, 1), (2, 2), (3, 2), (5, 4)])
def test_micro_batches_give_the_whole_batch_gradient(count, threads):
    net = _Net()
    x = torch.randn(5, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    want = _whole_batch_grads(net, x)
    for p in net.parameters():
        p.grad = torch.full_like(p, 7.0)  # stale gradients are replaced, not added to
    before = torch.get_num_threads()
    with MicroBatches(count, threads=threads) as micro:
        loss, extra = micro.backward(net, x, _pooled_loss)
    assert torch.get_num_threads() == before and extra == "extra"
    assert loss.item() == pytest.approx(_pooled_loss(net(x))[0].item(), rel=1e-5)
    for p, w in zip(net.parameters(), want):
        if w is None:
            assert p.grad is None  # the unused layer
        else:
            torch.testing.assert_close(p.grad, w, rtol=1e-4, atol=1e-6)


def test_the_gradient_is_the_same_bit_for_bit_on_one_or_more_threads():
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    grads = []
    for threads in (1, 2, 4):
        net = _Net()
        with MicroBatches(4, threads=threads) as micro:
            assert micro.workers == threads and micro.threads_per_worker == 1
            micro.backward(net, x, _pooled_loss)
        grads.append([p.grad for p in net.parameters() if p.grad is not None])
    for other in grads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(grads[0], other))


def test_the_thread_budget_is_split_without_oversubscription():
    m = MicroBatches(2, threads=7)
    assert (m.workers, m.threads_per_worker) == (2, 3)
    m = MicroBatches(4, threads=2)
    assert (m.workers, m.threads_per_worker) == (2, 1)


def test_bad_counts_are_refused_and_an_error_leaves_the_thread_count_as_it_was():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="micro-batch count"):
            MicroBatches(bad)
    with pytest.raises(ValueError, match="thread budget"):
        MicroBatches(2, threads=0)
    before = torch.get_num_threads()
    net = _Net()
    with pytest.raises(ValueError, match="cannot be split into 3"):
        with MicroBatches(3, threads=2) as micro:
            micro.backward(net, torch.zeros(2, 3, 8, 8), _pooled_loss)
    assert torch.get_num_threads() == before

    def failing(out):
        raise RuntimeError("loss failed")

    with pytest.raises(RuntimeError, match="loss failed"):
        with MicroBatches(2, threads=2) as micro:
            micro.backward(net, torch.zeros(2, 3, 8, 8), failing)
    assert torch.get_num_threads() == before
    with MicroBatches(2, threads=2) as micro:  # usable again afterwards
        micro.backward(net, torch.zeros(2, 3, 8, 8), _pooled_loss)
