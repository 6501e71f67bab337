"""Probability maps and uncertainty PNGs (segjax.probmaps)."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from segjax import probmaps
from segjax.errors import SegjaxError


def _probs(h=5, w=7, c=4, seed=0):
    z = np.random.default_rng(seed).normal(size=(h, w, c))
    e = np.exp(z - z.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


def test_save_probs_npy_without_names(tmp_path):
    p = _probs()
    path = probmaps.save_probs(str(tmp_path / "a"), p)
    assert path.endswith("a.npy") and sorted(os.listdir(tmp_path)) == ["a.npy"]
    back = np.load(path)
    assert back.dtype == np.float16 and back.shape == (5, 7, 4)
    np.testing.assert_array_equal(back, p.astype(np.float16))
    loaded, names = probmaps.load_probs(path)
    assert names is None and loaded.dtype == np.float16


def test_save_probs_npy_with_names_beside_it(tmp_path):
    p = _probs(c=3)
    path = probmaps.save_probs(str(tmp_path / "b.npz"), p, class_names=["bg", "cat", "dog"])
    assert path.endswith("b.npy") and sorted(os.listdir(tmp_path)) == ["b.json", "b.npy"]
    assert json.loads((tmp_path / "b.json").read_text()) == {"class_names": ["bg", "cat", "dog"]}
    for mmap in (False, True):
        loaded, names = probmaps.load_probs(path, mmap=mmap)
        assert isinstance(loaded, np.memmap) == mmap
        np.testing.assert_array_equal(loaded, p.astype(np.float16))
        assert names == ["bg", "cat", "dog"]
    with pytest.raises(SegjaxError, match="2 class names for 3"):
        probmaps.save_probs(str(tmp_path / "c"), p, class_names=["bg", "cat"])
    assert not (tmp_path / "c.npy").exists()


def test_probs_writer_fills_an_npy_band_by_band_out_of_a_memmap(tmp_path):
    p = _probs(h=23, w=9, c=3, seed=2)
    writer = probmaps.ProbsWriter(str(tmp_path / "w.npy"), p.shape)
    assert os.path.getsize(tmp_path / "w.npy") == writer.offset + p.size * 2  # the space is reserved
    for top, rows in ((0, 5), (5, 12), (17, 6)):
        writer.write(top, p[top:top + rows])
    np.testing.assert_array_equal(np.load(tmp_path / "w.npy"), p.astype(np.float16))
    with pytest.raises(ValueError, match="does not fit"):
        writer.write(20, p[:5])


def test_entropy_png_uniform_255_one_hot_0(tmp_path):
    c = 5
    p = np.full((4, 6, c), 1.0 / c, np.float32)
    p[:2] = 0.0
    p[:2, :, 3] = 1.0  # one-hot rows
    path = tmp_path / "e.png"
    probmaps.entropy_png(str(path), p)
    with Image.open(path) as img:
        assert img.mode == "L"
        e = np.asarray(img)
    assert e.dtype == np.uint8 and e.shape == (4, 6)
    assert (e[:2] == 0).all() and (e[2:] == 255).all()
    mid = probmaps.entropy(_probs())
    assert (mid > 0).all() and (mid < 1).all()


def test_saliency_png16_round_trip(tmp_path):
    prob = np.random.default_rng(1).random((9, 11)).astype(np.float32)
    prob[0, 0], prob[0, 1] = 0.0, 1.0
    path = tmp_path / "s.png"
    probmaps.saliency_png16(str(path), prob[..., None])
    with Image.open(path) as img:
        assert img.mode in ("I;16", "I")
        back = np.asarray(img).astype(np.int64)
    np.testing.assert_array_equal(back, np.round(prob.astype(np.float64) * 65535).astype(np.int64))
    assert back[0, 0] == 0 and back[0, 1] == 65535


def test_saliency_png16_takes_a_uint16_map_as_its_values(tmp_path):
    q = np.random.default_rng(3).integers(0, 65536, (6, 5), dtype=np.uint16)
    probmaps.saliency_png16(str(tmp_path / "q.png"), q)
    with Image.open(tmp_path / "q.png") as img:
        np.testing.assert_array_equal(np.asarray(img).astype(np.int64), q.astype(np.int64))
