"""Per-example transforms on numpy arrays, as torchvision's segmentation reference does them.

Train (SegmentationPresetTrain): resize the shorter side to a random size in
[scale_range[0], scale_range[1]] x base_size (bilinear image, nearest mask), flip, pad to the crop
(image 0, mask 255, right and bottom), random crop, normalise. Only the image pixels inside the crop are
resampled: PIL's `resize(box=...)` computes each output pixel from the same source coordinates as
resizing the whole image and then cropping (within 2/255 from Pillow's fixed-point rounding), and is
much cheaper when the scale is 2x. Masks are resized whole, so they are exactly torchvision's.

Eval: optionally resize the shorter side to base_size, then pad to a fixed size (image 0, mask 255).

Images are uint8 RGB, or uint16 with any number of bands (multi-band folder data sets): those are
resampled band by band in float32 (PIL mode "F", the same bilinear filter and box), rounded back to
uint16, and normalised by the dtype's full range: (x / 255 - mean) / std for uint8, (x / 65535 - mean)
/ std for uint16, with one mean and std per channel.
"""
from __future__ import annotations

import functools

import numpy as np
from PIL import Image

from segjax.data.validate import VOID
from segjax.nn import pair

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the one definition (segjax.convert imports it from here)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resized_shape(h: int, w: int, shorter: int) -> tuple[int, int]:
    """torchvision's F.resize(img, shorter): the shorter side becomes `shorter`, the longer one is
    truncated, not rounded."""
    if h <= w:
        return shorter, int(shorter * w / h)
    return int(shorter * h / w), shorter


def resize_window(image: np.ndarray, mask: np.ndarray, out_hw, top: int, left: int, rows: int, cols: int):
    """The window [top, top+rows) x [left, left+cols) of image/mask resized to out_hw (as if the whole
    pair were resized, then cropped)."""
    h, w = mask.shape
    sy, sx = h / out_hw[0], w / out_hw[1]
    box = (left * sx, top * sy, (left + cols) * sx, (top + rows) * sy)
    if image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3:
        img = np.asarray(Image.fromarray(image).resize((cols, rows), Image.BILINEAR, box=box))
    else:
        img = _resize_bands(image, (cols, rows), box)
    # The mask is resized whole: Pillow's NEAREST takes fixed-point steps, so a box would break ties
    # differently; one uint8 channel costs little.
    msk = np.asarray(Image.fromarray(mask).resize(out_hw[::-1], Image.NEAREST))[top:top + rows, left:left + cols]
    return img, msk


def _resize_bands(image: np.ndarray, size, box) -> np.ndarray:
    """Bilinear resize of any (H, W, C) integer image, one float32 band at a time, rounded back to its dtype."""
    top = float(np.iinfo(image.dtype).max)
    bands = [np.asarray(Image.fromarray(np.ascontiguousarray(image[..., c], np.float32), "F")
                        .resize(size, Image.BILINEAR, box=box)) for c in range(image.shape[-1])]
    return np.clip(np.rint(np.stack(bands, axis=-1)), 0, top).astype(image.dtype)


def value_range(dtype) -> float:
    """What the pipeline divides by before mean/std: 255 for uint8, 65535 for uint16 images."""
    return 65535.0 if np.dtype(dtype) == np.uint16 else 255.0


def _check_channels(image: np.ndarray, mean) -> None:
    if image.ndim != 3 or image.shape[-1] != len(mean):
        from segjax.errors import SegjaxError
        raise SegjaxError(f"image of shape {image.shape} has {image.shape[-1] if image.ndim == 3 else 1} channel(s) "
                          f"but mean/std give {len(mean)}; set in_channels, mean and std to the data set's band count")


@functools.lru_cache(maxsize=8)
def _normalize_table(mean: tuple, std: tuple) -> tuple[np.ndarray, np.ndarray]:
    """(3 * 256,) float32 table, channel-major: entry c * 256 + v is (v / 255 - mean[c]) / std[c] with the
    float32 rounding of the arithmetic path; and the per-channel offsets (0, 256, 512)."""
    scale = (1.0 / (255.0 * np.asarray(std, np.float32))).astype(np.float32)
    shift = (np.asarray(mean, np.float32) / np.asarray(std, np.float32)).astype(np.float32)
    table = np.arange(256, dtype=np.float32)[None, :] * scale[:, None] - shift[:, None]
    return table.astype(np.float32).reshape(-1), np.arange(len(mean)) * 256


