"""The render dock driven through its widgets, with a tiny model trained here for a few steps."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("napari")
torch = pytest.importorskip("torch")
pytestmark = pytest.mark.gui

SIZE = 32


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one thread (and do not fight other work for the cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


_TINY: dict[int, Path] = {}  # size -> checkpoint, made once per test session


def make_tiny_checkpoint(path: Path, size: int = SIZE) -> Path:
    """A tiny semantic model, trained 2 steps on procedural samples and saved by the engine
    at ``path`` (or the one this session already made for ``size``)."""
    if size in _TINY and _TINY[size].exists():
        return _TINY[size]
    from nucsynth.checkpoint import save_checkpoint
    from nucsynth.data.dataset import SampleDataset
    from nucsynth.generate.tissue import procedural_sample
    from nucsynth.models.semantic import SemanticModel

    torch.manual_seed(0)
    model = SemanticModel.from_preset("tiny", image_size=size)
    net = model.build_network()
    ds = SampleDataset([procedural_sample((size, size), seed=s) for s in range(2)], maps=model.data_maps, augment=False)
    batch = {k: torch.stack([ds[i][k] for i in range(len(ds))]) for k in ds[0]}
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        loss, _ = model.training_loss(net, batch, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    _TINY[size] = save_checkpoint(path, model, net, step=2)
    return _TINY[size]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny semantic model saved by the engine (see :func:`make_tiny_checkpoint`)."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture
def dock(make_napari_viewer, qtbot, tiny_checkpoint):
    from napari_nucsynth._layers import LayoutLayers
    from napari_nucsynth._render import RenderWidget
    from nucsynth.generate.layouts import random_layout

    viewer = make_napari_viewer()
    ctrl = LayoutLayers.show(viewer, random_layout((SIZE, SIZE), seed=1), "tile")
    widget = RenderWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Render")
    widget.ckpt_edit.setText(str(tiny_checkpoint))
    widget._describe_checkpoint()
    widget.steps_spin.setValue(4)
    widget.seed_spin.setValue(7)
    widget.ctrl = ctrl
    yield widget
    if widget.running:
        widget.cancel()
        qtbot.waitUntil(lambda: not widget.running, timeout=60000)


def test_render_adds_an_image_beside_the_layout(dock, qtbot) -> None:
    assert dock.family_label.text().startswith("semantic")
    assert dock.device_label.text().startswith(("CPU", "CUDA", "Apple"))
    dock.run_btn.click()
    assert dock.running and not dock.run_btn.isEnabled() and dock.cancel_btn.isEnabled()
    qtbot.waitUntil(lambda: not dock.running, timeout=120000)
    assert dock.run_btn.isEnabled()
    layer = dock.viewer.layers["tile render"]
    assert layer.data.shape == (SIZE, SIZE, 3) and layer.data.dtype == np.uint8
    meta = layer.metadata["nucsynth"]
    assert meta["seed"] == 7 and meta["model"] == "nucsynth.semantic/tiny" and meta["family"] == "semantic"
    assert meta["steps"] == 4 and meta["checkpoint"] == dock.ckpt_edit.text()
    assert layer.translate[1] >= SIZE  # beside the layout, not over it
    assert [ly.name for ly in dock.viewer.layers][:3] == ["tile instances", "tile classes", "tile centroids"]
    # the render measured this device's speed: the next one is estimated before it starts
    assert "the time is measured on the first step" not in dock.estimate_label.text()
    assert "about" in dock.estimate_label.text() and dock.estimate_s is not None and dock.estimate_s > 0
    dock._update_estimate()  # from the newest measured speed (the worker's last report may land late)
    four = dock.estimate_s
    dock.steps_spin.setValue(400)  # the estimate follows the settings: 100x the steps, 100x the time
    assert dock.estimate_s == pytest.approx(100 * four, rel=1e-6)
    assert "cpu" in [dock.device_combo.itemText(i) for i in range(dock.device_combo.count())]
    assert [b.shortcut().toString() for b in (dock.run_btn, dock.region_btn, dock.cancel_btn)] == [
        "Alt+Return", "Alt+Shift+Return", "Alt+Backspace"]
    assert "(Alt+Return)" in dock.run_btn.toolTip()
    assert "windows" not in dock.estimate_label.text()  # the layout fits one pass of the model
    from napari_nucsynth._layers import LayoutLayers
    from nucsynth.generate.layouts import random_layout

    LayoutLayers.show(dock.viewer, random_layout((2 * SIZE, SIZE), seed=2), "big")
    dock.layout_combo.setCurrentText("big")
    assert f"up to {SIZE} x {SIZE} px in one pass" in dock.estimate_label.text()
    assert "overlapping windows (at least 2.0x the work per step)" in dock.estimate_label.text()


def _torch_threads_of_a_new_thread() -> int:
    """torch's thread count as a new engine thread sees it (the main thread keeps its own
    OpenMP setting; every render runs in a fresh thread that takes torch's global one)."""
    import threading

    seen: list[int] = []
    t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    t.start()
    t.join()
    return seen[0]


