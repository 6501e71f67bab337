"""Tiny on-disk fixtures in VOC / SBD / DRIVE / DUTS layout, shared by the tests/test_data_*.py files,
plus checks that the fixtures themselves are what the builders expect."""
import io
import os
import pathlib
import tarfile
import zlib

import numpy as np
import scipy.io
import scipy.sparse
from PIL import Image

from segjax.data.synthetic import voc_palette

H, W = 12, 16


def image_array(seed: int, h: int = H, w: int = W) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def mask_array(seed: int, h: int = H, w: int = W, num_classes: int = 21, void_border: bool = True) -> np.ndarray:
    m = np.random.default_rng(1000 + seed).integers(0, num_classes, size=(h, w)).astype(np.uint8)
    if void_border:
        m[0, :] = 255
    return m


def save_palette_png(path: str, mask: np.ndarray) -> None:
    img = Image.fromarray(mask, "P")
    img.putpalette(voc_palette())
    img.save(path)


def write_voc(root: str, train_ids, val_ids, h: int = H, w: int = W) -> str:
    """VOCdevkit/VOC2012 under root; returns the VOC2012 folder."""
    voc = os.path.join(root, "VOCdevkit", "VOC2012")
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        os.makedirs(os.path.join(voc, d), exist_ok=True)
    for k, i in enumerate(sorted(set(train_ids) | set(val_ids))):
        Image.fromarray(image_array(k, h, w)).save(os.path.join(voc, "JPEGImages", f"{i}.jpg"), quality=90)
        save_palette_png(os.path.join(voc, "SegmentationClass", f"{i}.png"), mask_array(k, h, w))
    for split, ids in (("train", train_ids), ("val", val_ids)):
        with open(os.path.join(voc, "ImageSets", "Segmentation", f"{split}.txt"), "w") as f:
            f.write("".join(f"{i}\n" for i in ids))
    return voc


def sbd_mask(i: str, h: int = H, w: int = W) -> np.ndarray:
    """SBD class masks: 0-20, no void border."""
    return np.random.default_rng(zlib.crc32(i.encode())).integers(0, 21, size=(h, w)).astype(np.uint8)


def write_sbd(root: str, train_ids, val_ids, h: int = H, w: int = W) -> str:
    """benchmark_RELEASE/dataset with cls/<id>.mat in SBD's struct layout (GTcls.Segmentation, ...)."""
    sbd = os.path.join(root, "benchmark_RELEASE", "dataset")
    os.makedirs(os.path.join(sbd, "cls"), exist_ok=True)
    os.makedirs(os.path.join(sbd, "img"), exist_ok=True)
    for i in sorted(set(train_ids) | set(val_ids)):
        seg = sbd_mask(i, h, w)
        boundaries = np.empty((20, 1), dtype=object)
        for c in range(20):  # SBD stores one sparse boundary map per class
            boundaries[c, 0] = scipy.sparse.csc_matrix((h, w), dtype=np.float64)
        present = np.unique(seg[seg > 0]).astype(np.uint8).reshape(-1, 1)
        scipy.io.savemat(os.path.join(sbd, "cls", f"{i}.mat"),
                         {"GTcls": {"Segmentation": seg, "Boundaries": boundaries, "CategoriesPresent": present}},
                         do_compression=True)
    for split, ids in (("train", train_ids), ("val", val_ids)):
        with open(os.path.join(sbd, f"{split}.txt"), "w") as f:
            f.write("".join(f"{i}\n" for i in ids))
    return sbd


def make_archive(src_root: str, folder: str, archive_path: str, mode: str = "w") -> str:
    """Packs src_root/folder into archive_path with member names starting at `folder` (as the
    official archives do)."""
    with tarfile.open(archive_path, mode) as tar:
        tar.add(os.path.join(src_root, folder), arcname=folder)
    return archive_path


def add_member(archive_path: str, name: str, data: bytes, mode: str = "a") -> None:
    with tarfile.open(archive_path, mode) as tar:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    out = io.BytesIO()
    img.save(out, format=fmt, **kw)
    return out.getvalue()


def break_voc(manual, what: str) -> None:
    """Damages a write_voc() tree the way users' data goes wrong (one `what` at a time)."""
    voc = pathlib.Path(manual) / "VOCdevkit" / "VOC2012"
    if what == "missing":
        os.remove(voc / "JPEGImages" / "2007_000002.jpg")
    elif what == "empty":
        (voc / "ImageSets/Segmentation/val.txt").write_text("\n")
    elif what == "size":
        Image.fromarray(mask_array(0, H + 2, W)).save(voc / "SegmentationClass/2007_000001.png")
    elif what == "labels":
        m = mask_array(0)
        m[3, 3] = 40
        Image.fromarray(m, "L").save(voc / "SegmentationClass/2007_000001.png")
    elif what == "rgb":
        Image.fromarray(image_array(3)).save(voc / "SegmentationClass/2007_000001.png")
    elif what == "truncated":
        raw = (voc / "JPEGImages/2007_000003.jpg").read_bytes()
        (voc / "JPEGImages/2007_000003.jpg").write_bytes(raw[: len(raw) // 2])
    elif what == "corrupt":
        (voc / "JPEGImages/2007_000003.jpg").write_bytes(b"this is not an image")


def test_sbd_fixture_has_the_sbd_struct_layout(tmp_path):
    sbd = write_sbd(str(tmp_path), ["a"], ["b"])
    mat = scipy.io.loadmat(os.path.join(sbd, "cls", "a.mat"), squeeze_me=True, struct_as_record=False)
    gt = mat["GTcls"]
    assert gt.Segmentation.shape == (H, W) and gt.Segmentation.dtype == np.uint8
    assert gt.Boundaries.shape == (20,)
    np.testing.assert_array_equal(gt.Segmentation, sbd_mask("a"))


def test_voc_fixture_masks_are_palette_pngs(tmp_path):
    voc = write_voc(str(tmp_path), ["a"], ["b"])
    img = Image.open(os.path.join(voc, "SegmentationClass", "a.png"))
    assert img.mode == "P"
    assert np.asarray(img).max() == 255  # the void border survives the palette round trip
