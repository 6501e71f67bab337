"""Decode and check one image / mask pair before it goes into a tfds data set.

Every problem becomes a one-line `SegjaxError` naming the file and the fix. Images in any common mode
(grayscale, RGBA, CMYK, palette, 16-bit) are converted to 8-bit RGB without complaint; masks must
hold class indices.

Multi-band images (a data set whose `in_channels` is not 3, see segjax.data.folder) are read as they
are by `decode_bands`: TIFF through tifffile (any band count, 8 or 16 bits), other formats through
PIL; they are stored as uint16, 8-bit data scaled by 257 so that x / 65535 is the same value as the
8-bit x / 255.
"""
from __future__ import annotations

import io
from typing import Mapping

import numpy as np
from PIL import Image

from segjax.errors import SegjaxError

VOID = 255  # the void / ignore label, here and in segjax.data.transforms' padding


class InvalidData(SegjaxError):
    """A file that training must not read as it is; `kind` says why ("corrupt", "rgb", "channels",
    "size", "labels", "binary_0_255", "roi"; multi-band images "bands", "dtype"), so `segjax.data.check`
    can count what it finds."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


def _open(data: bytes, where: str) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
        img.load()  # decodes fully: truncated files fail here, not at training time
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise InvalidData(f"{where}: corrupt or truncated image ({e}); re-download it or drop it from the split",
                          "corrupt") from None
    return img


def image_size(data: bytes, where: str) -> tuple[int, int]:
    """(height, width) of an image, decoded fully as `encode_image` does (truncated files fail here).
    A TIFF that PIL cannot open (multi-band, 16-bit colour) is read through tifffile."""
    try:
        img = _open(data, where)
    except InvalidData:
        if not is_tiff(data):
            raise
        return _rgb_tiff(data, where).shape[:2]
    return img.height, img.width


TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF, both byte orders
BAND_DTYPES = (np.uint8, np.uint16)


def is_tiff(data: bytes) -> bool:
    return data[:4] in TIFF_MAGIC


def _read_tiff(data: bytes, where: str) -> np.ndarray:
    """The first image of a TIFF as (H, W) or (H, W, bands); planar files (bands first) are moved last."""
    try:
        import tifffile
    except ImportError:  # a core dependency; only a broken install lacks it
        raise SegjaxError(f"{where}: reading multi-band TIFF needs tifffile; pip install tifffile") from None
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            series = tif.series[0]
            a, axes = series.asarray(), series.axes
    except Exception as e:  # tifffile raises several types for a bad file
        raise InvalidData(f"{where}: corrupt or truncated TIFF ({type(e).__name__}: {e}); re-export it or drop it "
                          "from the split", "corrupt") from None
    if a.ndim == 3 and axes.endswith("YX"):  # planar, or one band per page: (bands, H, W)
        a = np.moveaxis(a, 0, -1)
    if a.ndim not in (2, 3):
        raise InvalidData(f"{where}: TIFF of shape {a.shape} (axes {axes}); expected one image of (height, width"
                          "[, bands]), not a stack of pages", "channels")
    return a


def _rgb_tiff(data: bytes, where: str) -> np.ndarray:
    """A TIFF that PIL cannot open (multi-band, 16-bit colour) in an RGB data set, through tifffile:
    (H, W) or (H, W, 3), 8 or 16-bit; another band count names the in_channels that would read it."""
    a = _read_tiff(data, where)
    bands = 1 if a.ndim == 2 else a.shape[-1]
    if bands not in (1, 3):
        raise InvalidData(f"{where}: image has {bands} bands where RGB (in_channels=3) was expected; for a "
                          f"multi-band data set set in_channels={bands} (manifest or data option)", "bands")
    if a.dtype not in BAND_DTYPES:
        raise InvalidData(f"{where}: image samples are {a.dtype}; save it as 8 or 16-bit unsigned integers", "dtype")
    return a


def decode_bands(data: bytes, where: str, in_channels: int) -> np.ndarray:
    """(H, W, in_channels) uint16 of a multi-band image: TIFF through tifffile, anything else through
    PIL as stored (no colour conversion). 8-bit values are scaled by 257 (0..255 -> 0..65535), so the
    pipeline's x / 65535 equals x / 255 of the 8-bit data. A band count other than `in_channels`, or a
    sample type other than 8 / 16-bit unsigned, raises one line naming the file."""
    if is_tiff(data):
        a = _read_tiff(data, where)
    else:
        img = _open(data, where)
        a = np.asarray(img)
        if img.mode in ("I", "I;16", "I;16B", "I;16L") and a.size and 0 <= a.min() and a.max() <= 65535:
            a = a.astype(np.uint16)
    bands = 1 if a.ndim == 2 else a.shape[-1]
    if bands != in_channels:
        raise InvalidData(f"{where}: image has {bands} band(s) where in_channels={in_channels} was asked; "
                          f"export it with {in_channels} bands or set in_channels={bands}", "bands")
    if a.dtype not in BAND_DTYPES:
        raise InvalidData(f"{where}: image samples are {a.dtype}; multi-band images must be 8 or 16-bit unsigned "
                          "integers (rescale floats to 0-65535 and save as uint16)", "dtype")
    a = a.reshape(a.shape[0], a.shape[1], in_channels)
    if a.dtype == np.uint8:
        return a.astype(np.uint16) * np.uint16(257)
    return np.ascontiguousarray(a)


def _to_uint8(img: Image.Image) -> Image.Image:
    """16-bit and 32-bit integer grayscale -> 8-bit by scaling the full range, not by clipping."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(img).astype(np.float64)
        top = 65535.0 if a.max() > 255 or img.mode.startswith("I;16") else 255.0
        return Image.fromarray(np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8), "L")
    if img.mode == "F":
        a = np.asarray(img)
        return Image.fromarray(np.clip(np.rint(a * (255.0 if a.max() <= 1.0 else 1.0)), 0, 255).astype(np.uint8), "L")
    return img


