"""voc2012_segmentation on tiny VOC / SBD fixtures: folders and archives, split logic, bad inputs."""
import os

import numpy as np
import pytest
from PIL import Image

from segjax import data
from segjax.errors import SegjaxError
from test_data_fixtures import (H, W, add_member, break_voc, encode, image_array, make_archive, sbd_mask,
                                write_sbd, write_voc)

VOC_TRAIN, VOC_VAL = ["2007_000001", "2007_000002", "2007_000003"], ["2007_000010", "2007_000011"]
SBD_TRAIN, SBD_VAL = ["2007_000002", "2008_000100", "2007_000010"], ["2008_000200", "2007_000011"]


def by_name(source) -> dict:
    return {source[k]["file_name"]: source[k] for k in range(len(source))}


def prepare(name, tmp_path, manual):
    return data.prepare(name, data_dir=str(tmp_path / "data"), manual_dir=str(manual), progress=False)


@pytest.fixture()
def manual(tmp_path):
    root = tmp_path / "manual"
    write_voc(str(root), VOC_TRAIN, VOC_VAL)
    return root


def test_voc2012_from_folders_is_byte_exact(tmp_path, manual):
    assert prepare("voc2012", tmp_path, manual) == {"train": 3, "val": 2}
    val = by_name(data.open_source("voc2012", "val", str(tmp_path / "data")))
    assert sorted(val) == ["2007_000010.jpg", "2007_000011.jpg"]
    voc = manual / "VOCdevkit" / "VOC2012"
    for name, ex in val.items():
        stem = name[:-4]
        np.testing.assert_array_equal(ex["image"], np.asarray(Image.open(voc / "JPEGImages" / name)))
        np.testing.assert_array_equal(ex["segmentation_mask"], np.asarray(Image.open(voc / "SegmentationClass" / f"{stem}.png")))
        assert ex["image"].dtype == np.uint8 and ex["segmentation_mask"].shape == (H, W)
    assert data.class_names("voc2012")[15] == "person" and len(data.class_names("voc2012")) == 21


def test_voc2012_aug_split_logic_and_sbd_masks(tmp_path, manual):
    write_sbd(str(manual), SBD_TRAIN, SBD_VAL)
    for i in set(SBD_TRAIN + SBD_VAL) - set(VOC_TRAIN + VOC_VAL):  # SBD-only images, as in VOC2012 JPEGImages
        Image.fromarray(image_array(7)).save(manual / "VOCdevkit/VOC2012/JPEGImages" / f"{i}.jpg")
    sizes = prepare("voc2012_aug", tmp_path, manual)
    expected = sorted((set(SBD_TRAIN) | set(SBD_VAL) | set(VOC_TRAIN)) - set(VOC_VAL))
    assert sizes == {"train": len(expected), "val": len(VOC_VAL)}
    train = by_name(data.open_source("voc2012_aug", "train", str(tmp_path / "data")))
    assert sorted(n[:-4] for n in train) == expected
    np.testing.assert_array_equal(train["2008_000100.jpg"]["segmentation_mask"], sbd_mask("2008_000100"))
    np.testing.assert_array_equal(train["2007_000002.jpg"]["segmentation_mask"], sbd_mask("2007_000002"))  # SBD wins
    voc_only = np.asarray(Image.open(manual / "VOCdevkit/VOC2012/SegmentationClass/2007_000001.png"))
    np.testing.assert_array_equal(train["2007_000001.jpg"]["segmentation_mask"], voc_only)


def test_archives_read_in_place_equal_folders(tmp_path, manual):
    write_sbd(str(manual), SBD_TRAIN, SBD_VAL)
    for i in set(SBD_TRAIN + SBD_VAL) - set(VOC_TRAIN + VOC_VAL):
        Image.fromarray(image_array(7)).save(manual / "VOCdevkit/VOC2012/JPEGImages" / f"{i}.jpg")
    archives = tmp_path / "archives"
    archives.mkdir()
    make_archive(str(manual), "VOCdevkit", str(archives / "VOCtrainval_11-May-2012.tar"))
    make_archive(str(manual), "benchmark_RELEASE", str(archives / "benchmark.tgz"), mode="w:gz")
    from_folders = prepare("voc2012_aug", tmp_path / "a", manual)
    from_archives = prepare("voc2012_aug", tmp_path / "b", archives)
    assert from_folders == from_archives
    assert sorted(os.listdir(archives)) == ["VOCtrainval_11-May-2012.tar", "benchmark.tgz"]  # nothing extracted
    a = by_name(data.open_source("voc2012_aug", "train", str(tmp_path / "a" / "data")))
    b = by_name(data.open_source("voc2012_aug", "train", str(tmp_path / "b" / "data")))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k]["image"], b[k]["image"])
        np.testing.assert_array_equal(a[k]["segmentation_mask"], b[k]["segmentation_mask"])


