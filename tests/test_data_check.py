"""segjax.data.check on tiny folders: a clean one, a broken copy, the layout without a manifest."""
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from segjax import data
from segjax.data.check import _Split, median_frequency_weights
from segjax.data.synthetic import voc_palette
from segjax.errors import SegjaxError

H, W = 8, 10


def image(k):
    return (np.arange(H * W * 3).reshape(H, W, 3) * (k + 1) % 256).astype(np.uint8)


def label(k, classes):
    m = np.zeros((H, W), np.uint8)
    for j, c in enumerate(classes):
        m[:, 2 * j + 2:2 * j + 4] = c
    m[0, 0] = 255
    return m


def write(root, split, stem, mask, img=None):
    os.makedirs(root / split / "images", exist_ok=True)
    os.makedirs(root / split / "masks", exist_ok=True)
    Image.fromarray(image(len(stem)) if img is None else img).save(root / split / "images" / f"{stem}.jpg")
    (mask if isinstance(mask, Image.Image) else Image.fromarray(mask)).save(root / split / "masks" / f"{stem}.png")


@pytest.fixture
def clean(tmp_path):
    root = tmp_path / "clean"
    write(root, "train", "a", label(0, [1, 2]))
    write(root, "train", "b", label(1, [3, 4]))
    write(root, "train", "c", label(2, [1]))
    write(root, "val", "d", label(3, [1, 2, 3, 4]))
    write(root, "val", "e", label(4, [2]))
    return root


def test_clean_folder(clean):
    report = data.check(str(clean), num_classes=5)
    print(report.table)
    assert report.ok and report.problems == []
    t = report.table
    assert "train       3       3   8/8/8              10/10/10" in t
    assert "val         2       2   8/8/8              10/10/10" in t
    assert "in [0, 5): 0-4; void 255: 1.25% of pixels" in t
    assert "absent from val | none" in t
    assert "'--config.class_weights=(" in t
    assert report.num_classes == 5 and len(report.class_weights) == 5
    # median-frequency balancing: classes 1-4 each cover 16 of the 79 labelled pixels of their masks (the
    # median), background 157 of 237: 0.2025 / 0.6624
    assert report.class_weights == (0.3057, 1.0, 1.0, 1.0, 1.0)
    assert "'--config.class_weights=(0.3057, 1, 1, 1, 1)'" in t
    assert "(inferred" not in t and "5 (given)" in t
    inferred = data.check(str(clean))  # no classes.txt: as prepare infers them, largest label + 1
    assert inferred.ok and inferred.num_classes == 5 and "inferred" in inferred.table


def broken_copy(clean, tmp_path):
    root = tmp_path / "broken"
    shutil.copytree(clean, root)
    write(root, "train", "nine", label(5, [9]))                           # label 9 with 5 classes
    colours = np.asarray(voc_palette(), np.uint8).reshape(-1, 3)
    write(root, "train", "rgb", Image.fromarray(colours[label(6, [1, 2])], "RGB"))  # VOC colours as RGB
    write(root, "train", "binary", np.where(label(7, [1]) > 0, 255, 0).astype(np.uint8))  # 0/255
    write(root, "train", "small", label(8, [1])[:6])                      # mask 10x6, image 10x8
    write(root, "train", "cmyk", label(9, [1]))
    Image.new("CMYK", (W, H)).save(root / "train" / "masks" / "cmyk.tiff")
    os.remove(root / "train" / "masks" / "cmyk.png")
    (root / "train" / "masks" / "cmyk.tiff").rename(root / "train" / "masks" / "cmyk.png")  # 4 channels
    (root / "train" / "images" / "junk.jpg").write_bytes(b"not a jpeg")   # unreadable image
    Image.fromarray(label(0, [1])).save(root / "train" / "masks" / "junk.png")
    write(root, "val", "e", label(4, [1]))  # val now lacks class 4 (and 2 only in d)
    write(root, "val", "d", label(3, [1, 2, 3]))
    return root


