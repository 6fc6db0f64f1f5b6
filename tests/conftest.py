"""Shared fixtures: paths to the real data (skipped when absent) and small generated layouts."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("NUCSYNTH_SHARED_DATA", ROOT.parent / "shared" / "data"))

# Keep CPU tests predictable on small CI machines.
os.environ.setdefault("OMP_NUM_THREADS", "2")


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data not found at {path} (set NUCSYNTH_SHARED_DATA to its folder)")
    return path


@pytest.fixture(scope="session")
def consep_dir() -> Path:
    """../shared/data/consep256/Train (CoNSeP 256 px patches), or skip."""
    return _need(SHARED_DATA / "consep256" / "Train")


@pytest.fixture(scope="session")
def monuseg_dir() -> Path:
    """../shared/data/monuseg/Train (MoNuSeg images + XML), or skip."""
    return _need(SHARED_DATA / "monuseg" / "Train")


def disk_layout_arrays(shape=(48, 48), centres=((10, 12, 5), (30, 30, 7), (12, 36, 4)), classes=(1, 2, 3)):
    """An instance map of discs (cy, cx, r) and their classes: a tiny hand-made layout."""
    yy, xx = np.indices(shape)
    inst = np.zeros(shape, np.int32)
    for i, (cy, cx, r) in enumerate(centres, start=1):
        inst[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = i
    return inst, np.asarray(classes)


@pytest.fixture()
def one_torch_thread():
    """torch on one CPU thread for the test (tiny convolutions only contend on a shared CPU;
    pixels also depend on the thread count), restored afterwards."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
