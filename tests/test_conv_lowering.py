"""The convolution primitives of segjax.nn: every lowering is exact, and `dense` leaves no dilated conv.

XLA runs window-dilated (atrous) and base-dilated (transposed) forward convolutions on its slow
path; the `dense` lowering (and `auto` on GPU/TPU) rewrites them as dense convolutions. These
tests check the rewrites against `lax.conv_general_dilated` (forward and both gradients), and
lower one registered model per family (see `family_representatives`) to StableHLO to check that no
dilated forward conv is left.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax import models
from segjax import nn as snn
from segjax.errors import SegjaxError

DILATE = re.compile(r"(lhs_dilate|rhs_dilate) = \[(\d+), (\d+)\]")


def reference_conv(x, kernel, stride, padding, dilation, groups):
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), ((padding, padding),) * 2,
                                        rhs_dilation=(dilation, dilation), feature_group_count=groups,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        precision=jax.lax.Precision.HIGHEST)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


# (H, W, kernel, dilation, stride, groups, channels): sizes that are not multiples of the rate,
# rates beyond the map (ASPP 24/36 on 16-33 px), depthwise dilated (MobileNetV3's last stage).
CASES = [(17, 23, 3, 2, 1, 1, 4), (16, 16, 3, 24, 1, 1, 4), (33, 21, 3, 36, 1, 1, 4), (9, 13, 3, 4, 1, 1, 4),
         (16, 16, 3, 12, 1, 1, 4), (7, 40, 3, 6, 1, 1, 4), (19, 17, 5, 2, 1, 8, 8), (19, 17, 3, 2, 1, 8, 8),
         (15, 16, 3, 2, 2, 1, 4), (19, 17, 5, 1, 2, 8, 8), (12, 11, 3, 1, 1, 1, 4), (12, 11, 1, 1, 1, 1, 4), (11, 13, 7, 1, 1, 1, 4)]


@pytest.fixture(params=["dense", "auto", "taps"])
def method(request, monkeypatch):
    """"taps": auto on CPU with the per-tap matmuls forced on every width (normally wide convs only)."""
    if request.param == "taps":
        monkeypatch.setattr(snn.convolution, "TAPS_MIN_CHANNELS2", 0)  # read where `conv` lives
        with snn.conv_lowering(backend="cpu"):
            yield "auto"
    else:
        yield request.param


@pytest.mark.parametrize("h,w,k,d,s,groups,c", CASES)
def test_conv_equals_the_dilated_lax_conv(method, h, w, k, d, s, groups, c):
    rng = np.random.default_rng(h * w + d)
    x = jnp.asarray(rng.standard_normal((2, h, w, c)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((k, k, c // groups, 6 if groups == 1 else c)), jnp.float32)
    p = d * (k - 1) // 2

    def ours(x, kernel):
        return snn.conv(x, kernel, s, p, d, groups, method=method)

    def ref(x, kernel):
        return reference_conv(x, kernel, s, p, d, groups)

    @jax.jit  # one compile per case instead of one per eager op
    def outputs_and_gradients(x, kernel):
        return [(f(x, kernel), jax.grad(lambda *a: jnp.sum(f(*a) ** 2), (0, 1))(x, kernel)) for f in (ours, ref)]

    (y, grads), (expected_y, expected) = outputs_and_gradients(x, kernel)
    assert rel(y, expected_y) <= 1e-6
    for g, e in zip(grads, expected):
        assert rel(g, e) <= 1e-6


def test_conv_in_bfloat16_is_within_its_rounding(method):
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((2, 17, 19, 16)), jnp.bfloat16)
    for kernel_shape, d, groups in (((3, 3, 16, 8), 2, 1), ((3, 3, 16, 8), 12, 1), ((5, 5, 1, 16), 2, 16)):
        kernel = jnp.asarray(rng.standard_normal(kernel_shape), jnp.bfloat16)
        p = d * (kernel_shape[0] - 1) // 2
        got = snn.conv(x, kernel, 1, p, d, groups, method=method)
        want = reference_conv(x.astype(jnp.float32), kernel.astype(jnp.float32), 1, p, d, groups)
        assert got.dtype == jnp.bfloat16
        assert rel(got, want) <= 1e-2  # bf16 has an 8-bit mantissa: 2^-8 = 4e-3 per rounding


@pytest.mark.parametrize("k,s,p,op,d", [(4, 2, 1, 0, 1), (2, 2, 0, 0, 1), (3, 2, 1, 1, 1), (16, 8, 4, 0, 1),
                                         (3, 1, 2, 0, 2), (64, 32, 0, 0, 1), (4, 2, 0, 0, 1)])
def test_subpixel_transposed_conv_equals_the_lhs_dilated_one(k, s, p, op, d):
    rng = np.random.default_rng(k + s)
    x = jnp.asarray(rng.standard_normal((2, 6, 9, 3)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((k, k, 5, 3)), jnp.float32)

    def run(method):
        return lambda x, kernel: snn.conv_transpose(x, kernel, s, p, op, d, method=method)

    assert rel(run("dense")(x, kernel), run("native")(x, kernel)) <= 1e-6
    grads = jax.grad(lambda *a: jnp.sum(run("dense")(*a) ** 2), (0, 1))(x, kernel)
    expected = jax.grad(lambda *a: jnp.sum(run("native")(*a) ** 2), (0, 1))(x, kernel)
    for g, e in zip(grads, expected):
        assert rel(g, e) <= 1e-6


def test_dead_taps_are_trimmed_to_a_1x1_conv():
    """ASPP's rate 24 on a 16 px map: only the centre tap ever reads the image."""
    x = jax.ShapeDtypeStruct((1, 16, 16, 8), jnp.float32)
    kernel = jax.ShapeDtypeStruct((3, 3, 8, 4), jnp.float32)
    jaxpr = jax.make_jaxpr(lambda x, k: snn.conv(x, k, 1, 24, 24, method="dense"))(x, kernel)
    convs = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
    assert len(convs) == 1 and convs[0].invars[1].aval.shape[:2] == (1, 1)


