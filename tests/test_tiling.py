"""Tiled inference (segjax.tiling): equality with whole-image inference, one compile, padding, errors, bands."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from segjax import analysis, models, tiling
from segjax.errors import SegjaxError


def _identity_fn(calls=None):
    """'Probabilities' equal to the input tile: tiled output must reproduce the image exactly."""
    def fn(x):
        if calls is not None:
            calls.append(np.array(x))
        return x
    return fn


class _PoolNet(nn.Module):
    """3x3 conv -> 2x2 average pool (stride 2) -> 3x3 conv -> x2 nearest upsample -> 1x1 classifier."""
    @nn.compact
    def __call__(self, x, train=False):
        x = nn.relu(nn.Conv(6, (3, 3), padding="SAME")(x))
        x = nn.avg_pool(x, (2, 2), (2, 2))
        x = nn.relu(nn.Conv(6, (3, 3), padding="SAME")(x))
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return {"out": nn.Conv(3, (1, 1))(x)}


def test_unet_tiled_equals_whole_image_in_the_interior():
    """UNet (stride 16, no global pooling): receptive field r each side. With margin >= r and overlap
    >= 2r + 1 every pixel gets weight only from tiles in which it lies >= r from any tile edge that is
    not the image's own top / left border, so those tiles see exactly what the whole image sees, on
    the same stride-16 grid. Exact ('interior') is therefore every pixel except the last r rows /
    columns before a bottom / right border that a padded tile crosses (there the tile sees reflected
    pixels where the whole-image forward sees its own zero padding). Where the grid ends flush with the
    image (no padding) the whole image is exact."""
    m = models.create("unet", num_classes=3, base_channels=4, bilinear=False)
    v = analysis.init_variables(m, (64, 64))
    stride = analysis.output_stride(m, (128, 128), variables=v, num_classes=3)["feature"]
    assert stride == 16
    rf = analysis.model_receptive_field(m, v, (256, 256))
    assert not rf["clipped"]
    top, left, bottom, right = rf["box"]
    r = max(128 - top, bottom - 128, 128 - left, right - 128)  # centre pixel 128: taps within r of it
    probs_fn = jax.jit(lambda x: jax.nn.softmax(m.apply(v, x, train=False)["out"], -1))

    rng = np.random.default_rng(0)
    image = rng.normal(size=(384, 336, 3)).astype(np.float32)
    whole = np.asarray(probs_fn(image[None]))[0]
    margin = r
    overlap = (2 * r + 1 + 15) // 16 * 16 / 256  # >= 2r + 1 pixels, on the stride grid
    stats = {}
    tiled = tiling.predict_tiled(probs_fn, image, tile=256, overlap=overlap, tile_batch=4, window="linear",
                                 output_stride=stride, margin=margin, stats=stats)
    assert stats["overlap"][0] >= 2 * r + 1 and stats["margin"] == (r, r)
    # The rows of tiles end flush at 384; the last column of tiles crosses 336 (padded).
    plan = tiling.plan_tiles((384, 336), 256, overlap, stride, margin)
    assert plan["rows"][-1] + 256 == 384 and plan["cols"][-1] + 256 > 336
    assert tiled.shape == whole.shape and tiled.dtype == np.float32
    np.testing.assert_allclose(tiled[:, :336 - r], whole[:, :336 - r], atol=1e-5, rtol=0)
    # Gaussian blending has the same exact region.
    gauss = tiling.predict_tiled(probs_fn, image, tile=256, overlap=overlap, tile_batch=4, window="gaussian",
                                 output_stride=stride, margin=margin)
    np.testing.assert_allclose(gauss[:, :336 - r], whole[:, :336 - r], atol=1e-5, rtol=0)
    # Sanity: tiles with no margin are not exact (the test would catch a tile-edge leak).
    leaky = tiling.predict_tiled(probs_fn, image, tile=256, overlap=overlap, tile_batch=4, window="linear",
                                 output_stride=stride, margin=0)
    assert np.abs(leaky[:, :336 - r] - whole[:, :336 - r]).max() > 1e-4


def test_strided_net_tiled_equals_whole_and_counts_one_compile():
    net = _PoolNet()
    v = net.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
    traces = []

    def f(x):
        traces.append(x.shape)  # runs only while tracing
        return jax.nn.softmax(net.apply(v, x)["out"], -1)

    probs_fn = jax.jit(f)
    image = np.random.default_rng(1).normal(size=(70, 90, 3)).astype(np.float32)
    whole = np.asarray(jax.nn.softmax(net.apply(v, image[None])["out"], -1))[0]
    stats = {}
    tiled = tiling.predict_tiled(probs_fn, image, tile=(32, 40), overlap=0.5, tile_batch=3, window="gaussian",
                                 output_stride=2, margin=4, stats=stats)
    assert len(traces) == 1 and traces[0] == (3, 32, 40, 3)
    assert stats["tiles"] % 3 != 0  # the last batch was partial (padded to 3) and still no retrace
    # Receptive field radius of _PoolNet is < 8 pixels: exact except the 8 rows / columns before the
    # bottom and right borders (the grid's last tiles cross both).
    np.testing.assert_allclose(tiled[:70 - 8, :90 - 8], whole[:70 - 8, :90 - 8], atol=1e-5, rtol=0)
    np.testing.assert_allclose(tiled.sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("window", tiling.WINDOWS)
def test_identity_reproduces_the_image_and_memmap_output(tmp_path, window):
    image = np.random.default_rng(2).random((50, 77, 3)).astype(np.float32)
    out = np.lib.format.open_memmap(tmp_path / "p.npy", mode="w+", dtype=np.float32, shape=(50, 77, 3))
    res = tiling.predict_tiled(_identity_fn(), image, tile=(16, 24), overlap=0.3, tile_batch=5, window=window,
                               out=out)
    assert res is out
    out.flush()
    np.testing.assert_allclose(np.load(tmp_path / "p.npy"), image, rtol=1e-6, atol=1e-6)


def test_uint8_image_is_normalised_per_tile():
    image = np.random.default_rng(3).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    res = tiling.predict_tiled(_identity_fn(), image, tile=16, overlap=0.25, mean=mean, std=std)
    want = (image / 255.0 - np.asarray(mean)) / np.asarray(std)
    np.testing.assert_allclose(res, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pad", tiling.PADS)
def test_edge_tiles_are_padded_not_resized(pad):
    image = np.random.default_rng(4).random((20, 30, 1)).astype(np.float32)
    calls = []
    tiling.predict_tiled(_identity_fn(calls), image, tile=16, overlap=0.0, tile_batch=1, pad=pad)
    tiles = np.concatenate(calls)
    assert tiles.shape == (4, 16, 16, 1)  # grid rows 0, 16; cols 0, 16
    last = tiles[3]  # rows 16..31 (image has 20), cols 16..31 (image has 30)
    np.testing.assert_array_equal(last[:4, :14], image[16:20, 16:30])
    if pad == "reflect":
        np.testing.assert_array_equal(last[4:, :14], image[18:6:-1, 16:30])  # row 20 -> 18, 21 -> 17, ...
        np.testing.assert_array_equal(last[:4, 14:], image[16:20, 28:26:-1])
    else:
        assert not last[4:].any() and not last[:, 14:].any()


def test_band_accumulator_does_not_grow_with_the_image_height():
    seen = {}
    for height in (64, 640):
        image = np.zeros((height, 48, 2), np.float32)
        stats = {}
        tiling.predict_tiled(_identity_fn(), image, tile=32, overlap=0.25, tile_batch=3, stats=stats)
        assert stats["band_rows"] == 32 and stats["step"] == (24, 24)
        assert stats["max_rows_held"] == 32 and stats["grid"][0] == -(-(height - 32) // 24) + 1
        assert stats["accumulator_bytes"] == 32 * 48 * (2 + 1) * 4
        seen[height] = stats["accumulator_bytes"]
    assert seen[64] == seen[640]


def test_errors_are_one_line_with_a_fix():
    image = np.zeros((100, 150, 3), np.float32)
    fn = _identity_fn()
    with pytest.raises(SegjaxError, match=r"tile 128x128 is larger than the image 100x150; .* e\.g\. 96x128"):
        tiling.predict_tiled(fn, image, tile=128, output_stride=32)
    for bad in (1.0, 1.5, -0.1, float("nan")):
        with pytest.raises(SegjaxError, match=r"overlap .*\[0, 1\)"):
            tiling.predict_tiled(fn, image, tile=64, overlap=bad)
    with pytest.raises(SegjaxError, match=r"tile 50x60 is not a multiple of the model's output stride 16; "
                                          r"use 48x48 or 64x64"):
        tiling.predict_tiled(fn, image, tile=(50, 60), output_stride=16)
    with pytest.raises(SegjaxError, match="margin"):
        tiling.predict_tiled(fn, image, tile=64, overlap=0.25, margin=8)
    with pytest.raises(SegjaxError, match="out has shape"):
        tiling.predict_tiled(fn, image, tile=64, out=np.zeros((100, 149, 3), np.float32))
    with pytest.raises(SegjaxError, match="returned 3 channels but num_classes / out say 4"):
        tiling.predict_tiled(fn, image, tile=64, out=np.zeros((100, 150, 4), np.float32))
    with pytest.raises(SegjaxError, match="probs_fn returned shape"):
        tiling.predict_tiled(lambda x: x[:, ::2], image, tile=64)
    with pytest.raises(SegjaxError, match="window"):
        tiling.predict_tiled(fn, image, tile=64, window="box")


def test_step_is_aligned_to_the_output_stride():
    plan = tiling.plan_tiles((1000, 1000), 512, overlap=0.3, output_stride=32)
    assert plan["step"] == (352, 352) and plan["overlap"] == (160, 160)  # 512 - 154 = 358 -> 352
    assert plan["rows"][-1] + 512 >= 1000 and plan["rows"][-2] + 512 < 1000


def test_band_accumulator_hands_back_each_row_once_in_order():
    """Like a metric's update / compute: rows come back as soon as no later tile can reach them."""
    plan = tiling.plan_tiles((40, 20), 16, overlap=0.25, margin=1)  # step 12: rows 0, 12, 24
    assert plan["rows"] == [0, 12, 24] and plan["cols"] == [0, 12]
    acc = tiling.BandAccumulator(plan, (40, 20), channels=2, window="linear")
    released, bands = [], []
    for y0 in plan["rows"]:
        for x0 in plan["cols"]:
            tile = np.zeros((16, 16, 2), np.float32)
            tile[..., 0] = y0 + np.arange(16)[:, None]  # the image row, whichever tile predicts it
            acc.add(tile, (y0, x0))
            done = acc.finished_rows()
            if done is not None:
                released.append(((y0, x0), done[0], len(done[1])))
                bands.append(done[1])
    # The first tile of a row of tiles finishes the rows above it; the grid's last tile finishes the rest.
    assert released == [((12, 0), 0, 12), ((24, 0), 12, 12), ((24, 12), 24, 16)]
    assert acc.finished_rows() is None
    probs = np.concatenate(bands)
    np.testing.assert_allclose(probs[..., 0], np.broadcast_to(np.arange(40.0)[:, None], (40, 20)), atol=1e-4)
    with pytest.raises(ValueError, match="raster order"):
        acc.add(np.zeros((16, 16, 2), np.float32), (24, 12))


