"""segjax.imagefiles: TIFFs read band by band from the file, PIL's size limit, JPEGs written in strips."""
import io

import numpy as np
import pytest
import tifffile
from PIL import Image

from segjax import imagefiles
from segjax.errors import SegjaxError


@pytest.fixture(scope="module")
def rgb():
    return np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)


def damaged_tiff(path, image, rows_per_strip: int, strip: int):
    """A zlib-compressed TIFF of `image` whose strip number `strip` is zeroed: the header reads fine, the
    damage shows only when that strip is decoded. Returns the path."""
    tifffile.imwrite(path, image, compression="zlib", rowsperstrip=rows_per_strip)
    with tifffile.TiffFile(path) as tif:
        at, n = tif.pages.first.dataoffsets[strip], tif.pages.first.databytecounts[strip]
    raw = bytearray(path.read_bytes())
    raw[at:at + n] = bytes(n)
    path.write_bytes(bytes(raw))
    return path


@pytest.mark.parametrize("layout", ["contiguous", "tiled", "zlib strips", "grey", "rgba"])
def test_tiff_rows_equal_the_image(tmp_path, rgb, layout):
    path = str(tmp_path / "a.tif")
    if layout == "contiguous":
        tifffile.imwrite(path, rgb)
    elif layout == "tiled":
        tifffile.imwrite(path, rgb, tile=(16, 16))
    elif layout == "zlib strips":
        tifffile.imwrite(path, rgb, compression="zlib", rowsperstrip=8)
    elif layout == "grey":
        tifffile.imwrite(path, rgb[..., 0])
    else:
        tifffile.imwrite(path, np.dstack([rgb, rgb[..., :1]]), photometric="rgb", extrasamples=["unassalpha"])
    want = np.repeat(rgb[..., :1], 3, axis=2) if layout == "grey" else rgb
    assert imagefiles.is_tiff(path) and imagefiles.image_size(path) == (50, 70)
    with imagefiles.open_rows(path) as rows:
        assert rows.shape == (50, 70, 3)
        assert rows._contiguous == (layout in ("contiguous", "grey", "rgba"))
        for a, b in ((0, 50), (3, 17), (40, 50), (7, 8), (16, 32), (45, 60)):
            np.testing.assert_array_equal(rows[a:b], want[a:b])


def test_truncated_and_corrupt_tiffs_are_one_line_errors_naming_the_file(tmp_path, rgb):
    big = np.tile(rgb, (4, 4, 1))
    path = tmp_path / "cut.tif"
    tifffile.imwrite(path, big)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(SegjaxError, match=r"cut\.tif: the TIFF is truncated"):
        imagefiles.image_size(str(path))
    bad = tmp_path / "bad.tif"
    bad.write_bytes(data[:4] + bytes(range(256)) * 4)  # TIFF magic, garbage after it
    with pytest.raises(SegjaxError, match=r"bad\.tif: not a TIFF tifffile can read"):
        imagefiles.open_rows(str(bad))
    # Compressed strips with damaged data: the header is fine, the damage shows when that strip is read.
    zipped = damaged_tiff(tmp_path / "zip.tif", big, rows_per_strip=16, strip=5)
    with imagefiles.open_rows(str(zipped)) as rows:
        np.testing.assert_array_equal(rows[0:16], big[0:16])
        with pytest.raises(SegjaxError, match=r"zip\.tif: TIFF strip 5 cannot be decoded"):
            rows[70:90]


def test_pil_limit_is_lifted_only_when_asked_and_restored(tmp_path, monkeypatch):
    path = str(tmp_path / "p.png")
    Image.fromarray(np.zeros((60, 60, 3), np.uint8)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 60 x 60 = 3,600 > 2 x 1,000: PIL refuses it
    with pytest.raises(SegjaxError, match="p.png: larger than PIL reads whole.*--tile"):
        imagefiles.image_size(path)
    assert imagefiles.image_size(path, huge_ok=True) == (60, 60)
    assert imagefiles.open_rows(path, huge_ok=True).shape == (60, 60, 3)
    assert Image.MAX_IMAGE_PIXELS == 1000


@pytest.mark.parametrize("height, width", [(50, 70), (16, 16), (5, 3), (33, 100)])
def test_jpeg_written_in_strips_decodes_as_the_whole_image_encoded_at_once(tmp_path, height, width):
    image = np.random.default_rng(height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    writer = imagefiles.JpegStripWriter(str(tmp_path / "s.jpg"), height, width, quality=90)
    top = 0
    for rows in (7, 1, 20, 100):  # bands of any height, not aligned to the 16-row strips
        writer.write(image[top:top + rows])
        top += rows
    writer.close()
    whole = io.BytesIO()
    Image.fromarray(image).save(whole, "JPEG", quality=90, subsampling=2)
    with Image.open(tmp_path / "s.jpg") as strips, Image.open(whole) as at_once:
        assert strips.size == (width, height)
        np.testing.assert_array_equal(np.asarray(strips), np.asarray(at_once))


def test_jpeg_closed_early_is_refused(tmp_path):
    writer = imagefiles.JpegStripWriter(str(tmp_path / "s.jpg"), 40, 8)
    writer.write(np.zeros((20, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="32 of 40 rows"):
        writer.close()
    with pytest.raises(SegjaxError, match="70000x8 overlay does not fit a JPEG"):
        imagefiles.JpegStripWriter(str(tmp_path / "t.jpg"), 70000, 8)


def test_a_compression_tifffile_cannot_decode_is_refused_before_reading(tmp_path, rgb, monkeypatch):
    path = tmp_path / "z.tif"
    tifffile.imwrite(path, rgb, compression="zlib", rowsperstrip=8)

    def no_codec(self):
        def decode(*a, **k):
            raise ValueError("requires a codec that is not installed")
        return decode
    monkeypatch.setattr(tifffile.TiffPage, "decode", property(no_codec))
    with pytest.raises(SegjaxError, match=r"z\.tif: tifffile cannot decode this TIFF's first strip "
                                          r"\(compression ADOBE_DEFLATE: requires a codec.*re-save it"):
        imagefiles.open_rows(str(path))
