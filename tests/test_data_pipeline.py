"""grain pipelines: transforms as torchvision's reference, determinism (workers too), exact resume,
per-process shards, fixed-shape eval batches."""
import numpy as np
import pytest
from PIL import Image

from segjax import data
from segjax.data import transforms
from segjax.data.pipeline import largest_size

MEAN, STD = np.asarray(data.IMAGENET_MEAN, np.float32), np.asarray(data.IMAGENET_STD, np.float32)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("data"))
    data.prepare("synthetic", d, num_train=16, num_val=5, image_size=40, progress=False)
    return data.open_source("synthetic", "train", d), data.open_source("synthetic", "val", d)


class IndexSource:
    """Example i is an 8x8 image filled with 10*i: batches reveal which records they hold."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"image": np.full((8, 8, 3), 10 * int(i), np.uint8), "segmentation_mask": np.zeros((8, 8), np.uint8),
                "file_name": str(i)}


def record_ids(batch):
    pixels = batch["image"][:, 0, 0, 0] * STD[0] + MEAN[0]
    return np.rint(pixels * 255 / 10).astype(int).tolist()


def loader(src, **kw):
    args = dict(batch_size=4, crop_size=32, base_size=40, seed=0, shard_index=0, shard_count=1)
    return data.make_train_loader(src, **{**args, **kw})


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_same(a, b):
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["mask"], y["mask"])


def test_train_batches_shapes_dtypes_and_values(source):
    batch = next(iter(loader(source[0])))
    assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.float32
    assert batch["mask"].shape == (4, 32, 32) and batch["mask"].dtype == np.int32
    assert set(np.unique(batch["mask"]).tolist()) <= {0, 1, 2, 3, 4, 255}
    lo, hi = (0 - MEAN) / STD, (1 - MEAN) / STD
    assert (batch["image"] >= lo - 1e-5).all() and (batch["image"] <= hi + 1e-5).all()


def test_same_seed_same_batches_other_seed_other_batches(source):
    assert_same(take(iter(loader(source[0])), 3), take(iter(loader(source[0])), 3))
    other = take(iter(loader(source[0], seed=1)), 1)[0]
    assert not np.array_equal(other["image"], take(iter(loader(source[0])), 1)[0]["image"])


def test_worker_processes_and_resume_give_the_uninterrupted_batches(source):
    reference = take(iter(loader(source[0])), 7)  # 4 batches per epoch: crosses an epoch boundary
    for workers in (0, 2):  # a state resumes under the worker count that saved it
        it = iter(loader(source[0], worker_count=workers))
        assert_same(take(it, 3), reference[:3])
        state = it.get_state()
        assert_same(take(it, 1), reference[3:4])
        resumed = iter(loader(source[0], worker_count=workers))
        resumed.set_state(state)
        assert_same(take(resumed, 4), reference[3:])
        for i in (it, resumed):
            getattr(i, "close", lambda: None)()


def test_shards_are_disjoint_and_cover_an_epoch():
    src = IndexSource(12)
    seen = []
    for shard in range(2):
        kw = dict(batch_size=2, crop_size=8, base_size=8, scale_range=(1.0, 1.0), shard_index=shard, shard_count=2,
                  num_epochs=1)
        seen.append([i for b in data.make_train_loader(src, **kw) for i in record_ids(b)])
    assert len(seen[0]) == len(seen[1]) == 6
    assert sorted(seen[0] + seen[1]) == list(range(12))


def test_crop_window_equals_resize_then_crop():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (30, 44, 3), dtype=np.uint8)
    mask = rng.integers(0, 5, (30, 44), dtype=np.uint8)
    for out_hw in ((75, 110), (15, 22), (30, 44)):  # up, down (antialiased), same
        full_img = np.asarray(Image.fromarray(image).resize(out_hw[::-1], Image.BILINEAR))
        full_msk = np.asarray(Image.fromarray(mask).resize(out_hw[::-1], Image.NEAREST))
        top, left, rows, cols = 3, 5, out_hw[0] - 7, out_hw[1] - 9
        img, msk = transforms.resize_window(image, mask, out_hw, top, left, rows, cols)
        diff = np.abs(img.astype(int) - full_img[top:top + rows, left:left + cols])
        assert diff.max() <= 2 and diff.mean() < 0.3  # Pillow's fixed-point coefficients round a little differently
        np.testing.assert_array_equal(msk, full_msk[top:top + rows, left:left + cols])


def test_resize_rule_matches_torchvision():
    import torchvision.transforms.functional as F

    for h, w, s in ((375, 500, 260), (500, 333, 1040), (40, 40, 31), (17, 90, 45)):
        out = F.resize(Image.new("RGB", (w, h)), s)
        assert transforms.resized_shape(h, w, s) == (out.height, out.width)


def test_crop_larger_than_image_pads_image_with_0_and_mask_with_255():
    image = np.full((10, 10, 3), 200, np.uint8)
    mask = np.ones((10, 10), np.uint8)
    img, msk = transforms.train_transform(image, mask, np.random.default_rng(0), crop_size=(24, 30), base_size=10,
                                          scale_range=(1.0, 1.0), hflip=False)
    assert img.shape == (24, 30, 3) and msk.shape == (24, 30)
    assert (msk[:10, :10] == 1).all() and (msk[10:] == 255).all() and (msk[:, 10:] == 255).all()
    np.testing.assert_allclose(img[20, 25], -MEAN / STD, rtol=1e-6)
    np.testing.assert_allclose(img[0, 0], (200 / 255 - MEAN) / STD, rtol=1e-5)


def test_flips_move_image_and_mask_together():
    image = np.zeros((8, 8, 3), np.uint8)
    image[:, :2] = 255
    mask = np.zeros((8, 8), np.uint8)
    mask[:, :2] = 1
    flipped = 0
    for s in range(20):
        img, msk = transforms.train_transform(image, mask, np.random.default_rng(s), crop_size=8, base_size=8,
                                              scale_range=(1.0, 1.0), hflip=True, vflip=True)
        np.testing.assert_array_equal(img[..., 0] > 0, msk == 1)
        flipped += int(msk[0, -1] == 1)
    assert 3 < flipped < 17


def test_eval_batches_have_fixed_shape_and_cover_every_example_once(source):
    val = source[1]
    ev = data.make_eval_loader(val, batch_size=2, pad_multiple=16, shard_index=0, shard_count=1)
    assert ev.eval_size == (48, 48) == largest_size(val, None, 16) and len(ev) == 3
    batches = list(ev)
    assert len(batches) == 3 and all(b["image"].shape == (2, 48, 48, 3) for b in batches)
    index = np.concatenate([b["index"] for b in batches])
    assert index.tolist() == [0, 1, 2, 3, 4, -1]
    for b in batches:
        for k in range(2):
            if b["index"][k] < 0:
                assert (b["mask"][k] == 255).all() and b["valid_hw"][k].tolist() == [0, 0]
                continue
            h, w = b["valid_hw"][k]
            np.testing.assert_array_equal(b["mask"][k, :h, :w], val[int(b["index"][k])]["segmentation_mask"])
            assert (b["mask"][k, h:] == 255).all() and (b["mask"][k, :, w:] == 255).all()
    logits = np.zeros((2, 48, 48, 5))
    assert [logits[i, :h, :w].shape for i, (h, w) in enumerate(batches[2]["valid_hw"])] == [(40, 40, 5), (0, 0, 5)]
    halves = [data.make_eval_loader(val, batch_size=2, shard_index=i, shard_count=2, eval_size=40) for i in range(2)]
    assert len(halves[0]) == len(halves[1]) == 2
    got = sorted(i for h in halves for b in h for i in b["index"].tolist() if i >= 0)
    assert got == [0, 1, 2, 3, 4]


def test_eval_resize_to_base_size(source):
    ev = data.make_eval_loader(source[1], batch_size=5, base_size=20, pad_multiple=8, shard_index=0, shard_count=1)
    (b,) = list(ev)
    assert b["image"].shape == (5, 24, 24, 3) and b["valid_hw"].tolist() == [[20, 20]] * 5
