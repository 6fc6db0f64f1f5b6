"""Every front-end renders through nucsynth.synthesize, so for the same checkpoint, layout,
options and seed the CLI, the render dock, the batch dock, the demo and the napari sample
data give the same pixels, bit for bit (one test per family; the docks' engine functions
run here without a viewer). Tiny untrained checkpoints (32 px) saved by the tests."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("qtpy", reason="the napari plugin's docks need qtpy (pip install 'napari-nucsynth[napari]')")

from nucsynth.checkpoint import save_checkpoint  # noqa: E402
from nucsynth.cli import main  # noqa: E402
from nucsynth.generate.layouts import random_layout  # noqa: E402
from nucsynth.io.store import DatasetStore  # noqa: E402
from nucsynth.layout import CONSEP_CLASSES, Sample  # noqa: E402
from nucsynth.models.joint import JointModel  # noqa: E402
from nucsynth.models.semantic import SemanticModel  # noqa: E402
from nucsynth.models.structure import StructureModel  # noqa: E402
from nucsynth.synthesize import SynthesisOptions, get_synthesizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SIZE, STEPS = 32, 2


def _ckpt(root, name, model):
    torch.manual_seed(0)
    net = model.build_network()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return str(save_checkpoint(root / name, model, net, step=1, train_config={"steps": 1, "cond_drop": 0.2}))


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """Two layouts, random_layout seeds 0 and 1 (what the demo and the sample data draw), with images."""
    path = tmp_path_factory.mktemp("src") / "src.zarr"
    rng = np.random.default_rng(0)
    store = DatasetStore.create(path, CONSEP_CLASSES)
    store.append([Sample(random_layout((SIZE, SIZE), CONSEP_CLASSES, seed=i), rng.integers(0, 256, (SIZE, SIZE, 3), np.uint8),
                         {}) for i in range(2)])
    store.close()
    return path


def _cli(ckpt, out, *extra):
    assert main(["synthesize", "--checkpoint", ckpt, "--steps", str(STEPS), "--seed", "0", "--device", "cpu",
                 "--out", str(out), *extra]) == 0
    return list(DatasetStore.open(out))


def _render_dock(synth, layout, seed):
    from napari_nucsynth._render import RenderParams, render_steps

    steps = render_steps(synth, layout, RenderParams(checkpoint=str(synth.checkpoint), steps=STEPS, seed=seed))
    try:
        while True:
            next(steps)
    except StopIteration as done:
        return done.value


def _batch_dock(ckpt, out, **source):
    from napari_nucsynth._batch import BatchParams, batch_steps

    run = batch_steps(BatchParams(checkpoint=ckpt, out=str(out), count=2, size=SIZE,
                                  options=SynthesisOptions(steps=STEPS, seed=0), **source))
    try:
        while True:
            next(run)
    except StopIteration as done:
        assert done.value is not None and done.value["total"] == 2
    return list(DatasetStore.open(out))


def _same(a, b):
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.layout.inst_map, b.layout.inst_map)


def test_semantic_cli_docks_demo_and_sample_data_agree(tmp_path, src, monkeypatch):
    ckpt = _ckpt(tmp_path, "semantic", SemanticModel.from_preset("tiny", SIZE, CONSEP_CLASSES))
    cli = _cli(ckpt, tmp_path / "cli.zarr", "--layouts", str(src))
    synth = get_synthesizer(ckpt, "cpu")
    _same(_render_dock(synth, cli[1].layout, seed=1), cli[1])  # layout i of a job has seed 0 + i
    for a, b in zip(_batch_dock(ckpt, tmp_path / "batch.zarr", source="store or file", source_path=str(src)), cli):
        _same(a, b)
    assert main(["demo", "--out", str(tmp_path / "demo"), "-n", "2", "--steps", str(STEPS), "--seed", "0",
                 "--checkpoint", ckpt, "--device", "cpu"]) == 0
    for a, b in zip(DatasetStore.open(tmp_path / "demo" / "demo.zarr"), cli):
        _same(a, b)
    from napari_nucsynth._sample_data import rendered_tissue

    monkeypatch.setenv("NUCSYNTH_CHECKPOINT", ckpt)
    layers = rendered_tissue(steps=STEPS)  # random layout seed 0, rendered with seed 0, no viewer
    np.testing.assert_array_equal(layers[0][0], cli[0].image)


def test_joint_cli_and_docks_agree(tmp_path, src):
    ckpt = _ckpt(tmp_path, "joint", JointModel.from_preset("tiny", SIZE, CONSEP_CLASSES))
    cli = _cli(ckpt, tmp_path / "cli.zarr", "--layouts", str(src))
    _same(_render_dock(get_synthesizer(ckpt, "cpu"), DatasetStore.open(src)[1].layout, seed=1), cli[1])
    for a, b in zip(_batch_dock(ckpt, tmp_path / "batch.zarr", source="store or file", source_path=str(src)), cli):
        _same(a, b)


def test_structure_cli_and_render_dock_agree(tmp_path):
    ckpt = _ckpt(tmp_path, "structure", StructureModel.from_preset("tiny", SIZE))
    stage2 = _ckpt(tmp_path, "stage2", SemanticModel.from_preset("tiny", SIZE, CONSEP_CLASSES, condition="structure"))
    cli = _cli(ckpt, tmp_path / "cli.zarr", "--count", "2", "--image-checkpoint", stage2)
    synth = get_synthesizer(ckpt, "cpu", image_checkpoint=stage2)
    _same(_render_dock(synth, random_layout((SIZE, SIZE), CONSEP_CLASSES, seed=5), seed=1), cli[1])
