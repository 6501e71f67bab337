"""The synthetic data set: written in VOC layout by `segjax data prepare synthetic`, read back exactly."""
import os

import numpy as np
from PIL import Image

from segjax import cli, data
from segjax.data import synthetic


def test_cli_prepare_then_read_back_byte_exact(tmp_path, capsys):
    d = str(tmp_path / "d")
    rc = cli.main(["data", "prepare", "synthetic", "--data-dir", d, "--num-train", "6", "--num-val", "3",
                   "--image-size", "32"])
    assert rc == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "synthetic: train 6, val 3"
    voc = os.path.join(d, "synthetic", "raw", "VOCdevkit", "VOC2012")
    for split, n in (("train", 6), ("val", 3)):
        src = data.open_source("synthetic", split, d)
        assert len(src) == n
        listed = open(os.path.join(voc, "ImageSets", "Segmentation", f"{split}.txt")).read().split()
        assert sorted(src[k]["file_name"][:-4] for k in range(n)) == sorted(listed)
        for k in range(n):
            ex = src[k]
            stem = ex["file_name"][:-4]
            written = Image.open(os.path.join(voc, "JPEGImages", f"{stem}.jpg"))
            np.testing.assert_array_equal(ex["image"], np.asarray(written))
            palette_png = Image.open(os.path.join(voc, "SegmentationClass", f"{stem}.png"))
            assert palette_png.mode == "P"
            np.testing.assert_array_equal(ex["segmentation_mask"], np.asarray(palette_png))
            assert ex["image"].shape == (32, 32, 3)


def test_prepare_is_idempotent_and_regenerates_on_new_parameters(tmp_path):
    d = str(tmp_path / "d")
    assert data.prepare("synthetic", d, num_train=4, num_val=2, image_size=24, progress=False) == {"train": 4, "val": 2}
    record = os.path.join(d, "synthetic", "voc2012_segmentation", "voc2012", "1.0.0")
    stamp = {f: os.stat(os.path.join(record, f)).st_mtime_ns for f in os.listdir(record)}
    assert data.prepare("synthetic", d, num_train=4, num_val=2, image_size=24, progress=False) == {"train": 4, "val": 2}
    assert stamp == {f: os.stat(os.path.join(record, f)).st_mtime_ns for f in os.listdir(record)}
    assert data.prepare("synthetic", d, num_train=5, num_val=2, image_size=24, progress=False) == {"train": 5, "val": 2}
    assert len(data.open_source("synthetic", "train", d)) == 5


def test_generator_is_seeded_and_class_follows_shape():
    a = synthetic.render(np.random.default_rng(3), 48, 3)
    b = synthetic.render(np.random.default_rng(3), 48, 3)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    seen = set()
    for s in range(40):
        _, mask = synthetic.render(np.random.default_rng(s), 48, 3)
        values = set(np.unique(mask).tolist())
        assert values <= set(range(len(synthetic.CLASS_NAMES))) | {255}
        assert 255 in values and 0 in values  # void borders and background in every image
        seen |= values
    assert seen == set(range(len(synthetic.CLASS_NAMES))) | {255}
    # colour does not give the class away: one shape class comes in many colours
    colours = []
    for s in range(40):
        image, mask = synthetic.render(np.random.default_rng(s), 48, 1)
        if (mask == 1).sum() > 30:
            colours.append(image[mask == 1].mean(0))
    assert len(colours) >= 3 and np.std(np.asarray(colours), axis=0).mean() > 30