def test_malicious_archive_member_is_refused_and_nothing_escapes(tmp_path, manual):
    archives = tmp_path / "archives"
    archives.mkdir()
    tar = str(archives / "VOCtrainval_11-May-2012.tar")
    make_archive(str(manual), "VOCdevkit", tar)
    add_member(tar, "VOCdevkit/VOC2012/../../../escaped.txt", b"owned")
    add_member(tar, "/tmp/segjax_escaped_abs.txt", b"owned")
    before = set(os.listdir(tmp_path))
    with pytest.raises(SegjaxError, match="outside the archive"):
        prepare("voc2012", tmp_path / "x", archives)
    assert set(os.listdir(tmp_path)) - before <= {"x"}
    assert not any("escaped" in f for _, _, fs in os.walk(tmp_path) for f in fs)
    assert not os.path.exists("/tmp/segjax_escaped_abs.txt")
    assert not os.path.exists(tmp_path.parent / "escaped.txt")


def test_manual_dir_with_neither_folders_nor_archives(tmp_path):
    empty = tmp_path / "m"
    empty.mkdir()
    (empty / "readme.txt").write_text("not VOC")
    with pytest.raises(SegjaxError, match="neither the folders nor the archives") as e:
        prepare("voc2012", tmp_path, empty)
    assert "\n" not in str(e.value)
    with pytest.raises(SegjaxError, match="needs a manual dir"):
        data.prepare("voc2012", data_dir=str(tmp_path / "d2"), manual_dir=None, progress=False)


@pytest.mark.parametrize("what, message, culprit", [
    ("missing", "listed in .* but missing", "2007_000002.jpg"),
    ("empty", "empty split", "val.txt"),
    ("size", "mask is 16x14 but image .* is 16x12", "2007_000001.png"),
    ("labels", r"labels \[40\] outside \[0, 21\)", "2007_000001.png"),
    ("rgb", "RGB colour mask", "2007_000001.png"),
    ("truncated", "corrupt or truncated", "2007_000003.jpg"),
    ("corrupt", "corrupt or truncated", "2007_000003.jpg"),
])
def test_bad_inputs_give_one_line_errors_naming_the_file(tmp_path, manual, what, message, culprit):
    break_voc(manual, what)
    with pytest.raises(SegjaxError, match=message) as e:
        prepare("voc2012", tmp_path, manual)
    assert culprit in str(e.value) and "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "data" / "voc2012_segmentation" / "voc2012" / "1.0.0" / "dataset_info.json")


def test_odd_image_modes_become_rgb_uint8(tmp_path, manual):
    voc = manual / "VOCdevkit" / "VOC2012" / "JPEGImages"
    rgb = image_array(0)
    grey = Image.fromarray(rgb[..., 0])
    modes = {
        "2007_000001": encode(grey, "JPEG"),  # grayscale JPEG
        "2007_000002": encode(Image.fromarray(np.dstack([rgb, np.full((H, W), 255, np.uint8)]), "RGBA"), "PNG"),
        "2007_000003": encode(Image.fromarray(rgb).convert("CMYK"), "JPEG"),
        "2007_000010": encode(Image.fromarray(rgb[..., 0].astype(np.uint16) * 257), "PNG"),
    }
    for i, raw in modes.items():  # VOC names them .jpg whatever they hold; the decoder goes by content
        (voc / f"{i}.jpg").write_bytes(raw)
    prepare("voc2012", tmp_path, manual)
    src = {**by_name(data.open_source("voc2012", "train", str(tmp_path / "data"))),
           **by_name(data.open_source("voc2012", "val", str(tmp_path / "data")))}
    for i in modes:
        img = src[f"{i}.jpg"]["image"]
        assert img.shape == (H, W, 3) and img.dtype == np.uint8
    np.testing.assert_array_equal(src["2007_000002.jpg"]["image"], rgb)  # opaque RGBA -> its RGB
    for c in range(3):  # 16-bit grey: x * 257 back to x on every channel
        np.testing.assert_array_equal(src["2007_000010.jpg"]["image"][..., c], rgb[..., 0])
    g = src["2007_000001.jpg"]["image"]
    assert (g[..., 0] == g[..., 1]).all() and (g[..., 1] == g[..., 2]).all()
