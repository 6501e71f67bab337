"""segjax.crf: the lattice filter against the exact dense Gaussians, what the mean field does, jit / vmap,
bad input, and `segjax eval | predict --crf` with a tiny model. (Agreement with pydensecrf itself, which
needs a C++ build, is measured by experiments/crf_vs_pydensecrf.py and recorded in docs/crf.md.)"""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from segjax import probmaps, checkpoint, cli, crf
from segjax.errors import SegjaxError
from tests import tiny_model


def jitted(fn, image, probs, **kw):
    """fn(image, probs, **kw) compiled whole: one compile instead of eager op-by-op dispatch (test time)."""
    return np.asarray(jax.jit(functools.partial(fn, **kw))(image, probs))


def smooth_image(h, w, seed=0):
    """Colour ramps plus noise: neighbouring pixels alike, as in a photograph."""
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    base = np.stack([xx * 200 / w, yy * 200 / h, (xx + yy) * 120 / (h + w)], -1)
    noise = np.random.default_rng(seed).normal(0, 6, (h, w, 3))
    return np.clip(np.rint(base + noise + 20), 0, 255).astype(np.uint8)


def random_probs(h, w, c, seed=0, temperature=2.0):
    logits = np.random.default_rng(seed).normal(size=(h, w, c)).astype(np.float32) * temperature
    return np.asarray(jax.nn.softmax(logits, -1))


# (xy std, rgb std or None, bound on the relative L2 error); measured 0.017, 0.032, 0.043, 0.085: the lattice's
# [1 2 1] blur on its coarse grid is not exactly a Gaussian (pydensecrf's own approximation, docs/crf.md).
@pytest.mark.parametrize("xy_std, rgb_std, bound", [(2.0, None, 0.025), (1.0, None, 0.045), (10.0, 13.0, 0.06),
                                                    (67.0, 3.0, 0.12)])
def test_lattice_filter_is_close_to_the_exact_gaussian(xy_std, rgb_std, bound):
    # 30x26 pixels; the normalised filter (n K n Q, what the mean field uses) on random probabilities.
    h, w, c = 30, 26, 4
    features = crf._pixel_grid(h, w, xy_std)
    if rgb_std is not None:
        features = jnp.concatenate([features, crf._colours(jnp.asarray(smooth_image(h, w)), rgb_std)], axis=1)
    q = jnp.asarray(random_probs(h, w, c).reshape(-1, c))
    relative = lattice_error(features, q)
    assert relative < bound, relative


@jax.jit  # compiled whole: one compile instead of an eager dispatch per op
def lattice_error(features, q):
    """Relative L2 distance of the lattice's normalised filter from the exact Gaussian's."""
    lattice, exact = crf._lattice_kernel(features)(q), crf._exact_kernel(features)(q)
    return jnp.linalg.norm(lattice - exact) / jnp.linalg.norm(exact)


@pytest.mark.parametrize("xy_std, rgb_std, bound", [(10.0, 13.0, 0.025), (3.0, 5.0, 0.045)])
def test_lattice_filter_on_a_flat_image(xy_std, rgb_std, bound):
    # one colour: many pixels share lattice points and the lattice's lines are long (measured 0.015, 0.028)
    h, w, c = 30, 26, 4
    features = jnp.concatenate([crf._pixel_grid(h, w, xy_std),
                                crf._colours(jnp.full((h, w, 3), 90, jnp.uint8), rgb_std)], axis=1)
    q = jnp.asarray(random_probs(h, w, c).reshape(-1, c))
    assert float(lattice_error(features, q)) < bound


@pytest.mark.parametrize("std", [0.5, 1.0, 3.0])
def test_the_smoothness_kernel_is_the_exact_gaussian(std):
    # the pixel-grid kernel is separable: truncated at 4 std (concrete std) or dense (traced std)
    h, w, c = 30, 26, 4
    q = jnp.asarray(random_probs(h, w, c).reshape(-1, c))
    exact = crf._exact_kernel(crf._pixel_grid(h, w, std))(q)
    np.testing.assert_allclose(crf._separable_kernel(h, w, std)(q), exact, atol=2e-5)
    traced = jax.jit(lambda s: crf._separable_kernel(h, w, s)(q))(std)
    np.testing.assert_allclose(traced, exact, atol=2e-6)


