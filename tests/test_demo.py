"""`nucsynth demo` end to end with a small checkpoint the test builds (no training needed)."""

import numpy as np
import pytest

from nucsynth.cli import main


@pytest.fixture()
def tiny_checkpoint(tmp_path):
    import torch

    from nucsynth.checkpoint import save_checkpoint
    from nucsynth.models.semantic import SemanticModel

    torch.manual_seed(0)
    model = SemanticModel.from_preset("tiny", image_size=32)
    net = model.build_network()
    return save_checkpoint(tmp_path / "ckpt", model, net, raw_weights=False)


def test_demo_writes_store_and_overview(tmp_path, tiny_checkpoint, capsys):
    from PIL import Image

    from nucsynth.io.store import DatasetStore

    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "-n", "2", "--steps", "2", "--checkpoint", str(tiny_checkpoint), "--device", "cpu"]
    assert main(argv) == 0
    store = DatasetStore.open(out / "demo.zarr")
    assert len(store) == 2
    s = store[0]
    assert s.image.shape == (32, 32, 3) and s.layout.num_nuclei > 0
    assert s.provenance.get("seed") == 0
    png = np.asarray(Image.open(out / "overview.png"))
    assert png.ndim == 3 and png.shape[2] == 3
    assert "nuclei per class" in capsys.readouterr().out

    # The same demo again finds its store complete; other settings are not written over it
    # without --overwrite; same seed -> same images.
    assert main(argv) == 0 and "already complete" in capsys.readouterr().err
    assert main(argv + ["--seed", "1"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(argv + ["--overwrite"]) == 0
    np.testing.assert_array_equal(DatasetStore.open(out / "demo.zarr")[0].image, s.image)


def test_demo_bad_arguments(tmp_path, tiny_checkpoint, capsys):
    assert main(["demo", "--out", str(tmp_path / "x"), "-n", "0", "--checkpoint", str(tiny_checkpoint)]) == 2
    assert "--num" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path / "y"), "--checkpoint", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
    assert not (tmp_path / "y" / "demo.zarr").exists()