def test_plans_and_the_override_block():
    assert snn.conv_plan("native")["atrous"] == "native"
    assert snn.conv_plan("dense") == {"atrous": "dense", "transposed": "subpixel", "depthwise": "shifted",
                                      "pointwise": "native"}
    assert snn.conv_plan("auto", backend="gpu")["atrous"] == "dense"
    with snn.conv_lowering("native"):  # a one-off trace (export, FLOPs) overrides what a model bound
        assert snn.conv_plan("dense")["transposed"] == "native"
    with pytest.raises(ValueError, match="conv_lowering='fast'"):
        snn.conv_plan("fast")


def test_the_lowering_is_bound_when_the_model_is_built(monkeypatch):
    """$SEGJAX_CONV is read once, by models.create; the choice is a field of the model (so of every jit
    cache key), and two models with different lowerings live side by side."""
    monkeypatch.setenv("SEGJAX_CONV", "native")
    native = models.create("deeplabv3_mobilenet_v3_large", num_classes=3)
    monkeypatch.delenv("SEGJAX_CONV")
    dense = models.create("deeplabv3_mobilenet_v3_large", num_classes=3, conv_lowering="dense")
    monkeypatch.setenv("SEGJAX_CONV", "dense")  # read at build time only: `native` keeps its choice
    assert dilated_convs(native) and not dilated_convs(dense)
    monkeypatch.setenv("SEGJAX_CONV", "fast")
    with pytest.raises(SegjaxError, match="SEGJAX_CONV='fast'"):
        models.create("unet", num_classes=2)
    with pytest.raises(SegjaxError, match="conv_lowering='fast'"):
        models.create("unet", num_classes=2, conv_lowering="fast")


def dilated_convs(model) -> list[str]:
    model = models.create(model, num_classes=3) if isinstance(model, str) else model
    x = jax.ShapeDtypeStruct((1, 97, 131, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    text = jax.jit(lambda v, x: model.apply(v, x, train=False)["out"]).lower(variables, x).as_text()
    return [m.group(0) for m in DILATE.finditer(text) if (int(m.group(2)), int(m.group(3))) != (1, 1)]


def family_representatives() -> list[str]:
    """One registered model per family: the shallowest ResNet depth (deeper ones repeat the same blocks
    with the same dilations, only more of them) and u2netp for U2-Net (u2net: the same RSUs, wider)."""
    def family(name):
        return re.sub(r"resnet\d+", "resnet", name).removesuffix("p") if name.startswith("u2net") or "resnet" in name \
            else name

    def depth(name):
        found = re.search(r"resnet(\d+)", name)
        return (int(found[1]) if found else 0, not name.endswith("p"))

    def segjax_builder(name):  # other test modules register models of their own (tests/tiny_model.py)
        builder = models.registry._BUILDERS[name][0]
        return getattr(builder, "func", builder).__module__.startswith("segjax.")

    chosen: dict = {}
    for name in sorted(filter(segjax_builder, models.names()), key=depth):
        chosen.setdefault(family(name), name)
    return sorted(chosen.values())


def test_the_native_lowering_is_dilated_so_the_check_below_can_fail():
    for name in ("deeplabv3_resnet50", "unet"):  # the plain lax ops are dilated
        assert dilated_convs(models.create(name, num_classes=3, conv_lowering="native"))


@pytest.mark.parametrize("name", family_representatives())
def test_no_model_lowers_to_a_dilated_forward_conv(name):
    """Inference forward at an odd size, the model built with `dense`, and with `auto` traced as on a GPU:
    the family's builder passes its lowering down to every conv."""
    for method, backend in (("dense", None), ("auto", "gpu")):
        with snn.conv_lowering(backend=backend):
            left = dilated_convs(models.create(name, num_classes=3, conv_lowering=method))
        assert not left, f"{name}, {method} ({backend or 'this backend'}): {left}"