def test_the_radix_sort_orders_rows_as_a_stable_lexicographic_sort():
    # 1,000 rows leave 54 bits per pass: a 1 + 5 x 16 = 81-bit key takes two passes, one field split between
    # them; few distinct values in the leading fields, so the later fields and the row order decide ties
    rng = np.random.default_rng(0)
    fields = [rng.integers(0, 2, 1000)] + [rng.integers(0, 3, 1000) for _ in range(2)]
    fields += [rng.integers(0, 1 << 16, 1000) for _ in range(2)] + [rng.integers(0, 4, 1000)]
    fields = [jnp.asarray(f, jnp.uint32) for f in fields]
    order = jax.jit(lambda fs: crf._sort_order(fs, widths=[1]))(fields)
    expected = np.lexsort([np.arange(1000)] + [np.asarray(f) for f in fields[::-1]])
    np.testing.assert_array_equal(order, expected)


def test_column_groups_filter_each_column_as_one_chain_does():
    # lattice_filter splits 20 columns into groups (two on a 2-core CPU); columns never mix, so they agree to
    # float rounding (the slice's vectorised sum may round a column's last bit differently by group width)
    features = jnp.concatenate([crf._pixel_grid(12, 10, 5.0), crf._colours(jnp.asarray(smooth_image(12, 10)), 9.0)],
                               axis=1)
    values = jnp.asarray(np.random.default_rng(1).random((120, 20), np.float32))

    @jax.jit
    def both(features, values):
        lattice = crf.build_lattice(features)
        return crf.lattice_filter(lattice, values), crf._lattice_filter_chain(lattice, values)
    grouped, single = both(features, values)
    np.testing.assert_allclose(grouped, single, rtol=1e-6, atol=1e-7)


def test_lattice_crf_labels_agree_with_the_exact_crf():
    h, w, c = 32, 28, 5
    image, probs = smooth_image(h, w, 1), random_probs(h, w, c, 1)
    lattice = jitted(crf.dense_crf, image, probs).argmax(-1)
    exact = jitted(crf.dense_crf_exact, image, probs).argmax(-1)
    assert (lattice == exact).mean() >= 0.97


