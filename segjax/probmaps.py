"""Probability maps and uncertainty images written next to predicted masks.

- `save_probs`: the (H, W, C) class probabilities as float16 in `<stem>.npy` (`np.load` gives the array
  back; `np.load(..., mmap_mode="r")` reads a huge one lazily), and, when class names are given,
  `<stem>.json` beside it: {"class_names": [...]}. One format whether the image was predicted whole or
  in tiles: `ProbsWriter` writes the same file band by band.
- `entropy_png`: per-pixel entropy normalised by log(C), as an 8-bit grey PNG (0 = certain, 255 = uniform).
- `saliency_png16`: one probability map as a 16-bit grey PNG, value round(p * 65535).
"""
from __future__ import annotations

import errno
import json
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


def _stem(path_stem: str) -> str:
    stem, ext = os.path.splitext(path_stem)
    return stem if ext.lower() in (".npy", ".npz", ".json") else path_stem


def _checked_names(class_names, channels: int) -> list[str]:
    names = [str(n) for n in class_names]
    if len(names) != channels:
        raise SegjaxError(f"{len(names)} class names for {channels} probability channels; "
                          "pass one name per channel")
    return names


def write_names(path: str, class_names: Sequence[str], channels: int) -> str:
    """The class-names file that sits beside a probabilities .npy: {"class_names": [...]}."""
    names = _checked_names(class_names, channels)
    with open(path, "w") as f:
        json.dump({"class_names": names}, f)
    return path


def save_probs(path_stem: str, probs, class_names: Sequence[str] | None = None) -> str:
    """Write `probs` (H, W, C) as float16 to `<path_stem>.npy`, and the class names (one per channel), when
    given, to `<path_stem>.json`. Returns the .npy path. A trailing .npy / .npz / .json is dropped first."""
    probs = _probs_hwc(probs)
    stem = _stem(path_stem)
    if class_names is not None:
        _checked_names(class_names, probs.shape[2])
    np.save(stem + ".npy", probs.astype(np.float16))
    if class_names is not None:
        write_names(stem + ".json", class_names, probs.shape[2])
    return stem + ".npy"


def load_probs(path: str, mmap: bool = False) -> tuple[np.ndarray, list[str] | None]:
    """(probs float16 (H, W, C), class names or None) from a file `save_probs` or `ProbsWriter` wrote;
    `mmap`: map the array instead of reading it."""
    stem = _stem(path)
    probs = np.load(stem + ".npy", mmap_mode="r" if mmap else None, allow_pickle=False)
    if not os.path.exists(stem + ".json"):
        return probs, None
    with open(stem + ".json") as f:
        return probs, [str(n) for n in json.load(f)["class_names"]]


class ProbsWriter:
    """float16 (H, W, C) probabilities written into an .npy file (`np.lib.format.open_memmap`) band by band.

    The file's space is reserved when it is created, so a full disk fails there with OSError (ENOSPC)
    rather than as SIGBUS inside a write through the map. Each band is written through a map of just
    its rows, unmapped after the write, so the resident set holds one band, not the file."""

    def __init__(self, path: str, shape: tuple[int, int, int]):
        self.path, self.shape = path, tuple(int(s) for s in shape)
        mapped = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=self.shape)
        self.offset = mapped.offset
        del mapped
        if hasattr(os, "posix_fallocate"):
            fd = os.open(path, os.O_RDWR)
            try:
                os.posix_fallocate(fd, 0, os.path.getsize(path))
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise
                # some file systems cannot reserve space: the writes below then find a full disk themselves
            finally:
                os.close(fd)

    def write(self, top: int, probs: np.ndarray) -> None:
        """Rows top .. top + k - 1 from float (k, W, C) probabilities."""
        k, w, c = probs.shape
        if probs.shape[1:] != self.shape[1:] or not 0 <= top <= self.shape[0] - k:
            raise ValueError(f"band of shape {probs.shape} at row {top} does not fit {self.shape}")
        if k == 0:
            return
        window = np.memmap(self.path, np.float16, "r+", offset=self.offset + top * w * c * 2, shape=probs.shape)
        window[:] = probs
        window.flush()
        del window


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


def entropy_uint8(probs) -> np.ndarray:
    """round(255 * H(p) / log C) of (H, W, C) probabilities (or a band of rows of them), as uint8."""
    return np.round(entropy(probs) * 255.0).astype(np.uint8)


def entropy_png(path: str, probs) -> np.ndarray:
    """Write the per-pixel entropy of `probs` (H, W, C), normalised by log(C), as an 8-bit grey PNG:
    value round(255 * H(p) / log C), so 0 is a one-hot (certain) pixel and 255 a uniform one.
    Returns the uint8 image written."""
    img = entropy_uint8(probs)
    Image.fromarray(img).save(path, format="PNG")
    return img


def saliency_png16(path: str, prob) -> np.ndarray:
    """Write one probability map `prob` (H, W) (or (H, W, 1)) in [0, 1] as a 16-bit grey PNG (PIL mode
    "I;16"), values round(p * 65535) after clipping to [0, 1]; a uint16 map is taken as those values
    already. Returns the uint16 image written."""
    prob = np.asarray(prob)
    if prob.ndim == 3 and prob.shape[2] == 1:
        prob = prob[..., 0]
    if prob.ndim != 2:
        raise SegjaxError(f"saliency map of shape {prob.shape}: expected (height, width)")
    if prob.dtype == np.uint16:  # already round(p * 65535)
        img = prob
    else:
        img = np.round(np.clip(prob.astype(np.float64), 0.0, 1.0) * 65535.0).astype(np.uint16)
    # "I;16" is little-endian uint16; frombuffer maps the array rather than copying it.
    le = np.ascontiguousarray(img, "<u2")
    Image.frombuffer("I;16", (img.shape[1], img.shape[0]), le, "raw", "I;16", 0, 1).save(path, format="PNG")
    return img