def normalize(image: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD, rows: int = 16) -> np.ndarray:
    """uint8 HWC -> float32 (x / 255 - mean) / std; uint16 -> (x / 65535 - mean) / std.

    uint8 images are looked up in a 256-entry table per channel, `rows` image rows at a time: the
    gather's intp indices then stay in cache instead of a fresh 8-bytes-per-value array (whose page
    faults made a whole-image `np.take` slower than the arithmetic). Bit-identical to the arithmetic
    path and ~0.7 ms cheaper per 480x480 image (see docs/benchmarks.md)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != len(mean):
        scale = (1.0 / (value_range(image.dtype) * np.asarray(std, np.float32))).astype(np.float32)
        shift = (np.asarray(mean, np.float32) / np.asarray(std, np.float32)).astype(np.float32)
        out = np.multiply(image, scale, dtype=np.float32)
        return np.subtract(out, shift, out=out)
    table, offsets = _normalize_table(tuple(float(m) for m in mean), tuple(float(s) for s in std))
    out = np.empty(image.shape, np.float32)
    index = np.empty((min(rows, len(image)),) + image.shape[1:], np.intp)
    for top in range(0, len(image), rows):
        n = min(rows, len(image) - top)
        np.add(image[top:top + n], offsets, out=index[:n])
        np.take(table, index[:n], out=out[top:top + n], mode="clip")  # "clip": no buffered copy of out
    return out


def train_transform(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, *, crop_size, base_size: int,
                    scale_range=(0.5, 2.0), hflip: bool = True, vflip: bool = False,
                    mean=IMAGENET_MEAN, std=IMAGENET_STD, uint8: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """-> (float32 (ch, cw, C) normalised image, int32 (ch, cw) mask with 255 in padding).

    `uint8=True` returns the image un-normalised (its own dtype: uint8, or uint16 for multi-band data;
    C-contiguous) for normalising on the device."""
    ch, cw = pair(crop_size)
    shorter = int(rng.integers(int(scale_range[0] * base_size), int(scale_range[1] * base_size), endpoint=True))
    rh, rw = resized_shape(*mask.shape, shorter)
    top = int(rng.integers(0, max(rh - ch, 0), endpoint=True))
    left = int(rng.integers(0, max(rw - cw, 0), endpoint=True))
    rows, cols = min(ch, rh - top), min(cw, rw - left)
    _check_channels(image, mean)
    img, msk = resize_window(image, mask, (rh, rw), top, left, rows, cols)
    out_img = np.zeros((ch, cw, image.shape[-1]), image.dtype)
    out_msk = np.full((ch, cw), VOID, np.uint8)
    out_img[:rows, :cols], out_msk[:rows, :cols] = img, msk
    if hflip and rng.random() < 0.5:
        out_img, out_msk = out_img[:, ::-1], out_msk[:, ::-1]
    if vflip and rng.random() < 0.5:
        out_img, out_msk = out_img[::-1], out_msk[::-1]
    if uint8:
        return np.ascontiguousarray(out_img), out_msk.astype(np.int32)
    return normalize(out_img, mean, std), out_msk.astype(np.int32)


def eval_transform(image: np.ndarray, mask: np.ndarray, *, pad_hw, base_size: int | None = None,
                   mean=IMAGENET_MEAN, std=IMAGENET_STD) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """-> (image padded to pad_hw, mask padded with 255, (h, w) of the valid top-left region)."""
    _check_channels(image, mean)
    if base_size is not None:
        rh, rw = resized_shape(*mask.shape, base_size)
        image, mask = resize_window(image, mask, (rh, rw), 0, 0, rh, rw)
    h, w = mask.shape
    ph, pw = pair(pad_hw)
    if h > ph or w > pw:
        from segjax.errors import SegjaxError
        raise SegjaxError(f"eval image of {h}x{w} does not fit eval_size {ph}x{pw}; raise eval_size or leave it "
                          "unset to use the largest image of the split")
    out_img = np.zeros((ph, pw, image.shape[-1]), image.dtype)
    out_msk = np.full((ph, pw), VOID, np.uint8)
    out_img[:h, :w], out_msk[:h, :w] = image, mask
    return normalize(out_img, mean, std), out_msk.astype(np.int32), (h, w)
