import numpy as np
import pytest
import torch

from nucsynth.data.dataset import MAPS, Augmentation, SampleDataset, split_source
from nucsynth.layout import CONSEP_CLASSES, Layout, Sample, relabel_contiguous, transform_hv


def _sample(shape=(40, 40), seed=0) -> Sample:
    """Asymmetric nuclei; the image encodes each nucleus' id in red and class in green
    on a bright background with a colour gradient (so orientation errors show)."""
    inst = np.zeros(shape, np.int32)
    inst[2:8, 3:14] = 1
    inst[8:12, 3:6] = 1
    inst[15:27, 20:25] = 2
    inst[15:19, 25:33] = 2
    inst[4:8, 26:31] = 3
    inst[28:37, 2:11] = 4
    inst[33:37, 11:14] = 4
    inst[30:34, 30:39] = 5  # touches the right border
    classes = np.array([1, 2, 3, 4, 2])[: int(inst.max())]
    lay = Layout.from_inst_map(inst, classes, CONSEP_CLASSES)
    yy, xx = np.indices(shape)
    img = np.stack([200 + yy % 50, 200 + xx % 50, np.full(shape, 240)], -1).astype(np.uint8)
    nuc = inst > 0
    img[nuc, 0] = 10 * inst[nuc]
    img[nuc, 1] = 20 * lay.type_map()[nuc]
    img[nuc, 2] = 30
    return Sample(lay, img, {"source": f"fake_{seed}"})


