"""The latent path: autoencoder family, latent semantic model, precomputed latents, bundling."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from nucsynth.checkpoint import export_checkpoint, load_checkpoint, read_config
from nucsynth.data.dataset import Augmentation, SampleDataset, image_to_tensor
from nucsynth.data.latents import LatentDataset
from nucsynth.generate.tissue import procedural_sample
from nucsynth.models.autoencoder import AutoencoderFamilyConfig, AutoencoderModel, ssim, weights_hash
from nucsynth.models.semantic import SemanticModel
from nucsynth.nets.autoencoder import AutoencoderConfig, KLAutoencoder
from nucsynth.train import TrainConfig, train


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


def _samples(n: int = 4, size: int = 32) -> list:
    return [procedural_sample((size, size), seed=i, density=200) for i in range(n)]


def _small_ae(label_aware: bool) -> AutoencoderModel:
    """A narrow f = 4 autoencoder (the presets are wider than a unit test needs)."""
    cs = _samples(1)[0].layout.class_set
    net = AutoencoderConfig(latent_channels=4, channels=(8, 16, 16), cond_channels=cs.num_classes + 2 if label_aware else 0,
                            spade_hidden=8)
    return AutoencoderModel(AutoencoderFamilyConfig("tiny", 32, cs, net.to_dict(), label_aware))


@pytest.fixture(scope="module")
def ae_ckpt(tmp_path_factory):
    torch.set_num_threads(1)
    model = _small_ae(label_aware=True)
    ds = SampleDataset(_samples(), maps=model.data_maps, size=32)
    res = train(model, ds, tmp_path_factory.mktemp("ae"), TrainConfig(steps=2, batch_size=2, warmup=1, lr=1e-3))
    return res.checkpoint


@pytest.fixture(scope="module")
def latent_run(ae_ckpt, tmp_path_factory):
    torch.set_num_threads(1)
    src = _samples()
    model = SemanticModel.from_preset("tiny", 32, src[0].layout.class_set, autoencoder=ae_ckpt)
    ds = SampleDataset(src, maps=model.data_maps, size=32)
    out = tmp_path_factory.mktemp("latent")
    train(model, ds, out, TrainConfig(steps=2, batch_size=2, warmup=1, lr=1e-3, cond_drop=0.5))
    return out


def test_autoencoder_shapes_and_condition_checks():
    net = KLAutoencoder(AutoencoderConfig(channels=(8, 16, 16), cond_channels=6, spade_hidden=8))
    x = torch.rand(2, 3, 32, 48) * 2 - 1
    mean, logvar = net.encode(x)
    assert mean.shape == logvar.shape == (2, 4, 8, 12) and net.factor == 4
    assert net.decode(mean, torch.zeros(2, 6, 32, 48)).shape == x.shape
    with pytest.raises(ValueError, match="label-aware decoder needs cond"):
        net.decode(mean)
    with pytest.raises(ValueError, match="not a multiple of 4"):
        net.encode(torch.zeros(1, 3, 30, 32))
    plain = KLAutoencoder(AutoencoderConfig(channels=(8, 16, 16)))
    with pytest.raises(ValueError, match="not label-aware"):
        plain.decode(mean, torch.zeros(2, 6, 32, 48))
    assert AutoencoderConfig.from_dict(plain.config.to_dict()) == plain.config


def test_ssim_matches_scikit_image():
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(0)
    a = rng.random((40, 40))
    b = np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1)
    ours = float(ssim(torch.tensor(a)[None, None], torch.tensor(b)[None, None], data_range=1.0))
    ref = structural_similarity(a, b, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    assert ours == pytest.approx(ref, abs=2e-3)


def test_autoencoder_training_reduces_reconstruction_error():
    torch.manual_seed(0)
    model = _small_ae(label_aware=False)
    net = model.build_network()
    batch = {"image": torch.stack([image_to_tensor(s.image) for s in _samples(2)])}
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    first = None
    for _ in range(40):
        loss, logs = model.training_loss(net, batch, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = logs["l1"] if first is None else first
    assert logs["l1"] < 0.6 * first
    assert set(logs) == {"l1", "ssim", "kl"}


def test_latent_model_trains_samples_and_is_deterministic(latent_run, ae_ckpt):
    cfg = read_config(latent_run)["model"]
    assert cfg["latent"]["factor"] == 4 and cfg["latent"]["scale"] > 0
    assert cfg["latent"]["autoencoder_hash"] == weights_hash(ae_ckpt)
    assert cfg["network"]["in_channels"] == 4 and cfg["network"]["image_size"] == 8
    model, _ = load_checkpoint(latent_run)
    from nucsynth.models.base import one_pass_size

    # the one-pass size is readable from config.json alone (the render dock's size note)
    assert one_pass_size(cfg["image_size"], cfg["latent"]) == model.render_size == 2 * cfg["image_size"]
    lay = _samples(1, 64)[0].layout  # a canvas larger than the training crops
    a = model.sample([lay], steps=3, guidance=0.5, seed=7)[0].image
    b = model.sample([lay], steps=3, guidance=0.5, seed=7)[0].image
    c = model.sample([lay], steps=3, guidance=0.5, seed=8)[0].image
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    with pytest.raises(ValueError, match="multiple of"):
        model.sample([_samples(1, 36)[0].layout], steps=2)


def test_latent_masked_rerender_keeps_unmasked_pixels(latent_run):
    model, _ = load_checkpoint(latent_run)
    s = _samples(1, 64)[0]
    mask = np.zeros((64, 64), bool)
    mask[16:40, 20:44] = True
    out = model.sample([s.layout], steps=3, seed=0, init_image=s.image, strength=0.6, mask=mask)[0].image
    far = np.ones_like(mask)
    far[13:43, 17:47] = False  # the mask grown by more than the 2 px feathered seam
    np.testing.assert_array_equal(out[far], s.image[far])
    assert not np.array_equal(out[mask], s.image[mask])


def test_latent_model_refuses_another_or_missing_autoencoder(latent_run, ae_ckpt, tmp_path):
    other = tmp_path / "other_ae"
    shutil.copytree(ae_ckpt, other)
    model, _ = load_checkpoint(latent_run)
    model.config.latent["autoencoder"] = str(other)
    model._autoencoder = None
    # same bytes: accepted (the hash is of the content, not the path)
    model.autoencoder()
    ae_model, ae_net = load_checkpoint(other)
    with torch.no_grad():
        next(ae_net.parameters()).add_(0.01)
    from nucsynth.checkpoint import save_checkpoint

    save_checkpoint(other, ae_model, ae_net, raw_weights=False)
    model._autoencoder = None
    with pytest.raises(ValueError, match="only works with its own autoencoder"):
        model.autoencoder()
    model.config.latent["autoencoder"] = str(tmp_path / "nowhere")
    model._autoencoder = None
    with pytest.raises(FileNotFoundError, match="nowhere"):
        model.autoencoder()


def test_export_bundles_autoencoder_in_half_precision(latent_run, tmp_path):
    dst = export_checkpoint(latent_run, tmp_path / "shipped", half=True)
    assert (dst / "autoencoder" / "config.json").is_file()
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["model"]["latent"]["autoencoder"] == "autoencoder"
    moved = tmp_path / "elsewhere" / "model"
    shutil.move(str(dst), moved)  # the pair travels together
    model, net = load_checkpoint(moved)
    assert next(net.parameters()).dtype == torch.float32
    lay = _samples(1)[0].layout
    full, _ = load_checkpoint(latent_run)
    a = model.sample([lay], steps=2, seed=1)[0].image.astype(int)
    b = full.sample([lay], steps=2, seed=1)[0].image.astype(int)
    assert np.abs(a - b).mean() < 2.0  # float16 weights: nearly the same pixels
    with pytest.raises(FileExistsError):
        export_checkpoint(latent_run, moved)


def test_precomputed_latents_equal_encoding_of_the_augmented_patch(latent_run):
    model, _ = load_checkpoint(latent_run)
    src = _samples(3, 64)
    enc = lambda x: model.autoencoder().encode(x)[0]  # noqa: E731
    ds = LatentDataset(src, enc, 4, size=32, seed=3)
    for i in range(3):
        item = ds[i]
        aug = ds.augmentation(i, (64, 64))
        y0, x0, h, w = aug.crop
        assert y0 % 4 == 0 and x0 % 4 == 0
        full = enc(image_to_tensor(Augmentation(aug.k, aug.flip).apply(src[i]).image)[None])[0]
        torch.testing.assert_close(item["latent"], full[:, y0 // 4 : (y0 + h) // 4, x0 // 4 : (x0 + w) // 4])
        np.testing.assert_array_equal(item["image"].numpy(), image_to_tensor(aug.apply(src[i]).image).numpy())
    with pytest.raises(ValueError, match="multiple of the autoencoder factor"):
        LatentDataset(src, enc, 4, size=30)


def test_cli_trains_autoencoder_then_latent_model(tmp_path):
    from nucsynth.cli import main
    from nucsynth.io.store import DatasetStore

    store = DatasetStore.create(tmp_path / "d.zarr", _samples(1)[0].layout.class_set)
    store.append(_samples(4, 64))
    ae = tmp_path / "ae"
    common = ["--data", str(tmp_path / "d.zarr"), "--steps", "1", "--batch-size", "2", "--threads", "1",
              "--device", "cpu", "--split", "all"]
    assert main(["train", "--family", "autoencoder", "--label-aware", "--out", str(ae), "--image-size", "32", *common]) == 0
    assert read_config(ae)["model"]["label_aware"] is True
    lat = tmp_path / "lat"
    assert main(["train", "--family", "semantic", "--autoencoder", str(ae), "--precompute-latents", "--out", str(lat),
                 "--image-size", "32", *common]) == 0
    assert read_config(lat)["model"]["latent"]["scale"] > 0
    assert main(["train", "--family", "semantic", "--label-aware", "--out", str(tmp_path / "x"),
                 "--image-size", "32", *common]) == 2


def test_latent_nudiff_stage2_with_a_plain_autoencoder(ae_ckpt, tmp_path):
    src = _samples()
    cs = src[0].layout.class_set
    with pytest.raises(ValueError, match="without --label-aware"):
        SemanticModel.from_preset("tiny", 32, cs, autoencoder=ae_ckpt, condition="structure")
    plain = _small_ae(label_aware=False)
    res = train(plain, SampleDataset(src, maps=(), size=32), tmp_path / "ae", TrainConfig(steps=1, batch_size=2, warmup=1))
    m = SemanticModel.from_preset("tiny", 32, cs, autoencoder=res.checkpoint, condition="structure")
    assert m.config.network["cond_channels"] == 3 and m.data_maps == ("mask", "hv")
    train(m, SampleDataset(src, maps=m.data_maps, size=32), tmp_path / "s2", TrainConfig(steps=1, batch_size=2, warmup=1))
    model, _ = load_checkpoint(tmp_path / "s2")
    assert model.sample([src[0].layout], steps=2, seed=0)[0].image.shape == (32, 32, 3)


def test_decoder_finetune_keeps_the_latent_space(latent_run, ae_ckpt, tmp_path):
    from nucsynth.models.autoencoder import same_encoder

    src = _samples()
    ft = AutoencoderModel.decoder_finetune(ae_ckpt)
    res = train(ft, SampleDataset(src, maps=ft.data_maps, size=32), tmp_path / "ft",
                TrainConfig(steps=2, batch_size=2, warmup=1, lr=1e-2))
    _, before = load_checkpoint(ae_ckpt)
    _, after = load_checkpoint(res.checkpoint)  # loads without the source autoencoder's weights
    assert same_encoder(before, after)
    assert not torch.equal(before.state_dict()["dec_out.weight"], after.state_dict()["dec_out.weight"])
    pair = export_checkpoint(latent_run, tmp_path / "pair", autoencoder=res.checkpoint)
    model, _ = load_checkpoint(pair)
    assert model.sample([src[0].layout], steps=2, seed=0)[0].image.shape == (32, 32, 3)
    other = train(_small_ae(True), SampleDataset(src, maps=("onehot", "edge"), size=32), tmp_path / "other",
                  TrainConfig(steps=1, batch_size=2, warmup=1, seed=5))
    with pytest.raises(ValueError, match="does not share the encoder"):
        export_checkpoint(latent_run, tmp_path / "bad", autoencoder=other.checkpoint)