def test_cpu_threads_setting_reaches_the_engine(dock, qtbot) -> None:
    import os

    from napari_nucsynth._render import RenderParams
    from nucsynth.threads import available_cpus

    before = torch.get_num_threads()
    try:
        assert dock.threads_spin.value() == 0 and dock.threads_spin.text() == f"auto ({available_cpus()})"
        dock.threads_spin.setValue(1)
        dock.run_btn.click()
        qtbot.waitUntil(lambda: not dock.running, timeout=120000)
        assert _torch_threads_of_a_new_thread() == 1
        assert dock.viewer.layers["tile render"].metadata["nucsynth"]["threads"] == 1
        dock.threads_spin.setValue(0)  # auto: the engine's policy
        dock.run_btn.click()
        qtbot.waitUntil(lambda: not dock.running, timeout=120000)
        env = os.environ.get("OMP_NUM_THREADS", "")
        assert _torch_threads_of_a_new_thread() == (int(env) if env.isdigit() and int(env) >= 1 else available_cpus())
        with pytest.raises(ValueError, match="threads must be >= 0"):
            RenderParams(checkpoint="x", threads=-1)
    finally:
        torch.set_num_threads(before)


def test_rerender_region_changes_only_the_edited_region(dock, qtbot) -> None:
    from nucsynth.edit.region import edited_region

    dock.run_btn.click()
    qtbot.waitUntil(lambda: not dock.running, timeout=120000)
    first = dock.viewer.layers["tile render"].data.copy()
    before = dock.ctrl.layout()
    dock.ctrl.instances.fill(tuple(np.argwhere(before.inst_map == 1)[0]), 0)  # delete nucleus 1
    mask = edited_region(before, dock.ctrl.layout()) > 0
    assert mask.any() and not mask.all()
    dock.region_btn.click()
    qtbot.waitUntil(lambda: not dock.running, timeout=120000)
    second = dock.viewer.layers["tile render"].data
    assert np.array_equal(second[~mask], first[~mask])
    assert not np.array_equal(second[mask], first[mask])
    assert dock.viewer.layers["tile render"].metadata["nucsynth"]["mode"] == "region"


def _engine_threads() -> list:
    import threading

    return [t for t in threading.enumerate() if t.name == "nucsynth-engine"]


def test_cancel_stops_the_render(dock, qtbot) -> None:
    dock.steps_spin.setValue(400)
    dock.run_btn.click()
    qtbot.waitUntil(lambda: dock.progress.value() >= 2, timeout=60000)
    dock.cancel_btn.click()
    assert not dock.running and dock.run_btn.isEnabled()  # idle at once
    assert "cancelled" in dock.status.text()
    qtbot.waitUntil(lambda: not _engine_threads(), timeout=5000)  # and the engine has stopped
    assert dock.progress.value() < 400
    qtbot.wait(200)
    assert "tile render" not in dock.viewer.layers  # a late result is dropped