def _decode(item) -> tuple[np.ndarray, np.ndarray]:
    """Instance and type maps read back from an item's image."""
    img = np.rint((item["image"].numpy() + 1) * 127.5).astype(int)
    nuc = img[2] == 30
    return np.where(nuc, img[0] // 10, 0), np.where(nuc, img[1] // 20, 0)


def _same_partition(a, b) -> bool:
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return len(set(pairs[0])) == pairs.shape[1] == len(set(pairs[1]))


def test_item_contents_without_augmentation():
    s = _sample()
    ds = SampleDataset([s], maps=tuple(MAPS), augment=False)
    item = ds[0]
    assert set(item) == {"image", *MAPS}
    assert item["image"].dtype == torch.float32 and item["image"].shape == (3, 40, 40)
    assert item["image"].min() >= -1 and item["image"].max() <= 1
    assert torch.allclose(item["image"], torch.from_numpy(s.image.transpose(2, 0, 1)).float() / 127.5 - 1)
    assert item["onehot"].shape == (5, 40, 40) and torch.equal(item["onehot"], torch.from_numpy(s.layout.onehot()))
    assert item["edge"].shape == (1, 40, 40) and item["mask"].shape == (1, 40, 40) and item["dist"].shape == (1, 40, 40)
    assert torch.equal(item["hv"], torch.from_numpy(s.layout.hv_maps()))
    for name in ("points", "type_map", "inst_map"):
        assert item[name].dtype == torch.int64 and item[name].shape == (40, 40)
    assert torch.equal(item["inst_map"], torch.from_numpy(s.layout.inst_map.astype(np.int64)))
    for name in ("onehot", "edge", "hv", "mask", "dist"):
        assert item[name].dtype == torch.float32


def test_augmentation_keeps_image_and_maps_aligned():
    s = _sample()
    ds = SampleDataset([s], maps=("mask", "type_map", "inst_map", "hv", "edge"), seed=3)
    seen = set()
    for epoch in range(40):
        ds.set_epoch(epoch)
        item = ds[0]
        aug = ds.augmentation(0, s.layout.shape)
        seen.add((aug.k, aug.flip))
        inst_img, type_img = _decode(item)
        # Nucleus pixels of the image are exactly the mask / instance partition / classes.
        assert np.array_equal(inst_img > 0, item["mask"][0].numpy() > 0)
        assert _same_partition(inst_img, item["inst_map"].numpy())
        assert np.array_equal(type_img, item["type_map"].numpy())
        # Derive-after-transform equals the HV of the original transformed with sign fixes.
        hv = s.layout.hv_maps()
        if aug.k:
            hv = transform_hv(hv, "rot90", aug.k)
        if aug.flip:
            hv = transform_hv(hv, "flip1")
        assert np.allclose(item["hv"].numpy(), hv, atol=1e-6)
    assert len(seen) == 8  # all rotations/flips of the square are drawn


def test_hv_equals_hv_of_transformed_layout_with_crop():
    s = _sample()
    ds = SampleDataset([s], maps=("hv", "onehot"), size=24, seed=1)
    crops = set()
    for epoch in range(12):
        ds.set_epoch(epoch)
        item = ds[0]
        aug = ds.augmentation(0, s.layout.shape)
        crops.add(aug.crop[:2])
        lay = s.layout.rot90(aug.k)
        lay = lay.flip(1) if aug.flip else lay
        lay = lay.crop(*aug.crop)
        assert item["hv"].shape == (2, 24, 24) and item["image"].shape == (3, 24, 24)
        assert np.array_equal(item["hv"].numpy(), lay.hv_maps())
        assert np.array_equal(item["onehot"].numpy(), lay.onehot())
        inst_img, _ = _decode(item)
        # Crops relabel ids: compare the partition, and the image's ids against the crop.
        expected = np.rot90(s.layout.inst_map, aug.k)
        expected = np.flip(expected, 1) if aug.flip else expected
        y0, x0, h, w = aug.crop
        assert np.array_equal(inst_img, expected[y0 : y0 + h, x0 : x0 + w])
        assert np.array_equal(relabel_contiguous(inst_img)[0], lay.inst_map)
    assert len(crops) > 3  # the window moves


def test_determinism_per_seed_epoch_index():
    samples = [_sample(seed=i) for i in range(4)]
    a = SampleDataset(samples, maps=("hv",), size=32, seed=5)
    b = SampleDataset(samples, maps=("hv",), size=32, seed=5)
    b.set_epoch(0)
    for i in (3, 0, 2, 1):  # access order does not matter
        assert all(torch.equal(a[i][k], b[i][k]) for k in ("image", "hv"))
    draws = lambda ds: [ds.augmentation(i, (40, 40)) for i in range(4)]  # noqa: E731
    a.set_epoch(1)
    c = SampleDataset(samples, maps=("hv",), size=32, seed=6)
    assert draws(a) != draws(b) and draws(c) != draws(b)
    a.set_epoch(0)
    assert draws(a) == draws(b)


def test_centre_crop_without_augmentation_and_non_square():
    s = _sample((40, 40))
    item = SampleDataset([s], maps=("inst_map",), size=(20, 30), augment=False)[0]
    assert item["image"].shape == (3, 20, 30)
    assert np.array_equal(item["inst_map"].numpy(), s.layout.crop(10, 5, 20, 30).inst_map)
    # Non-square output: quarter turns would change the shape, so only 0/180 degrees.
    ds = SampleDataset([s], maps=("mask",), size=(20, 30), seed=0)
    for epoch in range(16):
        ds.set_epoch(epoch)
        assert ds.augmentation(0, (40, 40)).k in (0, 2)
        assert ds[0]["mask"].shape == (1, 20, 30)


def test_dataloader_batches_and_split_view():
    samples = [_sample(seed=i) for i in range(5)]
    view = split_source(samples, [4, 1, 3])
    assert len(view) == 3 and view[0] is samples[4] and view[-1] is samples[3]
    assert [x.provenance["source"] for x in view] == ["fake_4", "fake_1", "fake_3"]
    ds = SampleDataset(view, maps=("onehot", "points"), size=32)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    assert batch["image"].shape == (3, 3, 32, 32) and batch["onehot"].shape == (3, 5, 32, 32)
    assert batch["points"].dtype == torch.int64
    with pytest.raises(ValueError, match="0..4"):
        split_source(samples, [0, 5])
    with pytest.raises(IndexError):
        ds[3]


def test_bad_arguments():
    s = _sample()
    with pytest.raises(ValueError, match="unknown map"):
        SampleDataset([s], maps=("onehot", "depth"))
    with pytest.raises(ValueError, match="size"):
        SampleDataset([s], size=0)
    with pytest.raises(ValueError, match="no samples"):
        SampleDataset([])
    with pytest.raises(ValueError, match="smaller than the crop size"):
        SampleDataset([s], size=64)[0]


def test_augmentation_apply_matches_layout_transforms():
    s = _sample()
    out = Augmentation(k=3, flip=True, crop=(5, 7, 20, 25)).apply(s)
    ref = s.layout.rot90(3).flip(1).crop(5, 7, 20, 25)
    assert out.layout.equals(ref)
    assert np.array_equal(out.image, np.flip(np.rot90(s.image, 3), 1)[5:25, 7:32])


def test_dataset_over_a_store(tmp_path):
    store_mod = pytest.importorskip("nucsynth.io.store")
    samples = [_sample(seed=i) for i in range(3)]
    store = store_mod.DatasetStore.create(tmp_path / "s.zarr", CONSEP_CLASSES)
    store.append(samples, splits=["train", "val", "train"])
    store = store_mod.DatasetStore.open(tmp_path / "s.zarr")
    train = split_source(store, store.indices("train"))
    ds_store = SampleDataset(train, maps=("hv", "onehot"), size=32, seed=2)
    ds_list = SampleDataset([samples[0], samples[2]], maps=("hv", "onehot"), size=32, seed=2)
    assert ds_store.class_set == CONSEP_CLASSES and len(ds_store) == 2
    for i in range(2):
        a, b = ds_store[i], ds_list[i]
        assert all(torch.equal(a[k], b[k]) for k in a)