def encode_image(data: bytes, where: str) -> tuple[bytes, tuple[int, int]]:
    """Returns (bytes to store, (height, width)). An 8-bit RGB JPEG is stored untouched (byte-exact);
    anything else is converted to RGB and stored as lossless PNG."""
    try:
        img = _open(data, where)
    except InvalidData:
        if not is_tiff(data):
            raise
        a = _rgb_tiff(data, where)
        if a.dtype == np.uint16:
            a = np.rint(a / 257.0).astype(np.uint8)
        img = Image.fromarray(a)
    size = (img.height, img.width)
    if img.format == "JPEG" and img.mode == "RGB":
        return data, size
    img = _to_uint8(img)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))  # transparent pixels become black
        img = Image.alpha_composite(background, img)
    img = img.convert("RGB")
    out = io.BytesIO()
    img.save(out, format="PNG", compress_level=1)
    return out.getvalue(), size


def decode_mask(data: bytes, where: str) -> np.ndarray:
    """Class-index mask (H, W) uint8 from an 'L', palette, '1' or 16-bit PNG/GIF/TIFF."""
    img = _open(data, where)
    if img.mode == "P":
        index = np.asarray(img, dtype=np.uint8)
        colours = np.asarray(img.getpalette() or [], np.uint8).reshape(-1, 3)
        used = np.unique(index)
        if len(colours) > used.max() and (colours[used] == colours[used][:, :1]).all():
            return colours[index][..., 0]  # a grey palette (e.g. DRIVE's GIFs): the grey level is the value
        return index  # palette index == class index (VOC convention)
    if img.mode == "1":
        return np.asarray(img.convert("L"), dtype=np.uint8)
    if img.mode in ("RGB", "RGBA"):
        a = np.asarray(img)[..., :3]
        if (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all():
            return np.ascontiguousarray(a[..., 0])  # grey stored as RGB: the index is unambiguous
        raise InvalidData(
            f"{where}: RGB colour mask where class indices were expected; save it as a single-channel "
            "'L' or palette PNG whose pixel values are class indices", "rgb")
    if img.mode in ("L", "LA"):
        return np.asarray(img.convert("L"), dtype=np.uint8)
    a = np.asarray(img)
    if a.ndim != 2:
        raise InvalidData(f"{where}: mask has {a.shape[-1]} channels (mode {img.mode}) where one channel of class "
                          "indices was expected; save it as a single-channel 'L' or palette PNG", "channels")
    if a.max() > 255 or a.min() < 0:
        raise InvalidData(f"{where}: mask mode {img.mode} with values up to {a.max()}; expected class indices 0-255",
                          "labels")
    return a.astype(np.uint8)


def remap(mask: np.ndarray, value_map: Mapping[int, int] | None = None, threshold: int | None = None) -> np.ndarray:
    """Applies a manifest's value mapping (e.g. {255: 1}) or binarises at `threshold` (>= t -> 1)."""
    if threshold is not None:
        return (mask >= threshold).astype(np.uint8)
    if value_map:
        lut = np.arange(256, dtype=np.uint8)
        for k, v in value_map.items():
            lut[int(k)] = int(v)
        return lut[mask]
    return mask


def check_mask(mask: np.ndarray, *, image_hw: tuple[int, int], num_classes: int, where: str,
               image_where: str, remapped: bool = False) -> None:
    if mask.shape != tuple(image_hw):
        raise InvalidData(
            f"{where}: mask is {mask.shape[1]}x{mask.shape[0]} but image {image_where} is "
            f"{image_hw[1]}x{image_hw[0]}; masks must have the image's size (re-export it at full size)", "size")
    values = np.unique(mask)
    bad = values[(values >= num_classes) & (values != VOID)]
    binary_0_255 = set(values.tolist()) == {0, VOID}
    if len(bad):
        hint = ""
        if set(values.tolist()) <= {0, VOID} | set(bad.tolist()) and len(bad) > 2 and num_classes == 2:
            hint = " (looks like an anti-aliased binary mask: binarise it with a threshold, e.g. 128)"
        raise InvalidData(
            f"{where}: labels {bad[:8].tolist()} outside [0, {num_classes}) and 255 (void); "
            f"fix the mask or the value mapping{hint}", "labels")
    if binary_0_255 and num_classes == 2 and not remapped:
        raise InvalidData(
            f"{where}: mask holds only 0 and 255, and 255 means void, so every foreground pixel would be "
            "ignored; binary masks saved as 0/255 need the value mapping {255: 1}", "binary_0_255")


def encode_mask(mask: np.ndarray) -> bytes:
    """Single-channel 'L' PNG: palette PNGs would decode to colours under OpenCV."""
    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8), "L").save(out, format="PNG", compress_level=1)
    return out.getvalue()


def apply_roi(mask: np.ndarray, roi: np.ndarray, where: str) -> np.ndarray:
    """Pixels outside the region of interest (roi == 0) become void."""
    if roi.shape != mask.shape:
        raise InvalidData(f"{where}: ROI mask is {roi.shape[1]}x{roi.shape[0]} but the mask is "
                          f"{mask.shape[1]}x{mask.shape[0]}; use the ROI that belongs to this image", "roi")
    return np.where(roi > 0, mask, VOID).astype(np.uint8)
