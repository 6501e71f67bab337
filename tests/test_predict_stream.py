"""`segjax predict --tile` through the CLI: the streamed outputs equal whole-image prediction's, and bad input
(a tile larger than the image, a damaged TIFF, a disk that fills up mid-image) is a one-line error that
leaves no partial files. The model is the tiny test model with random weights (receptive-field radius 3)."""
import errno
import os

import numpy as np
import pytest
import tifffile
from PIL import Image

from segjax import checkpoint, cli, probmaps
from segjax.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from tests import tiny_model
from tests.test_imagefiles import damaged_tiff

TILE = ["--tile", "256", "256", "--overlap", "0.25"]


def _checkpoint(root, task="segmentation", num_classes=3):
    from segjax import analysis, models

    model = models.create(tiny_model.NAME, num_classes, features=4)
    variables = analysis.init_variables(model, (32, 32))
    meta = {"model": tiny_model.NAME, "num_classes": num_classes, "model_kwargs": {"features": 4},
            "task": task, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    checkpoint.save_variables(str(root), variables, meta)
    return str(root)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt")


def _image(path, h, w, seed=0):
    rng = np.random.default_rng(seed)
    smooth = np.kron(rng.integers(0, 256, (h // 20 + 1, w // 20 + 1, 3)), np.ones((20, 20, 1)))[:h, :w]
    image = np.clip(smooth + rng.integers(-40, 41, (h, w, 3)), 0, 255).astype(np.uint8)
    if str(path).endswith(".tif"):
        tifffile.imwrite(path, image)
    else:
        Image.fromarray(image).save(path)
    return image


def _labels(path):
    with Image.open(path) as img:
        return np.asarray(img)


@pytest.mark.e2e  # `segjax predict` on a 2000x3000 image, tiled and whole
def test_tiled_outputs_equal_whole_image_outputs_in_the_interior(ckpt, tmp_path, capsys):
    image = tmp_path / "scene.png"
    _image(image, 2000, 3000)
    whole, tiled = tmp_path / "whole", tmp_path / "tiled"
    assert cli.main(["predict", "--checkpoint", ckpt, str(image), "--out", str(whole), "--save-probs"]) == 0
    assert cli.main(["predict", "--checkpoint", ckpt, str(image), "--out", str(tiled), "--save-probs", *TILE]) == 0
    names = ["scene.png", "scene_overlay.jpg", "scene_probs.npy", "scene_probs.json", "scene_entropy.png"]
    assert sorted(os.listdir(tiled)) == sorted(os.listdir(whole)) == sorted(names)
    p_whole, names_whole = probmaps.load_probs(str(whole / "scene_probs.npy"))
    p_tiled, names_tiled = probmaps.load_probs(str(tiled / "scene_probs.npy"), mmap=True)
    assert p_tiled.dtype == np.float16 and p_tiled.shape == (2000, 3000, 3)
    assert names_tiled == names_whole == ["0", "1", "2"]
    # Exact wherever every tile that weighs a pixel sees its whole receptive field (radius 3 < margin 16):
    # all but the last few rows / columns, where the grid's last tiles reach past the border (reflected).
    inner = (slice(0, 2000 - 8), slice(0, 3000 - 8))
    a, b = p_tiled[inner].astype(np.float32), p_whole[inner].astype(np.float32)
    np.testing.assert_allclose(a, b, atol=1e-3, rtol=0)  # float16 of values equal to ~1e-6
    l_whole, l_tiled = _labels(whole / "scene.png")[inner], _labels(tiled / "scene.png")[inner]
    top2 = np.sort(b, axis=-1)[..., -2:]
    clear = top2[..., 1] - top2[..., 0] > 2e-3  # not a float16 tie between the two best classes
    assert clear.mean() > 0.9 and len(np.unique(l_whole)) == 3
    np.testing.assert_array_equal(l_tiled[clear], l_whole[clear])
    e_whole, e_tiled = _labels(whole / "scene_entropy.png")[inner], _labels(tiled / "scene_entropy.png")[inner]
    assert np.abs(e_whole.astype(int) - e_tiled).max() <= 1
    o_whole, o_tiled = _labels(whole / "scene_overlay.jpg"), _labels(tiled / "scene_overlay.jpg")
    assert o_tiled.shape == (2000, 3000, 3) and np.abs(o_whole.astype(int) - o_tiled)[:1984, :2984].mean() < 0.5


def test_saliency_model_streams_too(tmp_path):
    ckpt = _checkpoint(tmp_path / "sal", task="saliency", num_classes=1)
    image = tmp_path / "cat.tif"
    _image(image, 600, 700, seed=1)
    whole, tiled = tmp_path / "whole", tmp_path / "tiled"
    assert cli.main(["predict", "--checkpoint", ckpt, str(image), "--out", str(whole), "--save-probs"]) == 0
    assert cli.main(["predict", "--checkpoint", ckpt, str(image), "--out", str(tiled), "--save-probs", *TILE]) == 0
    assert sorted(os.listdir(tiled)) == ["cat_cutout.png", "cat_saliency.png", "cat_saliency16.png"]
    inner = (slice(0, 592), slice(0, 692))
    for name, tol in (("cat_saliency16.png", 1), ("cat_saliency.png", 1)):
        w, t = _labels(whole / name).astype(np.int64), _labels(tiled / name).astype(np.int64)
        assert w.shape == (600, 700) and np.abs(w - t)[inner].max() <= tol
    cutout = _labels(tiled / "cat_cutout.png")
    assert cutout.shape == (600, 700, 4)
    np.testing.assert_array_equal(cutout[..., 3], _labels(tiled / "cat_saliency.png"))


def test_tile_larger_than_an_image_writes_nothing(ckpt, tmp_path, capsys):
    _image(tmp_path / "big.png", 300, 400)
    _image(tmp_path / "small.png", 200, 100)
    out = tmp_path / "out"
    assert cli.main(["predict", "--checkpoint", ckpt, str(tmp_path / "big.png"), str(tmp_path / "small.png"),
                     "--out", str(out), *TILE]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tile 256x256 is larger than the image 200x100" in err[0] and not out.exists()


def test_damaged_tiffs_are_one_line_errors_naming_the_file(ckpt, tmp_path, capsys):
    good = tmp_path / "good.png"
    _image(good, 300, 300)
    image = _image(tmp_path / "x.tif", 600, 500)
    cut = tmp_path / "cut.tif"
    cut.write_bytes((tmp_path / "x.tif").read_bytes()[:400_000])
    out = tmp_path / "out"
    assert cli.main(["predict", "--checkpoint", ckpt, str(good), str(cut), "--out", str(out), *TILE]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {cut}: the TIFF is truncated") and not out.exists()
    # Damage inside compressed data only shows when that strip is read, mid-image: the earlier image's
    # files stay, the damaged image's partial files go.
    damaged = damaged_tiff(tmp_path / "damaged.tif", image, rows_per_strip=32, strip=10)
    assert cli.main(["predict", "--checkpoint", ckpt, str(good), str(damaged), "--out", str(out),
                     "--save-probs", *TILE]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {damaged}: TIFF strip 10 cannot be decoded")
    assert sorted(os.listdir(out)) == ["good.png", "good_entropy.png", "good_overlay.jpg", "good_probs.json",
                                       "good_probs.npy"]


def test_full_disk_mid_image_removes_that_images_files_and_keeps_earlier_ones(ckpt, tmp_path, capsys, monkeypatch):
    for name in ("a", "b"):
        _image(tmp_path / f"{name}.png", 700, 600)
    out = tmp_path / "out"
    write, calls = probmaps.ProbsWriter.write, []

    def disk_fills_up(self, top, probs):
        calls.append(self.path)
        if os.path.basename(self.path).startswith("b") and top > 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.path)
        write(self, top, probs)
    monkeypatch.setattr(probmaps.ProbsWriter, "write", disk_fills_up)
    (out).mkdir()
    (out / "b.png").write_bytes(b"an older result")  # an earlier run's file of the same name stays as it was
    assert cli.main(["predict", "--checkpoint", ckpt, str(tmp_path / "a.png"), str(tmp_path / "b.png"),
                     "--out", str(out), "--save-probs", *TILE]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0] == f"error: {out}: cannot write there (no space left on the device); " \
                                       "free some space or pick another --out"
    assert sum(os.path.basename(p).startswith("b") for p in calls) == 2  # it failed on b's second band
    assert sorted(os.listdir(out)) == ["a.png", "a_entropy.png", "a_overlay.jpg", "a_probs.json", "a_probs.npy",
                                       "b.png"]
    assert (out / "b.png").read_bytes() == b"an older result"
    assert _labels(out / "a.png").shape == (700, 600)


def test_images_above_pils_limit_are_read_for_tiled_predict_only(ckpt, tmp_path, capsys, monkeypatch):
    from segjax import imagefiles

    _image(tmp_path / "wide.png", 300, 400)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50_000)  # 120,000 pixels: more than twice the limit
    monkeypatch.setattr(imagefiles, "PIL_PIXEL_LIMIT", 50_000)
    out = tmp_path / "out"
    assert cli.main(["predict", "--checkpoint", ckpt, str(tmp_path / "wide.png"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "wide.png: larger than PIL reads whole" in err[0] and not out.exists()
    assert cli.main(["predict", "--checkpoint", ckpt, str(tmp_path / "wide.png"), "--out", str(out), *TILE]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("info: ") and "above PIL's decompression-bomb limit" in err[0]
    assert Image.MAX_IMAGE_PIXELS == 50_000  # restored after the prediction
    with imagefiles.pil_limit_lifted():
        assert _labels(out / "wide.png").shape == (300, 400)