def test_cancel_within_a_step_at_256_px_with_the_default_model(dock, qtbot) -> None:
    """Cancel in the middle of a sampler step of the shipped model at 256 px: the dock is
    idle within 2 s and the engine stops at its next network pass, not at the step's end."""
    from napari_nucsynth._layers import LayoutLayers
    from nucsynth.checkpoint import resolve_checkpoint
    from nucsynth.generate.layouts import random_layout

    try:
        ckpt = resolve_checkpoint(None)
    except (FileNotFoundError, ValueError) as e:
        pytest.skip(f"no default model installed: {e}")
    LayoutLayers.show(dock.viewer, random_layout((256, 256), seed=2), "big")
    dock.layout_combo.setCurrentText("big")
    dock.ckpt_edit.setText(str(ckpt))
    dock.steps_spin.setValue(50)
    dock.run_btn.click()
    qtbot.waitUntil(lambda: bool(_engine_threads()), timeout=120000)  # the model is loaded, sampling started
    qtbot.wait(300)  # now inside the first step
    t0 = time.perf_counter()
    dock.cancel_btn.click()
    qtbot.waitUntil(lambda: not dock.running, timeout=2000)
    idle = time.perf_counter() - t0
    qtbot.waitUntil(lambda: not _engine_threads(), timeout=10000)
    stopped = time.perf_counter() - t0
    print(f"cancel at 256 px: dock idle after {idle * 1000:.0f} ms, engine stopped after {stopped * 1000:.0f} ms")
    assert idle < 2.0 and stopped < 2.0
    assert "big render" not in dock.viewer.layers


def test_bad_checkpoint_is_a_notification_not_a_crash(dock, qtbot, tmp_path: Path, tiny_checkpoint: Path) -> None:
    bad = tmp_path / "no_such_model"
    dock.ckpt_edit.setText(str(bad))
    dock.run_btn.click()
    assert not dock.running
    assert dock.last_error and str(bad) in dock.last_error
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text("{ not json")
    dock.ckpt_edit.setText(str(corrupt))
    dock.run_btn.click()
    assert not dock.running and "config.json" in dock.last_error
    # a config that reads but weights that do not: the worker fails, the dock reports it
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    (broken / "ema.safetensors").write_bytes(b"\x00" * 16)
    dock.ckpt_edit.setText(str(broken))
    dock.run_btn.click()
    qtbot.waitUntil(lambda: not dock.running, timeout=60000)
    assert "ema.safetensors" in dock.last_error and dock.run_btn.isEnabled()
    assert "tile render" not in dock.viewer.layers


def _run(gen):
    try:
        while True:
            next(gen)
    except StopIteration as done:
        return done.value


def test_joint_models_render_their_own_nuclei_and_structure_needs_its_image_model(tmp_path: Path) -> None:
    """A joint checkpoint renders a Sample with its own nuclei from the layout's points; a
    structure checkpoint without its stage-2 image model is refused with the engine's words."""
    from napari_nucsynth._render import RenderParams, render_steps
    from nucsynth.checkpoint import save_checkpoint
    from nucsynth.generate.layouts import random_layout
    from nucsynth.layout import Sample
    from nucsynth.models.base import get_family
    from nucsynth.synthesize import get_synthesizer

    torch.manual_seed(0)
    layout = random_layout((SIZE, SIZE), seed=3)
    ckpts = {}
    for family in ("joint", "structure"):
        model = get_family(family).from_preset("tiny", image_size=SIZE, class_set=layout.class_set)
        ckpts[family] = save_checkpoint(tmp_path / family, model, model.build_network().eval(), step=0)
    synth = get_synthesizer(ckpts["joint"], "cpu")
    made = _run(render_steps(synth, layout, RenderParams(checkpoint=str(ckpts["joint"]), steps=2, seed=1)))
    assert isinstance(made, Sample) and made.image.shape == (SIZE, SIZE, 3)
    assert made.layout.num_nuclei == layout.num_nuclei  # one nucleus per given point
    with pytest.raises(ValueError, match="only supports mode 'render'"):
        _run(render_steps(synth, layout, RenderParams(checkpoint="x", mode="restyle"), init_image=None))
    with pytest.raises(ValueError, match="image checkpoint"):
        get_synthesizer(ckpts["structure"], "cpu")