def test_broken_folder_names_every_culprit(clean, tmp_path):
    root = broken_copy(clean, tmp_path)
    report = data.check(str(root), num_classes=5)
    print(report.table)
    print("\n".join(report.problems))
    assert not report.ok
    by_file = {os.path.basename(p.split(":")[0]): p for p in report.problems}
    assert set(by_file) == {"nine.png", "rgb.png", "small.png", "cmyk.png", "junk.jpg"}, report.problems
    assert "labels [9] outside [0, 5)" in by_file["nine.png"]
    assert "RGB colour mask" in by_file["rgb.png"]
    assert "mask is 10x6 but image" in by_file["small.png"]
    assert "4 channels" in by_file["cmyk.png"]
    assert "corrupt or truncated image" in by_file["junk.jpg"]
    t = report.table
    assert "outside [0, 5) and not 255: 9 (in 1 mask(s))" in t
    assert "RGB colour masks 1, more channels than one 1, 0/255 binary masks 1" in t
    assert "size mismatches 1, unreadable 1" in t
    assert "absent from val | 4 class_4" in t and "NaN IoU" in t and "nanmean" in t
    assert all("\n" not in p for p in report.problems)


def test_binary_masks_with_two_classes_are_a_problem(tmp_path):
    root = tmp_path / "sal"
    for split, stem in (("train", "a"), ("val", "b")):
        write(root, split, stem, np.where(label(0, [1]) > 0, 255, 0).astype(np.uint8))
    report = data.check(str(root), num_classes=2)
    assert [os.path.basename(p.split(":")[0]) for p in report.problems] == ["a.png", "b.png"]
    assert "value mapping {255: 1}" in report.problems[0]
    inferred = data.check(str(root))  # inferred: 0 and 255 only -> two classes, and the same problem
    assert inferred.num_classes == 2 and len(inferred.problems) == 2


def test_empty_or_unknown_folder_raises_one_line(tmp_path):
    (tmp_path / "empty" / "train" / "images").mkdir(parents=True)
    with pytest.raises(SegjaxError, match="empty folder") as e:
        data.check(str(tmp_path / "empty"))
    assert "\n" not in str(e.value)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("x")
    with pytest.raises(SegjaxError, match="needs a manifest"):
        data.check(str(tmp_path / "other"))
    with pytest.raises(SegjaxError, match="not prepared.*segjax data prepare drive"):
        data.check("drive", data_dir=str(tmp_path / "nodata"))


def test_layout_prepares_without_a_manifest_and_a_manifest_wins(clean, tmp_path):
    (clean / "classes.txt").write_text("bg\none\ntwo\nthree\nfour\n")
    sizes = data.prepare("folder", data_dir=str(tmp_path / "d"), manual_dir=str(clean), progress=False)
    assert sizes == {"train": 3, "val": 2}
    assert data.class_names("folder:clean", str(tmp_path / "d")) == ("bg", "one", "two", "three", "four")
    val = data.open_source("folder:clean", "val", str(tmp_path / "d"))
    ex = next(val[i] for i in range(len(val)) if val[i]["file_name"] == "d.jpg")
    np.testing.assert_array_equal(ex["segmentation_mask"], label(3, [1, 2, 3, 4]))
    # folder:<name> opens the prepared one without a manual dir, as the training loop calls it
    assert data.prepare("folder:clean", str(tmp_path / "d"), None, progress=False) == sizes
    report = data.check("folder:clean", data_dir=str(tmp_path / "d"))
    assert report.ok and "3       3   8/8/8" in report.table and "0   bg" in report.table
    manifest = {"name": "only_train", "class_names": ["bg", "one", "two", "three", "four"],
                "splits": {"train": {"images": "train/images/*.jpg", "masks": "train/masks/{stem}.png"}}}
    (clean / "manifest.json").write_text(json.dumps(manifest))
    assert data.prepare("folder", data_dir=str(tmp_path / "d"), manual_dir=str(clean), progress=False) == {"train": 3}
    assert "from manifest.json" in data.check(str(clean)).table


def test_median_frequency_weights():
    s = _Split()
    s.add(np.array([[0, 0, 0, 1]], np.uint8))
    s.add(np.array([[0, 0, 2, 2]], np.uint8))
    # freq: 0 -> 5/8, 1 -> 1/4, 2 -> 2/4; median 1/2
    assert median_frequency_weights(s, 4) == (0.8, 2.0, 1.0, 1.0)


def test_cli_data_check_exit_status(clean, tmp_path, capsys):
    from segjax import cli

    assert cli.main(["data", "check", str(clean), "--num-classes", "5"]) == 0
    assert "median-frequency balancing" in capsys.readouterr().out
    assert cli.main(["data", "check", str(broken_copy(clean, tmp_path)), "--num-classes", "5"]) == 1
    err = capsys.readouterr().err
    assert "5 problem(s)" in err and "nine.png" in err and "rgb.png" in err
    (tmp_path / "empty" / "train" / "images").mkdir(parents=True)
    assert cli.main(["data", "check", str(tmp_path / "empty")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "empty folder" in lines[0]
