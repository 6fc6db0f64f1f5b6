"""Distributed batch synthesis (nucsynth.distributed) on a local dask cluster of 2 worker
processes: the store equals the single-process one, also when a worker is killed mid-run
(its batch is redone elsewhere; nothing lost or written twice)."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import torch

pytest.importorskip("distributed", reason="dask.distributed is not installed (pip install 'napari-nucsynth[distributed]')")

from nucsynth.checkpoint import save_checkpoint  # noqa: E402
from nucsynth.generate.layouts import random_layout  # noqa: E402
from nucsynth.io.store import DatasetStore  # noqa: E402
from nucsynth.layout import CONSEP_CLASSES  # noqa: E402
from nucsynth.models.semantic import SemanticModel  # noqa: E402
from nucsynth.synthesize import SynthesisJob, SynthesisOptions, get_synthesizer, plan_items  # noqa: E402


def test_two_workers_one_killed_give_the_single_process_store(tmp_path, one_torch_thread):
    """One thread here: the workers get this process' thread count, so the same float reductions."""
    from nucsynth.distributed import DaskExecutor

    model = SemanticModel.from_preset("tiny", 32, CONSEP_CLASSES)
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "ckpt", model, model.build_network(), step=1,
                           train_config={"steps": 1, "cond_drop": 0.2})
    synth = get_synthesizer(ckpt, "cpu")
    opts = synth.resolve(SynthesisOptions(steps=2, batch_size=2, seed=4))
    items = plan_items(synth, opts, [random_layout((32, 32), CONSEP_CLASSES, seed=i) for i in range(8)])
    SynthesisJob(synth, items, opts, tmp_path / "single.zarr").run()

    executor = DaskExecutor(workers=2, device="cpu")
    killed: list[int] = []

    def kill_one_worker(progress):
        if progress.done >= 2 and not killed:  # after the first batch is written
            pid = next(iter(executor.worker_pids().values()))
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    try:
        result = SynthesisJob(synth, items, opts, tmp_path / "dist.zarr", executor=executor).run(kill_one_worker)
    finally:
        executor.close()
    assert killed and result.written == 8 and not result.cancelled
    single, dist = DatasetStore.open(tmp_path / "single.zarr"), DatasetStore.open(tmp_path / "dist.zarr")
    assert [s.provenance["index"] for s in dist] == list(range(8))  # none lost, none twice, in order
    np.testing.assert_array_equal(np.stack([s.image for s in dist]), np.stack([s.image for s in single]))
