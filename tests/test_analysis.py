"""segjax.analysis: the seed claims about convolutions, and the measurements behind `segjax inspect`."""
import contextlib
import io
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from segjax import analysis, models
from segjax import nn as snn


def shapes_of(module, x_shape):
    return analysis.abstract_variables(module, x_shape[1:3], channels=x_shape[3])


class Stack(nn.Module):
    """Convolutions in sequence, each (kernel, stride, dilation); bias-free."""
    layers: tuple
    features: int = 8

    @nn.compact
    def __call__(self, x, train=False):
        for i, (k, s, d) in enumerate(self.layers):
            x = nn.relu(snn.conv2d(self.features, k, stride=s, dilation=d, name=str(i))(x))
        return x


def theoretical_rf(layers):
    rf, jump = 1, 1
    for k, s, d in layers:
        rf += d * (k - 1) * jump
        jump *= s
    return rf


# ------------------------------------------------------------------------------ seed claims

def test_three_3x3_convs_see_7x7_with_27c2_params_against_49c2():
    c = 16
    three = Stack(((3, 1, 1),) * 3, features=c)
    one = Stack(((7, 1, 1),), features=c)
    assert analysis.param_count(shapes_of(three, (1, 16, 16, c))) == 27 * c * c
    assert analysis.param_count(shapes_of(one, (1, 16, 16, c))) == 49 * c * c
    x_size = (21, 21)
    v3 = analysis.init_variables(three, x_size, channels=c)
    rf = analysis.receptive_field(lambda x: three.apply(v3, x), x_size, channels=c)
    assert (rf["height"], rf["width"], rf["clipped"]) == (7, 7, False)
    assert rf["box"] == (7, 7, 13, 13)


