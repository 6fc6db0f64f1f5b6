"""`nucsynth synthesize` killed with SIGKILL at three random points, each followed by a re-run
of the same command: the final store equals an uninterrupted run's, every re-run continues
from what was committed (nothing rendered twice beyond the batch in flight), and no hidden
folder is left beside the output."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from nucsynth.checkpoint import save_checkpoint
from nucsynth.cli import main
from nucsynth.generate.layouts import random_layout
from nucsynth.io.store import DatasetStore
from nucsynth.layout import CONSEP_CLASSES, Sample
from nucsynth.models.semantic import SemanticModel
from nucsynth.synthesize import partial_path

N = 12


@pytest.fixture()
def setup(tmp_path):
    model = SemanticModel.from_preset("tiny", 32, CONSEP_CLASSES)
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "ckpt", model, model.build_network(), step=1,
                           train_config={"steps": 1, "cond_drop": 0.2})
    src = tmp_path / "src.zarr"
    store = DatasetStore.create(src, CONSEP_CLASSES)
    rng = np.random.default_rng(0)
    store.append([Sample(random_layout((32, 32), CONSEP_CLASSES, seed=i), rng.integers(0, 256, (32, 32, 3), np.uint8), {})
                  for i in range(N)])
    store.close()
    return ckpt, src


def _args(ckpt, src, out):
    return ["synthesize", "--checkpoint", str(ckpt), "--layouts", str(src), "--steps", "3", "--batch-size", "2",
            "--seed", "1", "--device", "cpu", "--threads", "1", "--out", str(out)]


def _committed(out) -> int:
    p = partial_path(out)
    return len(DatasetStore.open(p)) if p.exists() else 0


def test_kill_9_at_three_random_points_then_rerun_equals_an_uninterrupted_run(setup, tmp_path, one_torch_thread):
    ckpt, src = setup
    ref = tmp_path / "ref" / "out.zarr"
    ref.parent.mkdir()
    assert main(_args(ckpt, src, ref)) == 0
    out = tmp_path / "run" / "out.zarr"
    out.parent.mkdir()
    rng = np.random.default_rng(7)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", "import sys; from nucsynth.cli import main; sys.exit(main(sys.argv[1:]))",
           *_args(ckpt, src, out)]
    kills = 0
    for _ in range(3):
        before = _committed(out)
        remaining = (N - before) // 2  # batches left
        proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
        # a random point: after the k-th written batch (k = 0: before the first), plus up to 0.3 s
        k, first = int(rng.integers(0, max(1, remaining - 1))), None
        for line in proc.stderr:
            if "samples written" in line and line.split("/")[0].strip().isdigit():
                done = int(line.split("/")[0])
                first = done if first is None else first
                if done >= before + 2 * k:
                    break
        assert first == before  # the re-run started from what was committed: nothing rendered twice
        time.sleep(float(rng.uniform(0.0, 0.3)))
        assert proc.poll() is None, "the job finished before its kill point"
        os.kill(proc.pid, signal.SIGKILL)
        kills += 1
        proc.communicate()
        assert _committed(out) >= before  # a re-run continued from what was committed, never from zero
        hidden = [p.name for p in out.parent.iterdir() if p.name.startswith(".") and p != partial_path(out)]
        assert all(h.startswith(f".{out.name}.") for h in hidden)  # only leftovers of this output
    assert kills == 3 and not out.exists()
    assert main(_args(ckpt, src, out)) == 0  # the last re-run completes the job
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(".")], "hidden folders left behind"
    got, want = DatasetStore.open(out), DatasetStore.open(ref)
    assert len(got) == len(want) == N
    assert [s.provenance["index"] for s in got] == list(range(N))
    np.testing.assert_array_equal(np.stack([s.image for s in got]), np.stack([s.image for s in want]))
