"""Image files read and written a band of rows at a time, for images larger than memory.

- `open_rows(path)`: an (H, W, 3) uint8 RGB image whose row slices `image[a:b]` give arrays. TIFFs are
  read through tifffile from the file on demand: an uncompressed, contiguous TIFF through a memory map
  of just the rows asked for (unmapped again at once, so the file's pages do not pile up in the
  process's resident set); a tiled or compressed one strip by strip / tile by tile, each decoded by
  tifffile. Other formats are decoded whole by PIL. `huge_ok` lifts PIL's decompression-bomb limit.
- `image_size(path)`: (H, W) without decoding the pixels; a corrupt or truncated file is a SegjaxError
  naming it.
- `JpegStripWriter`: a baseline JPEG written 16 rows at a time. Each 16-row strip is encoded by PIL on
  its own; the strips' entropy-coded data are joined with restart markers (one restart interval per
  strip), under the first strip's header with the full height. Decoding gives the same pixels as
  PIL's encoding of the whole image at the same quality (4:2:0, standard Huffman tables).
"""
from __future__ import annotations

import contextlib
import io
import os
import struct

import numpy as np
from PIL import Image

from segjax.errors import SegjaxError

TIFF_MAGIC = (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")  # classic and BigTIFF, both byte orders
PIL_PIXEL_LIMIT = Image.MAX_IMAGE_PIXELS  # PIL's decompression-bomb threshold (warns above, refuses at 2x)


def is_tiff(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) in TIFF_MAGIC


@contextlib.contextmanager
def pil_limit_lifted(lifted: bool = True):
    """PIL's decompression-bomb limit off inside the block (when `lifted`), restored after it."""
    before = Image.MAX_IMAGE_PIXELS
    if lifted:
        Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = before


def image_size(path: str, huge_ok: bool = False) -> tuple[int, int]:
    """(height, width) of an image file, read from its header; SegjaxError for a file that cannot be read."""
    if not os.path.isfile(path):
        raise SegjaxError(f"{path}: no such image")
    if is_tiff(path):
        with TiffRows(path) as rows:
            return rows.shape[:2]
    try:
        with pil_limit_lifted(huge_ok), Image.open(path) as img:
            return img.height, img.width
    except Image.DecompressionBombError:
        raise SegjaxError(f"{path}: larger than PIL reads whole (its decompression-bomb limit); predict it with "
                          "--tile H W, which reads it in bands") from None
    except (OSError, SyntaxError, ValueError):  # PIL's UnidentifiedImageError is an OSError
        raise SegjaxError(f"{path}: not an image file PIL can read; remove it from the inputs (or the folder) "
                          "and pass only images") from None


def open_rows(path: str, huge_ok: bool = False):
    """The image as (H, W, 3) uint8 RGB rows: a `TiffRows` for a TIFF, else an array decoded by PIL."""
    if is_tiff(path):
        return TiffRows(path)
    try:
        with pil_limit_lifted(huge_ok), Image.open(path) as img:
            return np.asarray(img if img.mode == "RGB" else img.convert("RGB"))
    except Image.DecompressionBombError:
        raise SegjaxError(f"{path}: larger than PIL reads whole; predict it with --tile H W") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise SegjaxError(f"{path}: not an image PIL can read ({e})") from None


class TiffRows:
    """Row slices of the first page of a TIFF, read from the file when asked for (see the module doc)."""

    def __init__(self, path: str):
        import tifffile

        self.path = path
        try:
            self._tif = tifffile.TiffFile(path)
            page = self._tif.pages.first
            self._page, self.dtype = page, page.dtype
        except Exception as e:  # tifffile raises TiffFileError, ValueError, struct.error, ... on a bad header
            raise SegjaxError(f"{path}: not a TIFF tifffile can read ({e}); re-save the file") from None
        self._check(page)
        self.height, self.width = page.imagelength, page.imagewidth
        self.samples = page.samplesperpixel
        self.shape, self.ndim = (self.height, self.width, 3), 3
        self._contiguous = page.is_contiguous and page.compression == 1
        self._chunk_row: tuple | None = None
        if not self._contiguous:
            self._first_chunks_decode()

    def _first_chunks_decode(self) -> None:
        """A compression tifffile cannot decode (JPEG without imagecodecs, ...) is found before any output."""
        try:
            self._chunk_row_pixels(0)
        except SegjaxError as e:
            raise SegjaxError(f"{self.path}: tifffile cannot decode this TIFF's first {self._segment} "
                              f"(compression {self._page.compression.name}: {e.__cause__ or e}); re-save it "
                              "uncompressed or with deflate compression") from None

    def _check(self, page) -> None:
        if page.dtype != np.uint8 or page.samplesperpixel not in (1, 2, 3, 4) or page.photometric not in (0, 1, 2):
            raise SegjaxError(f"{self.path}: a {page.dtype} TIFF with {page.samplesperpixel} samples per pixel "
                              f"(photometric {page.photometric}); predict reads 8-bit grey or RGB: convert it")
        if page.samplesperpixel > 1 and page.planarconfig != 1:
            raise SegjaxError(f"{self.path}: the TIFF stores its colour planes separately; re-save it with "
                              "interleaved (contiguous) samples")
        size = os.path.getsize(self.path)
        ends = np.asarray(page.dataoffsets, np.int64) + np.asarray(page.databytecounts, np.int64)
        if len(ends) == 0 or ends.max() > size or min(page.databytecounts) == 0:
            raise SegjaxError(f"{self.path}: the TIFF is truncated or its strip / tile table is corrupt "
                              f"(data reaches byte {int(ends.max()) if len(ends) else 0:,} of a {size:,}-byte "
                              "file); copy the file again")

    def __getitem__(self, rows: slice) -> np.ndarray:
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError("TiffRows reads contiguous row slices image[a:b]")
        a, b, _ = rows.indices(self.height)
        b = max(a, b)
        raw = self._mapped(a, b) if self._contiguous else self._decoded(a, b)
        return _as_rgb(raw.reshape(b - a, self.width, self.samples))

    def _mapped(self, a: int, b: int) -> np.ndarray:
        row_bytes = self.width * self.samples
        window = np.memmap(self.path, np.uint8, "r", offset=self._page.dataoffsets[0] + a * row_bytes,
                           shape=(max(b - a, 1) * row_bytes,))
        out = np.array(window[:(b - a) * row_bytes])
        del window  # unmapped: the pages read leave this process's resident set
        return out

    def _decoded(self, a: int, b: int) -> np.ndarray:
        ch, cw = self._page.chunks[:2]
        out = np.empty((b - a, self.width, self.samples), np.uint8)
        for r in range(a // ch, -(-b // ch)):
            chunk = self._chunk_row_pixels(r)
            lo, hi = max(a, r * ch), min(b, (r + 1) * ch)
            out[lo - a:hi - a] = chunk[lo - r * ch:hi - r * ch]
        return out

    def _chunk_row_pixels(self, r: int) -> np.ndarray:
        """Row r of the strip / tile grid decoded, (rows, W, samples); the last one is kept for the next call."""
        if self._chunk_row is not None and self._chunk_row[0] == r:
            return self._chunk_row[1]
        page, (ch, cw) = self._page, self._page.chunks[:2]
        per_row = page.chunked[1] if page.is_tiled else 1
        rows = min(ch, self.height - r * ch)
        pixels = np.empty((rows, per_row * cw if page.is_tiled else self.width, self.samples), np.uint8)
        fh = self._tif.filehandle
        for c in range(per_row):
            k = r * per_row + c
            fh.seek(page.dataoffsets[k])
            try:
                seg = page.decode(fh.read(page.databytecounts[k]), k, jpegtables=page.jpegtables)[0]
                pixels[:, c * cw:c * cw + seg.shape[2]] = seg.reshape(seg.shape[1:4])[:rows]
            except Exception as e:
                raise SegjaxError(f"{self.path}: TIFF {self._segment} {k} cannot be decoded ({e}); the file is "
                                  "corrupt, copy it again") from e
        self._chunk_row = (r, pixels[:, :self.width])
        return self._chunk_row[1]

    @property
    def _segment(self) -> str:
        return "tile" if self._page.is_tiled else "strip"

    def close(self) -> None:
        self._tif.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _as_rgb(pixels: np.ndarray) -> np.ndarray:
    if pixels.shape[2] in (1, 2):  # grey (with alpha)
        return np.repeat(pixels[:, :, :1], 3, axis=2)
    return np.ascontiguousarray(pixels[:, :, :3])


class JpegStripWriter:
    """A baseline JPEG of `height` x `width` RGB, written from row bands of any height (see the module doc)."""

    STRIP = 16  # the MCU height of 4:2:0 chroma subsampling

    def __init__(self, path: str, height: int, width: int, quality: int = 90):
        if not (0 < height <= 65535 and 0 < width <= 65535):
            raise SegjaxError(f"a {height}x{width} overlay does not fit a JPEG (at most 65535 pixels a side)")
        self.height, self.width, self.quality = height, width, quality
        self._file = open(path, "wb")
        self._pending = np.empty((0, width, 3), np.uint8)
        self._strips = 0

    def write(self, rows: np.ndarray) -> None:
        rows = np.concatenate([self._pending, np.asarray(rows, np.uint8)]) if len(self._pending) else rows
        full = len(rows) // self.STRIP * self.STRIP
        for y in range(0, full, self.STRIP):
            self._strip(rows[y:y + self.STRIP])
        self._pending = np.array(rows[full:], np.uint8)

    def _strip(self, rows: np.ndarray) -> None:
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(rows), "RGB").save(buf, "JPEG", quality=self.quality, subsampling=2)
        data = buf.getvalue()
        scan = _scan_start(data)
        if self._strips == 0:
            self._file.write(self._header(data[:scan]))
        else:
            self._file.write(bytes((0xFF, 0xD0 + (self._strips - 1) % 8)))  # RST0..RST7 in turn
        self._file.write(data[scan:-2])  # the entropy-coded data, without the strip's end-of-image marker
        self._strips += 1

    def _header(self, header: bytes) -> bytes:
        """The first strip's header with the full image height and a restart interval of one strip."""
        out, at = bytearray(header[:2]), 2
        while at < len(header):
            marker, length = header[at + 1], struct.unpack(">H", header[at + 2:at + 4])[0]
            segment = bytearray(header[at:at + 2 + length])
            if marker == 0xC0:  # SOF0: precision, height, width, ...
                segment[5:7] = struct.pack(">H", self.height)
            if marker == 0xDA:  # SOS: the restart interval goes before it
                out += b"\xff\xdd" + struct.pack(">HH", 4, -(-self.width // 16))
            out += segment
            at += 2 + length
        return bytes(out)

    def close(self) -> None:
        """Writes the last, shorter strip and the end-of-image marker; every row must have been written."""
        if len(self._pending):
            self._strip(self._pending)
        if self._strips * self.STRIP < self.height:
            raise ValueError(f"JPEG closed after {self._strips * self.STRIP} of {self.height} rows")
        self._file.write(b"\xff\xd9")
        self._file.close()

    def abandon(self) -> None:
        self._file.close()


def _scan_start(jpeg: bytes) -> int:
    """Offset of the entropy-coded data: just after the start-of-scan segment."""
    at = 2
    while jpeg[at + 1] != 0xDA:
        at += 2 + struct.unpack(">H", jpeg[at + 2:at + 4])[0]
    return at + 2 + struct.unpack(">H", jpeg[at + 2:at + 4])[0]
