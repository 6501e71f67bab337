"""The shared blocks in segjax.nn against PyTorch's own ops, on random data."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segjax import nn as snn


def to_nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x))).permute(0, 3, 1, 2)


def to_nhwc(t):
    return t.detach().permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(0).standard_normal((2, 7, 9, 3)).astype(np.float32)


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("size", [(13, 4), (7, 9), (3, 20), (1, 1), (29, 31)])
def test_bilinear_resize_matches_torch(x, size, align_corners):
    ours = snn.resize(jnp.asarray(x), size, align_corners=align_corners)
    ref = to_nhwc(F.interpolate(to_nchw(x), size=size, mode="bilinear", align_corners=align_corners))
    assert ours.shape == ref.shape
    np.testing.assert_allclose(np.asarray(ours), ref, atol=5e-6)


def test_nearest_resize_matches_torch(x):
    for size in [(13, 4), (3, 20), (14, 18)]:
        ours = snn.resize(jnp.asarray(x), size, method="nearest")
        np.testing.assert_array_equal(np.asarray(ours), to_nhwc(F.interpolate(to_nchw(x), size=size, mode="nearest")))


def test_resize_rejects_unknown_method(x):
    with pytest.raises(ValueError, match="bicubic"):
        snn.resize(jnp.asarray(x), (4, 4), method="bicubic")


@pytest.mark.parametrize("kernel,stride,padding", [(2, 2, 0), (3, 2, 1), (3, 1, 1), (3, 2, 0)])
@pytest.mark.parametrize("ceil_mode", [False, True])
def test_max_pool_matches_torch(x, kernel, stride, padding, ceil_mode):
    ours = snn.max_pool2d(jnp.asarray(x), kernel, stride, padding, ceil_mode=ceil_mode)
    ref = to_nhwc(F.max_pool2d(to_nchw(x), kernel, stride, padding, ceil_mode=ceil_mode))
    assert ours.shape == ref.shape
    np.testing.assert_array_equal(np.asarray(ours), ref)


def test_resize_and_pools_take_symbolic_sizes():
    """Under jax.export with free H, W (the export of every resizing model) resize builds its tables
    in the program and the ceil-mode pools pad by a constant: the same numbers as concrete sizes."""
    def fn(v):
        h, w = v.shape[1:3]
        up = snn.resize(v, (2 * h + 1, w), align_corners=False)
        corners = snn.resize(v, (h + 3, 3 * w), align_corners=True)
        nearest = snn.resize(v, (2 * h, w + 5), method="nearest")
        pooled = snn.max_pool2d(v, 3, 2, 1, ceil_mode=True) + snn.max_pool2d(v, 2, 2, ceil_mode=True)[:, :1, :1]
        return up, corners, nearest, snn.resize(pooled, (h, w))

    spec = jax.ShapeDtypeStruct(jax.export.symbolic_shape("b, h, w, 3"), jnp.float32)
    exported = jax.export.export(jax.jit(fn))(spec)
    for hw in [(7, 9), (5, 2), (12, 13)]:
        v = np.random.default_rng(hw[0]).standard_normal((2, *hw, 3)).astype(np.float32)
        for got, want in zip(exported.call(v), jax.jit(fn)(v)):
            assert got.shape == want.shape
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5)


def _torch_input_grad(fn, x, cotangent):
    t = to_nchw(x).clone().requires_grad_(True)
    (fn(t) * to_nchw(cotangent)).sum().backward()
    return to_nhwc(t.grad)


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("size", [(13, 4), (29, 31), (3, 20)])
def test_bilinear_resize_gradient_matches_torch(x, size, align_corners):
    """The backward is a matmul with the interpolation matrix (not autodiff's scatter-add)."""
    g = np.random.default_rng(1).standard_normal((2, *size, 3)).astype(np.float32)
    ours = jax.grad(lambda v: jnp.sum(snn.resize(v, size, align_corners=align_corners) * g))(jnp.asarray(x))
    ref = _torch_input_grad(lambda t: F.interpolate(t, size=size, mode="bilinear", align_corners=align_corners), x, g)
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-5)


@pytest.mark.parametrize("ceil_mode", [False, True])
def test_max_pool_gradient_matches_torch(x, ceil_mode):
    """UNet's and U2-Net's 2x2/2 pools: the gradient goes to each window's maximum, as in torch."""
    out_h, out_w = (4, 5) if ceil_mode else (3, 4)
    g = np.random.default_rng(2).standard_normal((2, out_h, out_w, 3)).astype(np.float32)
    ours = jax.grad(lambda v: jnp.sum(snn.max_pool2d(v, 2, 2, ceil_mode=ceil_mode) * g))(jnp.asarray(x))
    ref = _torch_input_grad(lambda t: F.max_pool2d(t, 2, 2, ceil_mode=ceil_mode), x, g)
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-6)


@pytest.mark.parametrize("size", [(1, 1), (3, 4), (7, 9), (2, 5)])
def test_adaptive_avg_pool_matches_torch(x, size):
    ours = snn.adaptive_avg_pool2d(jnp.asarray(x), size)
    np.testing.assert_allclose(np.asarray(ours), to_nhwc(F.adaptive_avg_pool2d(to_nchw(x), size)), atol=1e-6)


@pytest.mark.parametrize("kernel,stride,padding,output_padding,dilation",
                         [(4, 2, 1, 0, 1), (2, 2, 0, 0, 1), (3, 2, 1, 1, 1), (16, 8, 4, 0, 1), (3, 1, 2, 0, 2)])
