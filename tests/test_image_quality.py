"""FID / IS / FSD / segmenter feature distance: closed forms, the Inception weights loader
(with weights this test makes: nothing is downloaded) and end-to-end feature extraction."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import disk_layout_arrays
from nucsynth.evaluate import image_quality as iq
from nucsynth.evaluate import inception as inc
from nucsynth.layout import CONSEP_CLASSES, Layout, Sample

# ----------------------------------------------------------------------------- helpers


def _test_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random FID-Inception weights in the checkpoint's key format: He-normal convolutions,
    identity batch norms (so activations neither vanish nor explode), a random 1008-way head."""
    g = torch.Generator().manual_seed(seed)
    sd = inc.build_fid_inception().state_dict()
    for k, v in sd.items():
        if k.endswith("conv.weight"):
            v.copy_(torch.randn(v.shape, generator=g) * math.sqrt(2.0 / v[0].numel()))
        elif k.endswith("bn.running_var") or k.endswith("bn.weight"):
            v.fill_(1.0)
        elif k.endswith("bn.running_mean") or k.endswith("bn.bias"):
            v.zero_()
        elif k == "fc.weight":
            v.copy_(torch.randn(v.shape, generator=g) / math.sqrt(v.shape[1]))
    return sd


def _images(n: int, seed: int, shift: float = 0.0, size: int = 48) -> np.ndarray:
    """n smooth random RGB images; ``shift`` darkens them and adds a colour cast."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 1, (n, size // 8, size // 8, 3))
    img = np.kron(coarse, np.ones((1, 8, 8, 1))) * 0.7 + rng.uniform(0, 0.3, (n, size, size, 3))
    img = img * (1 - 0.6 * shift) + shift * np.array([0.4, 0.0, 0.3])
    return np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("inception")
    torch.save(_test_state_dict(), d / inc.WEIGHTS_FILE)
    return d


@pytest.fixture(scope="module")
def outputs(weights_dir):
    """Inception outputs of a base set (3 images) and of a mildly and a strongly shifted set
    (2 images each: every image costs a 299 px Inception pass)."""
    net, info = inc.load_fid_inception(weights_dir, device="cpu")
    sets = {"base": _images(3, 1), "mild": _images(2, 3, 0.3), "strong": _images(2, 4, 1.0)}
    return info, {k: iq.inception_outputs(v, net, batch_size=3) for k, v in sets.items()}, sets


# ----------------------------------------------------------------------------- Frechet distance


def test_frechet_distance_closed_forms():
    # 1-D: N(0, 1) vs N(1, 4): (0-1)^2 + 1 + 4 - 2*sqrt(4) = 2.
    assert iq.frechet_distance([0.0], [[1.0]], [1.0], [[4.0]]) == pytest.approx(2.0, abs=1e-12)
    # Diagonal: sum of squared mean differences + sum of (std1 - std2)^2.
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([3.0, 1.0, 0.0])
    sd1, sd2 = np.array([1.0, 2.0, 0.5]), np.array([2.0, 2.0, 3.0])
    want = ((mu1 - mu2) ** 2).sum() + ((sd1 - sd2) ** 2).sum()
    got = iq.frechet_distance(mu1, np.diag(sd1**2), mu2, np.diag(sd2**2))
    assert got == pytest.approx(want, abs=1e-10)
    # A common rotation of both Gaussians changes nothing.
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))
    rot = iq.frechet_distance(q @ mu1, q @ np.diag(sd1**2) @ q.T, q @ mu2, q @ np.diag(sd2**2) @ q.T)
    assert rot == pytest.approx(want, abs=1e-9)
    # Same Gaussian: zero.
    s = np.array([[2.0, 0.5], [0.5, 1.0]])
    assert iq.frechet_distance([1.0, 2.0], s, [1.0, 2.0], s) == pytest.approx(0.0, abs=1e-12)


def test_eigh_agrees_with_pytorch_fid_sqrtm_route():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(200, 24)), rng.normal(size=(150, 24)) @ rng.normal(size=(24, 24)) * 0.3 + 0.2
    stats = (*iq.gaussian_stats(a), *iq.gaussian_stats(b))
    eig, sq = iq.frechet_distance(*stats), iq.frechet_distance(*stats, method="sqrtm")
    assert eig == pytest.approx(sq, rel=1e-9)
    # Feature route (n >= d: covariances; n < d: cross-Gram SVD) = the covariance route.
    assert iq.frechet_distance_features(a, b) == pytest.approx(eig, rel=1e-9)
    few_a, few_b = a[:10], b[:7]
    assert iq.frechet_distance_features(few_a, few_b) == pytest.approx(
        iq.frechet_distance(*iq.gaussian_stats(few_a), *iq.gaussian_stats(few_b), method="sqrtm"), rel=1e-6)
    with pytest.raises(ValueError, match="unknown method"):
        iq.frechet_distance(*stats, method="svd")


def test_frechet_bad_input():
    with pytest.raises(ValueError, match="at least 2 samples"):
        iq.frechet_distance_features(np.zeros((1, 4)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="dimensions differ"):
        iq.frechet_distance_features(np.zeros((3, 4)), np.zeros((3, 5)))
    with pytest.raises(ValueError, match="NaN"):
        iq.frechet_distance_features(np.full((3, 4), np.nan), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="one D"):
        iq.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


# ----------------------------------------------------------------------------- IS


def test_inception_score_closed_forms():
    assert iq.inception_score_from_logits(np.zeros((6, 1008)), splits=2) == pytest.approx((1.0, 0.0), abs=1e-12)
    # Confident and all different: IS -> number of images per split.
    confident = np.eye(8) * 60.0
    mean, std = iq.inception_score_from_logits(confident, splits=2)
    assert mean == pytest.approx(4.0, rel=1e-6) and std == pytest.approx(0.0, abs=1e-6)
    # Huge logits do not underflow into NaN.
    assert np.isfinite(iq.inception_score_from_logits(np.eye(4) * 1e4, splits=1)[0])
    with pytest.raises(ValueError, match="splits"):
        iq.inception_score_from_logits(np.zeros((3, 10)), splits=4)


# ----------------------------------------------------------------------------- Inception weights


def test_test_weights_use_the_checkpoint_key_format():
    tvi = inc._torchvision_inception()
    ref = tvi.Inception3(num_classes=1008, aux_logits=False, init_weights=False).state_dict()
    ours = inc.build_fid_inception().state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in ref.items()}


def test_missing_weights_name_every_place(tmp_path, monkeypatch):
    monkeypatch.delenv(inc.WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cache = tmp_path / "torch" / "hub" / "checkpoints" / inc.WEIGHTS_FILE
    with pytest.raises(FileNotFoundError) as e:
        iq.fid(_images(2, 0), _images(2, 1))
    msg = str(e.value)
    assert str(cache) in msg and inc.WEIGHTS_ENV in msg and inc.WEIGHTS_URL in msg
    missing = tmp_path / "nowhere" / "inception.pth"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        inc.load_fid_inception(missing)
    monkeypatch.setenv(inc.WEIGHTS_ENV, str(missing))
    with pytest.raises(FileNotFoundError, match=inc.WEIGHTS_ENV) as e:
        inc.find_inception_weights()
    assert str(missing) in str(e.value)


def test_weights_found_in_env_and_cache(weights_dir, tmp_path, monkeypatch):
    file = weights_dir / inc.WEIGHTS_FILE
    assert inc.find_inception_weights(weights_dir) == file  # a folder holding the standard name
    monkeypatch.setenv(inc.WEIGHTS_ENV, str(file))
    assert inc.find_inception_weights() == file
    monkeypatch.delenv(inc.WEIGHTS_ENV)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    os.symlink(file, tmp_path / "hub" / "checkpoints" / inc.WEIGHTS_FILE)
    assert inc.find_inception_weights() == tmp_path / "hub" / "checkpoints" / inc.WEIGHTS_FILE


class _NotATensor:
    pass


def test_bad_weight_files_are_refused(tmp_path):
    imagenet = tmp_path / "imagenet.pth"
    torch.save({"fc.weight": torch.zeros(1000, 2048)}, imagenet)
    with pytest.raises(ValueError, match="1000-class ImageNet"):
        inc.load_fid_inception(imagenet, device="cpu")
    partial = tmp_path / "partial.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(32, 3, 3, 3)}, partial)
    with pytest.raises(ValueError, match="missing keys"):
        inc.load_fid_inception(partial, device="cpu")
    pickled = tmp_path / "pickled.pth"
    torch.save({"x": _NotATensor()}, pickled)
    with pytest.raises(ValueError, match="Unsupported global"):
        inc.load_fid_inception(pickled, device="cpu")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="plain tensor state dict"):
        inc.load_fid_inception(garbage, device="cpu")


# ----------------------------------------------------------------------------- FID / IS end to end


def test_fid_from_weights_made_here(outputs, weights_dir):
    info, out, sets = outputs
    assert info["path"] == str(weights_dir / inc.WEIGHTS_FILE) and len(info["sha256"]) == 64
    feats, logits = out["base"]
    assert feats.shape == (3, inc.FEATURE_DIM) and logits.shape == (3, inc.NUM_CLASSES)
    assert feats.dtype == np.float64 and np.all(np.isfinite(feats)) and feats.std() > 0
    f = {k: v[0] for k, v in out.items()}
    self_d = iq.frechet_distance_features(f["base"], f["base"])
    mild = iq.frechet_distance_features(f["base"], f["mild"])
    strong = iq.frechet_distance_features(f["base"], f["strong"])
    assert abs(self_d) < 1e-9 * mild
    assert 0 < mild < strong
    is_mean, _ = iq.inception_score_from_logits(logits, splits=1)
    assert is_mean >= 1.0
    # The top-level call (weights found through the folder, other batches, a list input)
    # gives the same FID: features do not depend on batching.
    direct = iq.fid(sets["base"][:2], list(sets["strong"]), weights=weights_dir, device="cpu", batch_size=1)
    assert direct == pytest.approx(iq.frechet_distance_features(f["base"][:2], f["strong"]), rel=1e-6)


def test_report_with_inception(outputs, weights_dir):
    _, out, sets = outputs
    inst, classes = disk_layout_arrays()
    lay = Layout.from_inst_map(inst, classes, CONSEP_CLASSES)
    real = [Sample(lay, im) for im in sets["base"][:2]]
    synth = [Sample(lay.flip(0), im) for im in sets["strong"]]
    calls = []
    rep = iq.image_quality_report(real, synth, weights=weights_dir / inc.WEIGHTS_FILE, device="cpu",
                                  progress=lambda d, n: calls.append((d, n)))
    f_real, l_real = out["base"][0][:2], out["base"][1][:2]
    assert rep["fid"] == pytest.approx(iq.frechet_distance_features(f_real, out["strong"][0]), rel=1e-6)
    assert (rep["is_real"], rep["is_real_std"]) == pytest.approx(iq.inception_score_from_logits(l_real, 2), rel=1e-6)
    assert rep["is_real_splits"] == rep["is_synth_splits"] == 2  # 10 splits lowered to the set size
    assert rep["fsd"] == pytest.approx(iq.fsd(real, synth)) and rep["n_real"] == rep["n_synth"] == 2
    assert rep["inception_weights"] == str(weights_dir / inc.WEIGHTS_FILE) and rep["device"].startswith("CPU")
    assert calls[-1] == (4, 4)


def test_report_fsd_only_needs_no_weights(monkeypatch, tmp_path):
    monkeypatch.delenv(inc.WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    real, synth = _samples(3, None, 0), _samples(3, None, 10)
    rep = iq.image_quality_report(real, synth, metrics=("fsd",))
    assert rep == {"n_real": 3, "n_synth": 3, "fsd": pytest.approx(iq.fsd(real, synth)), "fsd_statistics": "area"}
    with pytest.raises(FileNotFoundError, match=inc.WEIGHTS_FILE):
        iq.image_quality_report(real, synth, metrics=("fid",))
    with pytest.raises(ValueError, match="unknown metrics"):
        iq.image_quality_report(real, synth, metrics=("kid",))


# ----------------------------------------------------------------------------- FSD


def _samples(n: int, shares, seed0: int, shape=(96, 96)) -> list[Sample]:
    from nucsynth.generate.layouts import random_layout

    out = []
    for s in range(seed0, seed0 + n):
        lay = random_layout(shape, CONSEP_CLASSES, density=150.0, class_shares=shares, seed=s)
        out.append(Sample(lay, np.zeros(shape + (3,), np.uint8)))
    return out


def test_label_statistics_by_hand():
    inst, classes = disk_layout_arrays()
    lay = Layout.from_inst_map(inst, classes, CONSEP_CLASSES)
    areas = lay.areas()
    area = iq.label_statistics(lay)
    assert area.shape == (5,) and area[0] == 0
    assert np.allclose(area[1:4], areas / 48**2) and area[4] == 0
    full = iq.label_statistics(lay, "instance")
    assert full.shape == (13,)
    assert np.allclose(full[5:10], [0, 1e4 / 48**2, 1e4 / 48**2, 1e4 / 48**2, 0])
    assert full[11] == pytest.approx(np.median(np.sqrt(4 * areas / np.pi)))
    empty = Layout.from_inst_map(np.zeros((8, 8), np.int32), [], CONSEP_CLASSES)
    assert np.all(iq.label_statistics(empty, "instance") == 0)
    with pytest.raises(ValueError, match="unknown FSD statistics"):
        iq.label_statistics(lay, "hist")


def test_fsd_zero_for_same_set_and_grows_with_class_mix():
    base = _samples(6, None, 0)
    more_base = _samples(6, None, 100)
    shifted = _samples(6, [0.1, 0.1, 0.7, 0.1], 200)  # mostly class 3 (CoNSeP: inflammatory)
    for kind in iq.FSD_KINDS:
        far = iq.fsd(base, shifted, kind)
        assert abs(iq.fsd(base, base, kind)) < 1e-12 * max(far, 1.0)
        assert 0 < iq.fsd(base, more_base, kind) < far
    layouts_only = [s.layout for s in base]
    assert iq.fsd(layouts_only, shifted) == pytest.approx(iq.fsd(base, shifted))
    with pytest.raises(ValueError, match="at least 2 label maps"):
        iq.fsd(base[:1], shifted)
    from nucsynth.layout import NUCLEUS_CLASSES

    other = [Layout.from_inst_map(s.layout.inst_map, None, NUCLEUS_CLASSES) for s in base]
    with pytest.raises(ValueError, match="classes"):
        iq.fsd(base, other)


# ----------------------------------------------------------------------------- segmenter features


class _Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.3
        self.seen: list[tuple[float, float]] = []

    def forward(self, x):
        self.seen.append((float(x.min()), float(x.max())))
        h = torch.relu(self.a(x))
        return [h, torch.relu(self.b(h))]  # multi-scale: pooled and concatenated


def test_segmenter_feature_distance():
    enc = _Encoder().train()
    base, other, shifted = _images(6, 1), _images(6, 2), _images(6, 3, 1.0)
    assert iq.segmenter_feature_distance(base, base, enc) == pytest.approx(0.0, abs=1e-9)
    assert enc.training  # mode restored
    near = iq.segmenter_feature_distance(base, other, enc, batch_size=4)
    far = iq.segmenter_feature_distance(base, shifted, enc)
    assert 0 < near < far
    assert min(lo for lo, _ in enc.seen) < 0  # fed in [-1, 1]
    enc.seen.clear()
    iq.segmenter_feature_distance(base, other, enc, input_range="unit")
    assert min(lo for lo, _ in enc.seen) >= 0
    with pytest.raises(ValueError, match="different sizes"):
        iq.segmenter_feature_distance([base[0], base[1][:40]], other, enc)
    with pytest.raises(ValueError, match="uint8"):
        iq.segmenter_feature_distance(base.astype(np.float32), other, enc)


def test_matches_pytorch_fid(outputs, weights_dir, tmp_path, monkeypatch):
    """Same weights -> same pool3 features and Frechet distance as pytorch-fid (optional
    independent reference; it finds our test weights in the torch hub cache, no download)."""
    pytest.importorskip("pytorch_fid")
    inc._torchvision_inception()  # the CPU-safe torchvision import, before pytorch-fid imports it
    from pytorch_fid.fid_score import calculate_frechet_distance
    from pytorch_fid.inception import InceptionV3

    _, out, sets = outputs
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    os.symlink(weights_dir / inc.WEIGHTS_FILE, tmp_path / "hub" / "checkpoints" / inc.WEIGHTS_FILE)
    ref = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    x = torch.from_numpy(sets["mild"][:1]).permute(0, 3, 1, 2).float() / 255.0  # one 299 px pass
    with torch.inference_mode():
        ref_feats = ref(x)[0].flatten(1).double().numpy()
    ours = out["mild"][0][:1]
    assert np.allclose(ours, ref_feats, rtol=1e-4, atol=1e-5 * np.abs(ref_feats).max())
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(40, 16)), rng.normal(size=(30, 16)) * 1.5 + 0.3
    stats = (*iq.gaussian_stats(a), *iq.gaussian_stats(b))
    assert iq.frechet_distance(*stats) == pytest.approx(calculate_frechet_distance(*stats), rel=1e-9)
