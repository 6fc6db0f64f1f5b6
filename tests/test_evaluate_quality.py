"""``nucsynth evaluate quality``: FSD end to end on two small stores, and the clear refusal
when FID/IS have no Inception weights."""

from __future__ import annotations

import json
import math

import pytest

from nucsynth.cli import main
from nucsynth.generate.layouts import random_layout
from nucsynth.generate.tissue import procedural_image, procedural_sample
from nucsynth.layout import CONSEP_CLASSES, Sample


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    from nucsynth.io.store import DatasetStore

    root = tmp_path_factory.mktemp("quality")
    real = DatasetStore.create(root / "real.zarr", CONSEP_CLASSES)
    real.append([procedural_sample((64, 64), seed=s) for s in range(6)], splits="train")
    # The "synthetic" set: only epithelial nuclei, so its class mix differs from the real one.
    syn = DatasetStore.create(root / "syn.zarr", CONSEP_CLASSES)
    skew = [0.0, 0.0, 1.0, 0.0]
    layouts = [random_layout((64, 64), CONSEP_CLASSES, class_shares=skew, seed=s) for s in range(5)]
    syn.append([Sample(lay, procedural_image(lay, seed=s), {}) for s, lay in enumerate(layouts)], splits="synthetic")
    return root / "real.zarr", root / "syn.zarr"


def test_fsd_end_to_end_without_weights(stores, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NUCSYNTH_INCEPTION_WEIGHTS", str(tmp_path / "absent.pth"))  # FSD must not look
    real, syn = stores
    out = tmp_path / "reports" / "q.json"
    assert main(["evaluate", "quality", str(real), str(syn), "--metrics", "fsd", "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["n_real"] == 6 and rep["n_synth"] == 5 and rep["metrics"] == ["fsd"]
    assert rep["fsd_statistics"] == "area" and math.isfinite(rep["fsd"]) and rep["fsd"] > 0
    assert "fid" not in rep and "inception_weights" not in rep
    assert "FSD (area)" in capsys.readouterr().out
    assert [p.name for p in out.parent.iterdir()] == ["q.json"]  # no temporary file left behind
    # A set against itself is at distance 0; the instance statistics are a different figure.
    same = tmp_path / "same.json"
    assert main(["evaluate", "quality", str(real), str(real), "--metrics", "fsd", "--fsd-statistics", "instance",
                 "--out", str(same)]) == 0
    rep = json.loads(same.read_text())
    assert rep["fsd_statistics"] == "instance" and abs(rep["fsd"]) < 1e-9


def test_fid_without_weights_names_the_paths(stores, tmp_path, monkeypatch, capsys):
    real, syn = stores
    monkeypatch.delenv("NUCSYNTH_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    out = tmp_path / "q.json"
    assert main(["evaluate", "quality", str(real), str(syn), "--metrics", "fid,fsd", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Inception-v3 weights not found" in err and "Traceback" not in err
    assert str(tmp_path / "torch_home" / "hub" / "checkpoints" / "pt_inception-2015-12-05-6726825d.pth") in err
    assert "--inception-weights" in err and not out.exists()
    given = tmp_path / "nowhere" / "inception.pth"
    assert main(["evaluate", "quality", str(real), str(syn), "--metrics", "is", "--inception-weights", str(given)]) == 2
    err = capsys.readouterr().err
    assert str(given) in err and "Traceback" not in err


def test_bad_input_is_a_clear_error(stores, tmp_path, capsys):
    real, _ = stores
    assert main(["evaluate", "quality", str(real), str(real), "--metrics", "fsd,kid"]) == 2
    assert "--metrics must be a comma-separated subset of fid,is,fsd" in capsys.readouterr().err
    assert main(["evaluate", "quality", str(real), str(tmp_path / "missing.zarr"), "--metrics", "fsd"]) == 2
    assert "missing.zarr" in capsys.readouterr().err