def test_bottleneck_params_against_plain_3x3():
    class Bottleneck(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            x = snn.conv2d(64, 1, name="conv1")(x)
            x = snn.conv2d(64, 3, name="conv2")(x)
            return snn.conv2d(256, 1, name="conv3")(x)

    plain = Stack(((3, 1, 1),), features=256)
    assert analysis.param_count(shapes_of(Bottleneck(), (1, 8, 8, 256))) == 69_632
    assert analysis.param_count(shapes_of(plain, (1, 8, 8, 256))) == 589_824


def test_transposed_conv_output_size_formula_matches_segjax_and_torch():
    import torch
    checked = 0
    for h, s, p, k in itertools.product((1, 4, 7), (1, 2, 3), (0, 1, 2), (1, 2, 3, 4)):
        expected = (h - 1) * s - 2 * p + k
        if expected <= 0:
            continue
        layer = snn.ConvTranspose(2, kernel_size=k, stride=s, padding=p)
        out = jax.eval_shape(lambda x: layer.init_with_output(jax.random.key(0), x)[0],
                             jax.ShapeDtypeStruct((1, h, h, 3), jnp.float32))
        ref = torch.nn.ConvTranspose2d(3, 2, k, stride=s, padding=p)(torch.zeros(1, 3, h, h))
        assert out.shape[1:3] == (expected, expected) == tuple(ref.shape[2:]), (h, s, p, k)
        assert snn.conv_transpose_output_size(h, k, s, p) == expected
        checked += 1
    assert checked > 80


@pytest.mark.parametrize("size,stride,padding", [(5, 2, 1), (6, 2, 1), (7, 3, 0)])
def test_conv_transpose_is_the_transposed_conv_matrix(size, stride, padding):
    cin, cout, k = 2, 3, 3
    kernel = jax.random.normal(jax.random.key(1), (k, k, cin, cout))  # forward conv HWIO
    x = jnp.zeros((1, size, size, cin))

    def conv(x):
        return jax.lax.conv_general_dilated(x, kernel, (stride, stride), ((padding, padding),) * 2,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    y_shape = jax.eval_shape(conv, x).shape
    matrix = jax.jacobian(conv)(x).reshape(np.prod(y_shape), x.size)  # y = M x
    y = jax.random.normal(jax.random.key(2), y_shape)

    # The converter stores ConvTranspose's kernel as the forward conv's HWIO kernel: pass it as is.
    output_padding = (size + 2 * padding - k) % stride
    layer = snn.ConvTranspose(cin, kernel_size=k, stride=stride, padding=padding,
                              output_padding=output_padding, use_bias=False)
    got = layer.apply({"params": {"kernel": kernel}}, y)
    want = (matrix.T @ y.reshape(-1)).reshape(x.shape)
    (via_linear_transpose,) = jax.linear_transpose(conv, x)(y)
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(got, via_linear_transpose, atol=1e-5)


def test_1x1_conv_is_a_per_pixel_dense_layer():
    conv = snn.conv2d(5, 1, use_bias=True)
    x = jax.random.normal(jax.random.key(0), (2, 6, 7, 4))
    v = conv.init(jax.random.key(1), x)
    kernel, bias = v["params"]["kernel"], v["params"]["bias"]
    dense = nn.Dense(5).apply({"params": {"kernel": kernel[0, 0], "bias": bias}}, x.reshape(-1, 4))
    np.testing.assert_allclose(conv.apply(v, x), dense.reshape(2, 6, 7, 5), atol=1e-6)


# ------------------------------------------------------------------------------ measurements

def test_receptive_field_of_a_strided_dilated_stack_is_exact():
    layers = ((3, 1, 1), (3, 2, 1), (3, 1, 2), (5, 2, 1), (1, 1, 1))
    stack = Stack(layers, features=6)
    size = (61, 61)
    v = analysis.init_variables(stack, size)
    rf = analysis.receptive_field(lambda x: stack.apply(v, x), size)
    assert theoretical_rf(layers) == 21
    assert (rf["height"], rf["width"], rf["clipped"]) == (21, 21, False)


class GlobalContext(nn.Module):
    """Local path (conv 3x3, stride 2) plus an image-pooling branch, as in ASPP / LR-ASPP."""
    num_classes: int = 4

    @nn.compact
    def __call__(self, x, train=False):
        local = nn.relu(snn.conv2d(8, 3, stride=2, padding=0, name="local")(x))  # valid conv: size offset
        pooled = snn.adaptive_avg_pool2d(local, 1)
        scale = nn.sigmoid(snn.conv2d(8, 1, name="scale")(pooled))
        y = snn.conv2d(self.num_classes, 1, name="classifier")(local * scale)
        return {"out": snn.resize(y, x.shape[1:3])}


def test_global_pooling_makes_the_field_whole_unless_cut():
    model = GlobalContext()
    size = (31, 31)  # 15 x 15 after the valid stride-2 conv; output pixel 15 resamples exactly row 7
    v = analysis.init_variables(model, size)
    full = analysis.model_receptive_field(model, v, size)
    local = analysis.model_receptive_field(model, v, size, local_only=True)
    assert (full["height"], full["width"], full["box"]) == (31, 31, (0, 0, 30, 30))
    assert (local["height"], local["width"], local["box"]) == (3, 3, (14, 14, 16, 16))


def test_output_stride_ignores_offsets_and_global_branches():
    assert analysis.output_stride(GlobalContext(), (40, 40), num_classes=4) == {"feature": 2, "logits": 2}
    stack = Stack(((3, 2, 1), (3, 2, 1), (3, 2, 1)))
    assert analysis.output_stride(stack, (48, 40))["feature"] == 8


def test_flops_convention_is_two_per_multiply_add():
    x = jax.ShapeDtypeStruct((1, 10, 10, 3), jnp.float32)
    w = jax.ShapeDtypeStruct((3, 3, 3, 5), jnp.float32)

    def conv(x, w, pad):
        return jax.lax.conv_general_dilated(x, w, (1, 1), ((pad, pad),) * 2, dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def valid(x, w):
        return conv(x, w, 0)

    def same(x, w):
        return conv(x, w, 1)

    macs_valid = 8 * 8 * 5 * 27
    assert analysis.analytic_flops(valid, x, w) == 2 * macs_valid
    assert analysis.xla_flops(valid, x, w) == 2 * macs_valid
    # With padding XLA skips the taps that land on zeros: 10 rows x 3 taps minus 2 in the pad, per axis.
    assert analysis.analytic_flops(same, x, w) == 2 * 10 * 10 * 5 * 27
    assert analysis.xla_flops(same, x, w) == 2 * (28 * 28) * 3 * 5


@pytest.mark.e2e  # `segjax inspect` through the CLI
def test_inspect_runs_end_to_end():
    """The verb's plumbing, on the test's tiny model (the zoo's own measurements are the unit tests above and
    each family's tests): conv3x3 then a 3x3 conv with dilation 2 see 7x7 pixels, at stride 1."""
    from segjax import cli
    from tests import tiny_model

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli.main(["inspect", tiny_model.NAME, "--size", "33", "33", "--num-classes", "3"]) == 0
    text = buf.getvalue()
    n = analysis.param_count(analysis.abstract_variables(models.create(tiny_model.NAME, num_classes=3), (33, 33)))
    assert f"parameters       {n:,}" in text
    assert "output stride    coarsest feature map 1" in text, text
    assert "receptive field  7x7 of the centre output pixel" in text, text
    assert "GFLOP/img" in text