class _RowsOnly:
    """An image that only hands out row slices, as segjax.imagefiles.TiffRows does."""
    def __init__(self, array):
        self.array, self.shape, self.ndim, self.reads = array, array.shape, array.ndim, []

    def __getitem__(self, rows):
        assert isinstance(rows, slice)
        self.reads.append((rows.start, rows.stop))
        return self.array[rows]


def test_tiles_are_read_one_row_of_tiles_at_a_time():
    image = np.random.default_rng(6).integers(0, 256, (45, 50, 3), dtype=np.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    want = tiling.predict_tiled(_identity_fn(), image, tile=16, overlap=0.25, mean=mean, std=std)
    rows_only = _RowsOnly(image)
    bands = list(tiling.iter_tiled_probs(_identity_fn(), rows_only, tile=16, overlap=0.25, mean=mean, std=std))
    # Rows of tiles start at 0, 12, 24, 36; the last reaches row 51 and reflects rows 45..51 to 43..37.
    assert rows_only.reads == [(0, 16), (12, 28), (24, 40), (36, 45)]  # one read per row of tiles
    assert [(top, len(b)) for top, b in bands] == [(0, 12), (12, 12), (24, 21)]  # tile_batch 4 = a row
    np.testing.assert_array_equal(np.concatenate([b for _, b in bands]), want)


def test_bilinear_unet_depends_on_the_tile_everywhere():
    """align_corners=True resizes place their samples by the map's size, so the bilinear UNet is not
    translation-equivariant: its tiled result differs from whole-image inference far from any border,
    well beyond float rounding (docs/tiling.md quotes this bound), while the transposed-convolution
    UNet's agrees to 1e-5 (test_unet_tiled_equals_whole_image_in_the_interior)."""
    m = models.create("unet", num_classes=3, base_channels=4, bilinear=True)
    v = analysis.init_variables(m, (64, 64))
    probs_fn = jax.jit(lambda x: jax.nn.softmax(m.apply(v, x, train=False)["out"], -1))
    image = np.random.default_rng(7).normal(size=(192, 192, 3)).astype(np.float32)
    whole = np.asarray(probs_fn(image[None]))[0]
    tiled = tiling.predict_tiled(probs_fn, image, tile=128, overlap=0.5, tile_batch=4, output_stride=16)
    assert np.abs(tiled - whole)[16:-16, 16:-16].max() > 1e-2