def test_conv_transpose_matches_torch(x, kernel, stride, padding, output_padding, dilation):
    layer = snn.ConvTranspose(5, kernel, stride, padding, output_padding, dilation)
    variables = layer.init(jax.random.PRNGKey(0), jnp.asarray(x))
    ref = torch.nn.ConvTranspose2d(3, 5, kernel, stride, padding, output_padding, dilation=dilation)
    with torch.no_grad():  # torch's (in, out, kh, kw) = our (kh, kw, out, in) transposed back
        ref.weight.copy_(torch.from_numpy(np.asarray(variables["params"]["kernel"]).transpose(3, 2, 0, 1).copy()))
        ref.bias.copy_(torch.from_numpy(np.asarray(variables["params"]["bias"]).copy()))
    ours = layer.apply(variables, jnp.asarray(x))
    expected = to_nhwc(ref(to_nchw(x)))
    assert ours.shape == expected.shape
    assert ours.shape[1] == snn.conv_transpose_output_size(7, kernel, stride, padding, output_padding, dilation)
    np.testing.assert_allclose(np.asarray(ours), expected, atol=2e-5)


@pytest.mark.parametrize("kernel,stride,padding,dilation,groups", [(3, 2, 1, 1, 1), (3, 1, 2, 2, 1), (1, 1, 0, 1, 1),
                                                                    (3, 2, 1, 1, 3), (7, 2, 3, 1, 1)])
def test_conv2d_matches_torch_padding(x, kernel, stride, padding, dilation, groups):
    layer = snn.conv2d(6, kernel, stride, padding, dilation, groups, use_bias=True)
    variables = layer.init(jax.random.PRNGKey(1), jnp.asarray(x))
    ref = torch.nn.Conv2d(3, 6, kernel, stride, padding, dilation, groups)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(np.asarray(variables["params"]["kernel"]).transpose(3, 2, 0, 1).copy()))
        ref.bias.copy_(torch.from_numpy(np.asarray(variables["params"]["bias"]).copy()))
    np.testing.assert_allclose(np.asarray(layer.apply(variables, jnp.asarray(x))), to_nhwc(ref(to_nchw(x))), atol=2e-5)


def test_batchnorm_train_and_eval_match_torch(x):
    bn = snn.BatchNorm(momentum=0.9, epsilon=1e-5)
    variables = bn.init(jax.random.PRNGKey(0), jnp.asarray(x))
    ref = torch.nn.BatchNorm2d(3, momentum=0.1, eps=1e-5)
    for step in range(3):  # running stats after several updates, unbiased variance included
        batch = x * (step + 1) + step
        y, updates = bn.apply(variables, jnp.asarray(batch), train=True, mutable=["batch_stats"])
        variables = {**variables, **updates}
        ref.train()
        expected = to_nhwc(ref(to_nchw(batch)))
        np.testing.assert_allclose(np.asarray(y), expected, atol=2e-5)
    np.testing.assert_allclose(np.asarray(variables["batch_stats"]["mean"]), ref.running_mean.numpy(), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(variables["batch_stats"]["var"]), ref.running_var.numpy(), rtol=1e-5)
    ref.eval()
    np.testing.assert_allclose(np.asarray(bn.apply(variables, jnp.asarray(x), train=False)),
                               to_nhwc(ref(to_nchw(x))), atol=2e-5)


def test_batchnorm_axis_name_gives_global_statistics(x):
    """Two replicas with cross-replica BN == one device seeing the whole batch."""
    bn = snn.BatchNorm(axis_name="batch")
    variables = bn.init(jax.random.PRNGKey(0), jnp.asarray(x))
    whole, whole_upd = snn.BatchNorm().apply(variables, jnp.asarray(x), train=True, mutable=["batch_stats"])

    def per_replica(xs):
        return bn.apply(variables, xs, train=True, mutable=["batch_stats"])

    split, split_upd = jax.vmap(per_replica, axis_name="batch")(jnp.asarray(x).reshape(2, 1, 7, 9, 3))
    np.testing.assert_allclose(np.asarray(split).reshape(x.shape), np.asarray(whole), atol=1e-5)
    np.testing.assert_allclose(np.asarray(split_upd["batch_stats"]["var"][0]),
                               np.asarray(whole_upd["batch_stats"]["var"]), rtol=1e-5)


def test_batchnorm_bf16_compute_keeps_fp32_params_and_stats(x):
    bn = snn.BatchNorm(dtype=jnp.bfloat16)
    variables = bn.init(jax.random.PRNGKey(0), jnp.asarray(x))
    y, upd = bn.apply(variables, jnp.asarray(x), train=True, mutable=["batch_stats"])
    assert y.dtype == jnp.bfloat16
    assert variables["params"]["scale"].dtype == jnp.float32
    assert upd["batch_stats"]["var"].dtype == jnp.float32


def test_bilinear_kernel_is_channel_diagonal_and_interpolates():
    k = snn.bilinear_upsample_kernel(4, 2)
    assert k.shape == (4, 4, 2, 2)
    assert np.all(k[:, :, 0, 1] == 0) and np.all(k[:, :, 1, 0] == 0)
    np.testing.assert_allclose(k[:, :, 0, 0], np.outer([0.25, 0.75, 0.75, 0.25], [0.25, 0.75, 0.75, 0.25]))
