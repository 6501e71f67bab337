"""Probability maps and uncertainty images written next to predicted masks.

- `save_probs`: the (H, W, C) class probabilities as float16. Rule: without class names it writes
  `<stem>.npy` (the array alone, `np.load` gives it back); with class names it writes `<stem>.npz`
  holding `probs` (H, W, C) float16 and `class_names` (C,) unicode strings. Never both.
- `entropy_png`: per-pixel entropy normalised by log(C), as an 8-bit grey PNG (0 = certain, 255 = uniform).
- `saliency_png16`: one probability map as a 16-bit grey PNG, value round(p * 65535).
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from PIL import Image

from segjax.errors import SegjaxError


def _probs_hwc(probs, what: str = "probs") -> np.ndarray:
    probs = np.asarray(probs)
    if probs.ndim != 3:
        raise SegjaxError(f"{what} of shape {probs.shape}: expected (height, width, classes)")
    return probs


def save_probs(path_stem: str, probs, class_names: Sequence[str] | None = None) -> str:
    """Write `probs` (H, W, C) as float16: `<path_stem>.npy`, or `<path_stem>.npz` with arrays `probs` and
    `class_names` when names are given (one per channel). Returns the path written.

    A trailing .npy / .npz in `path_stem` is dropped first, so the rule above alone decides the suffix.
    """
    probs = _probs_hwc(probs)
    stem, ext = os.path.splitext(path_stem)
    if ext.lower() in (".npy", ".npz"):
        path_stem = stem
    data = probs.astype(np.float16)
    if class_names is None:
        path = path_stem + ".npy"
        np.save(path, data)
        return path
    names = [str(n) for n in class_names]
    if len(names) != probs.shape[2]:
        raise SegjaxError(f"{len(names)} class names for {probs.shape[2]} probability channels; "
                          "pass one name per channel")
    path = path_stem + ".npz"
    np.savez(path, probs=data, class_names=np.asarray(names, dtype=np.str_))
    return path


def load_probs(path: str) -> tuple[np.ndarray, list[str] | None]:
    """(probs float16 (H, W, C), class names or None) from a file `save_probs` wrote."""
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as z:
            return z["probs"], [str(n) for n in z["class_names"]]
    return np.load(path, allow_pickle=False), None


def entropy(probs) -> np.ndarray:
    """(H, W) float32 entropy of the class distribution normalised by log(C): in [0, 1]."""
    probs = _probs_hwc(probs).astype(np.float32)
    c = probs.shape[2]
    if c < 2:
        raise SegjaxError(f"entropy needs at least 2 classes, got {c}; for one sigmoid channel use "
                          "saliency_png16")
    p = np.clip(probs, 0.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.sum(np.where(p > 0, p * np.log(p), 0.0), axis=2)
    return np.clip(h / np.log(c), 0.0, 1.0).astype(np.float32)


def entropy_png(path: str, probs) -> np.ndarray:
    """Write the per-pixel entropy of `probs` (H, W, C), normalised by log(C), as an 8-bit grey PNG:
    value round(255 * H(p) / log C), so 0 is a one-hot (certain) pixel and 255 a uniform one.
    Returns the uint8 image written."""
    img = np.round(entropy(probs) * 255.0).astype(np.uint8)
    Image.fromarray(img).save(path, format="PNG")
    return img


def saliency_png16(path: str, prob) -> np.ndarray:
    """Write one probability map `prob` (H, W) (or (H, W, 1)) in [0, 1] as a 16-bit grey PNG (PIL mode
    "I;16"), values round(p * 65535) after clipping to [0, 1]. Returns the uint16 image written."""
    prob = np.asarray(prob)
    if prob.ndim == 3 and prob.shape[2] == 1:
        prob = prob[..., 0]
    if prob.ndim != 2:
        raise SegjaxError(f"saliency map of shape {prob.shape}: expected (height, width)")
    img = np.round(np.clip(prob.astype(np.float64), 0.0, 1.0) * 65535.0).astype(np.uint16)
    # frombytes: PIL versions differ in what fromarray(mode=...) accepts; "I;16" is little-endian uint16.
    Image.frombytes("I;16", (img.shape[1], img.shape[0]), img.astype("<u2").tobytes()).save(path, format="PNG")
    return img