def two_regions(h=40, w=48, seed=0):
    """Left half dark red, right half light blue; unaries right at 65% of pixels, the rest wrong at random."""
    rng = np.random.default_rng(seed)
    truth = (np.arange(w)[None, :] >= w // 2).repeat(h, 0).astype(np.int64)
    image = np.where(truth[..., None] == 0, [120, 30, 30], [90, 160, 220]).astype(np.float64)
    image = np.clip(np.rint(image + rng.normal(0, 8, image.shape)), 0, 255).astype(np.uint8)
    noisy = np.where(rng.random((h, w)) < 0.35, rng.integers(0, 3, (h, w)), truth)
    probs = np.full((h, w, 3), 0.2, np.float32)
    np.put_along_axis(probs, noisy[..., None], 0.6, axis=-1)
    return image, probs, truth


def test_crf_recovers_a_two_region_image_from_noisy_unaries():
    image, probs, truth = two_regions()
    before = (probs.argmax(-1) == truth).mean()
    after = (jitted(crf.dense_crf, image, probs, bi_xy_std=20.0, bi_rgb_std=10.0).argmax(-1) == truth).mean()
    assert before < 0.8 and after >= 0.98, (before, after)


def test_class_order_does_not_matter():
    image, probs = smooth_image(24, 20, 2), random_probs(24, 20, 6, 2)
    order = np.array([3, 0, 5, 1, 4, 2])
    plain = jitted(crf.dense_crf, image, probs, iterations=3)
    permuted = jitted(crf.dense_crf, image, probs[..., order], iterations=3)
    np.testing.assert_allclose(permuted, plain[..., order], atol=1e-6)


def test_jit_and_vmap_give_the_plain_call():
    images = np.stack([smooth_image(18, 22, s) for s in range(2)])
    probs = np.stack([random_probs(18, 22, 4, s) for s in range(2)])
    kw = dict(iterations=3, bi_xy_std=30.0, bi_rgb_std=8.0)
    plain = np.asarray(crf.dense_crf(images[0], probs[0], **kw))  # eager, op by op: one image is enough
    single = jax.jit(lambda i, p: crf.dense_crf(i, p, **kw))
    jitted = np.stack([np.asarray(single(i, p)) for i, p in zip(images, probs)])
    batched = np.asarray(jax.jit(jax.vmap(lambda i, p: crf.dense_crf(i, p, **kw)))(images, probs))
    np.testing.assert_allclose(jitted[0], plain, atol=2e-5)
    np.testing.assert_allclose(batched, jitted, atol=2e-5)
    assert np.abs(jitted[1] - jitted[0]).max() > 0.1  # two different images: the batch is not one image twice
    # traced parameters (one compile for any values) give the same numbers up to XLA's division rounding
    traced = jax.jit(lambda i, p, s: crf.dense_crf(i, p, iterations=3, bi_xy_std=s, bi_rgb_std=8.0))
    assert (np.asarray(traced(images[0], probs[0], 30.0)).argmax(-1) == plain.argmax(-1)).mean() > 0.99


def test_vmap_refines_one_image_at_a_time_on_cpu_and_batches_elsewhere(monkeypatch):
    images = np.stack([smooth_image(14, 12, s) for s in range(3)])
    probs = np.stack([random_probs(14, 12, 3, s) for s in range(3)])
    refine = functools.partial(crf.dense_crf, iterations=2, bi_xy_std=30.0, bi_rgb_std=8.0)
    single = jax.jit(refine).lower(images[0], probs[0]).compile()
    mapped = jax.jit(jax.vmap(refine, in_axes=(None, 0))).lower(images[0], probs).compile()  # one image, 3 probs
    expected = np.stack([np.asarray(single(images[0], p)) for p in probs])
    np.testing.assert_allclose(mapped(images[0], probs), expected, atol=1e-6)
    # one image's buffers at a time: a batch of 3 at once would need about 3 times the temporaries
    assert mapped.memory_analysis().temp_size_in_bytes < 1.5 * single.memory_analysis().temp_size_in_bytes
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # the other backends' rule: the plain vmap
    batched = jax.jit(jax.vmap(refine)).lower(images, probs).compile()
    assert batched.memory_analysis().temp_size_in_bytes > 2 * single.memory_analysis().temp_size_in_bytes
    np.testing.assert_allclose(batched(images, probs), np.stack([single(i, p) for i, p in zip(images, probs)]),
                               atol=2e-5)


def test_the_sum_over_classes_stays_one_and_a_zero_weight_kernel_is_off():
    image, probs = smooth_image(16, 16), random_probs(16, 16, 3)
    out = jitted(crf.dense_crf, image, probs, iterations=2)
    np.testing.assert_allclose(out.sum(-1), 1.0, atol=1e-5)
    unary_only = jitted(crf.dense_crf, image, probs, pos_w=0.0, bi_w=0.0)
    clipped = np.clip(probs, crf.UNARY_CLIP, 1.0)
    np.testing.assert_allclose(unary_only, clipped / clipped.sum(-1, keepdims=True), atol=1e-6)


@pytest.mark.parametrize("image, probs, kw, message", [
    (np.zeros((8, 8, 3), np.uint8), np.full((8, 9, 2), 0.5, np.float32), {}, "probabilities of shape (8, 9, 2)"),
    (np.zeros((8, 8, 3), np.float32), np.full((8, 8, 2), 0.5, np.float32), {}, "dtype float32"),
    (np.zeros((8, 8), np.uint8), np.full((8, 8, 2), 0.5, np.float32), {}, "np.repeat"),
    (np.zeros((8, 8, 4), np.uint8), np.full((8, 8, 2), 0.5, np.float32), {}, "img[..., :3]"),
    (np.zeros((8, 8, 3), np.uint8), np.full((8, 8, 1), 0.5, np.float32), {}, "np.stack([1 - p, p], -1)"),
    (np.zeros((8, 8, 3), np.uint8), np.full((8, 8, 2), 0.5, np.float32), {"bi_rgb_std": 0}, "bi_rgb_std=0"),
    (np.zeros((8, 8, 3), np.uint8), np.full((8, 8, 2), 0.5, np.float32), {"pos_xy_std": -1.0}, "pos_xy_std=-1.0"),
    (np.zeros((8, 8, 3), np.uint8), np.full((8, 8, 2), 0.5, np.float32), {"iterations": 0}, "iterations=0"),
    (np.zeros((8, 8, 3), np.uint8), np.full((8, 8, 2), 0.5, np.float32), {"bi_w": -2.0}, "bi_w=-2.0"),
])
def test_bad_input_is_one_error_naming_the_value(image, probs, kw, message):
    with pytest.raises(SegjaxError) as e:
        crf.dense_crf(image, probs, **kw)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_checkpoint_values_then_overrides():
    assert crf.resolve_params() == {**crf.DEFAULTS, "iterations": 10}
    assert crf.resolve_params(crf.LARGEFOV_PORT, bi_w=2)["bi_w"] == 2.0
    assert crf.resolve_params(crf.LARGEFOV_PORT)["bi_xy_std"] == 140.0
    with pytest.raises(SegjaxError, match="bi_xy_std=0"):
        crf.resolve_params(None, bi_xy_std=0)


def test_the_reproductions_layouts_carry_their_crf_values():
    from segjax import convert
    v2 = convert.layout_for("deeplabv2_resnet101", {"base.layer1.conv1.conv.weight": 0})
    v1 = convert.layout_for("deeplabv1_largefov_vgg16", {"features.38.weight": 0, "features.32.weight": 0})
    assert v2.crf == crf.DEFAULTS and v2.reference == "kazuto1011/deeplab-pytorch"
    assert (v1.crf["bi_w"], v1.crf["bi_xy_std"], v1.crf["bi_rgb_std"], v1.crf["pos_xy_std"]) == (5, 140, 5, 3)
    assert convert.layout_for("deeplabv3plus_resnet50").crf is None


# ------------------------------------------------------------------------------------- CLI

@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A randomly initialised tiny model saved as a converted checkpoint that names the synthetic data set."""
    root = tmp_path_factory.mktemp("crf_cli")
    model = tiny_model.TinySeg(num_classes=5, features=4)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 24, 24, 3)), train=False)
    data_options = {"image_size": 24, "num_train": 4, "num_val": 3}
    meta = {"model": tiny_model.NAME, "model_kwargs": {"features": 4}, "num_classes": 5, "dataset": "synthetic",
            "config": {"data_options": data_options, "data_dir": str(root / "data")},
            "crf": {**crf.DEFAULTS, "iterations": 2}}
    checkpoint.save_variables(str(root / "ckpt"), jax.device_get(variables), meta)
    return root


def test_eval_with_crf_says_so_with_the_checkpoints_values_and_overrides(tiny_checkpoint, capsys):
    ckpt = str(tiny_checkpoint / "ckpt")
    # iterations from the checkpoint's segjax.json, bi_w from the flag, the rest the defaults
    assert cli.main(["eval", "--checkpoint", ckpt, "--crf", "--crf-bi-w", "5", "--multi-scale", "--flip"]) == 0
    out = capsys.readouterr().out
    assert "CRF on: iterations=2 pos_w=3 pos_xy_std=1 bi_w=5 bi_xy_std=67 bi_rgb_std=3" in out and "mIoU" in out
    assert cli.main(["eval", "--checkpoint", ckpt, "--crf-bi-w", "2"]) == 2
    assert "without --crf" in capsys.readouterr().err
    assert cli.main(["eval", "--checkpoint", ckpt, "--crf", "--crf-bi-xy-std", "0"]) == 2
    assert "bi_xy_std=0.0" in capsys.readouterr().err
    assert cli.main(["eval", "--checkpoint", ckpt, "--crf", "--tile", "16", "16"]) == 2
    assert "drop --tile" in capsys.readouterr().err


def test_predict_with_crf_writes_the_refined_masks_and_probabilities(tiny_checkpoint, tmp_path, capsys):
    ckpt = str(tiny_checkpoint / "ckpt")
    path = tmp_path / "photo.png"
    image = smooth_image(20, 26, 3)
    Image.fromarray(image).save(path)
    plain, refined = tmp_path / "plain", tmp_path / "refined"
    assert cli.main(["predict", "--checkpoint", ckpt, str(path), "--out", str(plain), "--save-probs"]) == 0
    assert cli.main(["predict", "--checkpoint", ckpt, str(path), "--out", str(refined), "--save-probs", "--crf",
                     "--crf-iterations", "3"]) == 0
    before = probmaps.load_probs(str(plain / "photo_probs.npy"))[0].astype(np.float32)
    after = probmaps.load_probs(str(refined / "photo_probs.npy"))[0].astype(np.float32)
    expected = jitted(crf.dense_crf, image, before, iterations=3)
    np.testing.assert_allclose(after, expected, atol=2e-3)  # float16 files
    assert (np.asarray(Image.open(refined / "photo.png")) == expected.argmax(-1)).mean() > 0.99
    bad = tmp_path / "nothing"
    assert cli.main(["predict", "--checkpoint", ckpt, str(path), "--out", str(bad), "--crf", "--tile", "16", "16"]) == 2
    assert "--tile" in capsys.readouterr().err and not bad.exists()


def test_crf_on_a_saliency_model_is_refused(tmp_path, capsys):
    from segjax import models
    model = models.create("u2netp", 1)
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False))
    variables = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), variables)
    checkpoint.save_variables(str(tmp_path / "sal"), variables, {"model": "u2netp", "num_classes": 1})
    path = tmp_path / "photo.png"
    Image.fromarray(smooth_image(16, 16)).save(path)
    out = tmp_path / "out"
    assert cli.main(["predict", "--checkpoint", str(tmp_path / "sal"), str(path), "--out", str(out), "--crf"]) == 2
    err = capsys.readouterr().err
    assert "saliency model" in err and len(err.strip().splitlines()) == 1 and not out.exists()
    assert json.load(open(tmp_path / "sal" / "segjax.json"))["model"] == "u2netp"
