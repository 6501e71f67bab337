"""segmentation_folder: DRIVE and DUTS presets, a custom JSON manifest, and the 0/255 mistake."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from segjax import data
from segjax.errors import SegjaxError
from test_data_fixtures import H, W, image_array


def write_drive(root, split="training", ids=("21", "22")):
    for d in ("images", "1st_manual", "mask"):
        os.makedirs(os.path.join(root, split, d), exist_ok=True)
    tag = "training" if split == "training" else "test"
    vessels = {}
    for k, i in enumerate(ids):
        Image.fromarray(image_array(k)).save(os.path.join(root, split, "images", f"{i}_{tag}.tif"))
        v = np.zeros((H, W), np.uint8)
        v[:, 5 + k] = 255  # a vertical vessel
        gif = Image.fromarray(v)
        if k == 1:  # a GIF whose palette lists white first: the grey level, not the index, is the value
            gif = Image.fromarray((v == 0).astype(np.uint8), "P")
            gif.putpalette([255, 255, 255, 0, 0, 0])
        gif.save(os.path.join(root, split, "1st_manual", f"{i}_manual1.gif"))
        roi = np.zeros((H, W), np.uint8)
        roi[1:-1, 1:-1] = 255  # the camera's field of view
        Image.fromarray(roi).save(os.path.join(root, split, "mask", f"{i}_{tag}_mask.gif"))
        vessels[f"{i}_{tag}.tif"] = (v, roi)
    return vessels


def test_drive_preset_maps_255_to_1_and_voids_outside_the_roi(tmp_path):
    manual = tmp_path / "DRIVE"
    train = write_drive(str(manual), "training")
    write_drive(str(manual), "test", ids=("01",))
    sizes = data.prepare("drive", data_dir=str(tmp_path / "d"), manual_dir=str(manual), progress=False)
    assert sizes == {"train": 2, "test": 1}
    src = data.open_source("drive", "train", str(tmp_path / "d"))
    for k in range(len(src)):
        ex = src[k]
        v, roi = train[ex["file_name"]]
        expected = np.where(roi > 0, (v > 0).astype(np.uint8), 255)
        np.testing.assert_array_equal(ex["segmentation_mask"], expected)
        np.testing.assert_array_equal(ex["image"], np.asarray(Image.open(manual / "training/images" / ex["file_name"])))
    assert data.class_names("drive") == ("background", "vessel")


def write_duts(root, split="TR", n=2):
    img_dir, mask_dir = os.path.join(root, f"DUTS-{split}", f"DUTS-{split}-Image"), os.path.join(root, f"DUTS-{split}", f"DUTS-{split}-Mask")
    os.makedirs(img_dir, exist_ok=True)
    os.makedirs(mask_dir, exist_ok=True)
    for k in range(n):
        Image.fromarray(image_array(k)).save(os.path.join(img_dir, f"sun_{k}.jpg"))
        m = np.zeros((H, W), np.uint8)
        m[2:8, 3:9], m[2, 3], m[7, 8] = 255, 100, 200  # anti-aliased edge pixels
        Image.fromarray(m).save(os.path.join(mask_dir, f"sun_{k}.png"))


def test_duts_preset_binarises_antialiased_masks(tmp_path):
    manual = tmp_path / "DUTS"
    write_duts(str(manual), "TR", 3)
    write_duts(str(manual), "TE", 1)
    assert data.prepare("duts", data_dir=str(tmp_path / "d"), manual_dir=str(manual), progress=False) == {"train": 3, "test": 1}
    m = data.open_source("duts", "test", str(tmp_path / "d"))[0]["segmentation_mask"]
    assert m[2, 3] == 0 and m[7, 8] == 1 and m[4, 4] == 1 and m.sum() == 6 * 6 - 1


def custom_manifest(tmp_path, value_map):
    root = tmp_path / "m"
    (root / "imgs").mkdir(parents=True)
    (root / "labels").mkdir()
    for k in range(2):
        Image.fromarray(image_array(k)).save(root / "imgs" / f"cat{k}.png")
        m = np.zeros((H, W), np.uint8)
        m[4:, :] = 255
        Image.fromarray(m).save(root / "labels" / f"cat{k}_label.png")
    manifest = {"name": "cats", "class_names": ["background", "cat"],
                "splits": {"train": {"images": "imgs/cat*.png", "masks": "labels/cat{id}_label.png"}}}
    if value_map:
        manifest["value_map"] = {"255": 1}
    path = tmp_path / "cats.json"
    path.write_text(json.dumps(manifest))
    return root, path


def test_binary_0_255_masks_without_a_value_map_get_the_hint(tmp_path):
    root, manifest = custom_manifest(tmp_path, value_map=False)
    with pytest.raises(SegjaxError, match=r"only 0 and 255.*value mapping \{255: 1\}") as e:
        data.prepare("folder", data_dir=str(tmp_path / "d"), manual_dir=str(root), manifest=str(manifest), progress=False)
    assert "cat0_label.png" in str(e.value) and "\n" not in str(e.value)


def test_custom_manifest_with_value_map(tmp_path):
    root, manifest = custom_manifest(tmp_path, value_map=True)
    sizes = data.prepare("folder", data_dir=str(tmp_path / "d"), manual_dir=str(root), manifest=str(manifest), progress=False)
    assert sizes == {"train": 2}
    ex = data.open_source("folder:cats", "train", str(tmp_path / "d"))[1]
    assert ex["file_name"] == "cat1.png"
    assert set(np.unique(ex["segmentation_mask"]).tolist()) == {0, 1}
    assert data.class_names("folder:cats", str(tmp_path / "d")) == ("background", "cat")


def test_folder_errors(tmp_path):
    root, manifest = custom_manifest(tmp_path, value_map=True)
    os.remove(root / "labels" / "cat1_label.png")
    with pytest.raises(SegjaxError, match="cat1_label.png: mask for image .*cat1.png is missing"):
        data.prepare("folder", data_dir=str(tmp_path / "d"), manual_dir=str(root), manifest=str(manifest), progress=False)
    with pytest.raises(SegjaxError, match="needs a manifest"):
        data.prepare("folder", data_dir=str(tmp_path / "d"), manual_dir=str(root), progress=False)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "x", "class_names": ["a", "b"], "splits": {"train": {"images": "imgs/*.png"}}}))
    with pytest.raises(SegjaxError, match="needs 'images' with exactly one"):
        data.prepare("folder", data_dir=str(tmp_path / "d"), manual_dir=str(root), manifest=str(bad), progress=False)
    with pytest.raises(SegjaxError, match="not prepared"):
        data.open_source("folder:nope", "train", str(tmp_path / "d"))
