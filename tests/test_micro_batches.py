"""Micro-batches on worker threads: the whole batch's gradient, the same for any thread count."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from nucsynth.micro_batches import MicroBatches


class _Net(nn.Module):
    """Per-sample network (GroupNorm) with a dict output, as the segmenter's; ``scale`` is
    a non-batch argument, ``cond`` a second batched one."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(), nn.Dropout(dropout),
                                  nn.Conv2d(8, 8, 3, padding=1))
        self.a, self.b = nn.Conv2d(8, 2, 1), nn.Conv2d(8, 1, 1)
        self.unused = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None, scale: float = 1.0) -> dict[str, torch.Tensor]:
        f = self.body(x) * scale
        if cond is not None:
            f = f + cond[:, :, None, None]
        return {"a": self.a(f), "b": self.b(f)}


def _pooled_loss(out: dict[str, torch.Tensor]) -> torch.Tensor:
    # A ratio of sums over the whole batch (like soft Dice): not a mean of per-sample losses,
    # so computing it per micro-batch would give a different gradient.
    p = out["a"].softmax(1)[:, 1]
    ratio = (p * out["b"][:, 0].sigmoid()).sum() / (p.sum() + 1.0)
    return -ratio + out["b"].pow(2).mean()


def _grads(net: nn.Module, call, *args) -> list[torch.Tensor | None]:
    net.zero_grad(set_to_none=True)
    _pooled_loss(call(*args)).backward()
    return [None if p.grad is None else p.grad.clone() for p in net.parameters()]


@pytest.mark.parametrize("count,threads", [(2, 1), (2, 2), (3, 2), (5, 4)])
def test_micro_batches_give_the_whole_batch_gradient(count, threads):
    net = _Net()
    x = torch.randn(5, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    want = _grads(net, net, x)
    before = torch.get_num_threads()
    with MicroBatches(count, threads=threads) as micro:
        wrapped = micro.wrap(net)
        out = wrapped(x)
        torch.testing.assert_close(out, net(x), rtol=1e-5, atol=1e-6)  # same outputs, joined in order
        got = _grads(net, wrapped, x)
    assert torch.get_num_threads() == before
    for g, w in zip(got, want):
        if w is None:
            assert g is None  # the unused layer
        else:
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_gradients_reach_inputs_that_need_them_and_non_batch_arguments_pass_whole():
    net = _Net()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 10, 10, generator=gen)
    emb = nn.Linear(5, 8)  # trained outside the network, as a text encoder
    tokens = torch.randn(4, 5, generator=gen)

    def whole():
        return _grads(net, lambda: net(x, emb(tokens), 0.5)), emb.weight.grad.clone()

    want, want_emb = whole()
    emb.zero_grad(set_to_none=True)
    with MicroBatches(2, threads=2) as micro:
        got = _grads(net, lambda: micro.wrap(net)(x, emb(tokens), 0.5))
    torch.testing.assert_close(emb.weight.grad, want_emb, rtol=1e-4, atol=1e-6)
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if w is not None:
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_the_gradient_is_the_same_bit_for_bit_on_one_or_more_threads():
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    grads = []
    for threads in (1, 2, 4):
        net = _Net()
        with MicroBatches(4, threads=threads) as micro:
            assert micro.workers == threads and micro.threads_per_worker == 1
            grads.append([g for g in _grads(net, micro.wrap(net), x) if g is not None])
    for other in grads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(grads[0], other))


def test_a_network_with_dropout_runs_its_micro_batches_in_order():
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    grads = []
    for threads in (1, 2, 2):
        net = _Net(dropout=0.5)
        torch.manual_seed(7)  # dropout draws from the global generator, as training seeds it per step
        with MicroBatches(2, threads=threads) as micro:
            grads.append([g for g in _grads(net, micro.wrap(net), x) if g is not None])
    for other in grads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(grads[0], other))


def test_without_gradients_it_is_one_ordinary_call_and_attributes_are_the_networks():
    net = _Net()
    with MicroBatches(2, threads=2) as micro:
        wrapped = micro.wrap(net)
        with torch.no_grad():
            out = wrapped(torch.zeros(3, 3, 8, 8))
        assert out["a"].grad_fn is None and wrapped.unused is net.unused


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
            micro.wrap(net)(torch.zeros(2, 3, 8, 8))
    assert torch.get_num_threads() == before

    class Failing(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(1))

        def forward(self, x):
            raise RuntimeError("forward failed")

    with pytest.raises(RuntimeError, match="forward failed"):
        with MicroBatches(2, threads=2) as micro:
            micro.wrap(Failing())(torch.zeros(2, 3, 8, 8))
    assert torch.get_num_threads() == before
    with pytest.raises(TypeError, match="not to tensors inside lists"):
        with MicroBatches(2, threads=2) as micro:
            micro.wrap(net)(torch.zeros(2, 3, 8, 8), [torch.zeros(2, 8, requires_grad=True)])
    with MicroBatches(2, threads=2) as micro:  # usable again afterwards
        _pooled_loss(micro.wrap(net)(torch.zeros(2, 3, 8, 8))).backward()


@pytest.mark.parametrize("family", ["semantic", "joint", "structure", "autoencoder"])
def test_every_model_familys_training_loss_gets_the_one_pass_gradient(family):
    """The training loop wraps each family's network; its loss must see the same outputs
    and give the same gradients (joint: the text features come from the network itself)."""
    from nucsynth.data.dataset import SampleDataset
    from nucsynth.generate.tissue import procedural_sample
    from nucsynth.models.autoencoder import AutoencoderModel
    from nucsynth.models.joint import JointModel
    from nucsynth.models.semantic import SemanticModel
    from nucsynth.models.structure import StructureModel

    samples = [procedural_sample((32, 32), seed=s) for s in range(4)]
    cs = samples[0].layout.class_set
    cls = {"semantic": SemanticModel, "joint": JointModel, "structure": StructureModel, "autoencoder": AutoencoderModel}
    model = cls[family].from_preset("tiny", 32, cs)
    data = SampleDataset(samples, maps=model.data_maps, size=32, augment=False)
    model.prepare_training(data)
    batch = {k: torch.stack([data[i][k] for i in range(4)]) for k in data[0]}
    torch.manual_seed(0)
    net = model.build_network().train()

    def grads(call) -> tuple[float, list[torch.Tensor | None]]:
        net.zero_grad(set_to_none=True)
        loss, _ = model.training_loss(call, batch, torch.Generator().manual_seed(5), cond_drop=0.25)
        loss.backward()
        return float(loss.detach()), [None if p.grad is None else p.grad.clone() for p in net.parameters()]

    loss_one, want = grads(net)
    with MicroBatches(2, threads=2) as micro:
        loss_micro, got = grads(micro.wrap(net))
    assert loss_micro == pytest.approx(loss_one, rel=1e-5)
    assert sum(w is not None for w in want) > 0
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if w is not None:
            torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-6)


def test_one_micro_batch_or_another_device_is_the_network_itself():
    net = _Net()
    with MicroBatches(1, threads=2) as micro:
        assert micro.wrap(net) is net
    assert MicroBatches.for_device(2, torch.device("meta")).count == 1
    assert MicroBatches.for_device(2, torch.device("cpu")).count == 2
