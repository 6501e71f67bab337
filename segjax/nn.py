"""Shared building blocks, written once, with PyTorch's numerics.

Conventions every model in `segjax.models` follows:
- NHWC tensors, `train: bool` passed explicitly, `dtype` = compute dtype, `param_dtype` = storage.
- Padding is explicit and symmetric, as in PyTorch (Flax's "SAME" is asymmetric at stride 2).
- Submodules are named after the PyTorch reference's module path ("conv1", "layer1", "0", ...),
  so `segjax.convert` maps a state_dict onto our variables with one generic rule.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

Dtype = Any
Array = jax.Array


def pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def conv2d(features: int, kernel_size: int | Sequence[int] = 3, stride: int = 1, padding: int | None = None,
           dilation: int = 1, groups: int = 1, use_bias: bool = False, dtype: Dtype = None,
           param_dtype: Dtype = jnp.float32, name: str | None = None, **kw) -> nn.Conv:
    """`torch.nn.Conv2d` semantics: symmetric padding, default `dilation * (k - 1) // 2` ("same" at stride 1)."""
    kh, kw_ = pair(kernel_size)
    if padding is None:
        ph, pw = dilation * (kh - 1) // 2, dilation * (kw_ - 1) // 2
    else:
        ph, pw = pair(padding)
    return nn.Conv(features, (kh, kw_), strides=pair(stride), padding=((ph, ph), (pw, pw)),
                   kernel_dilation=pair(dilation), feature_group_count=groups, use_bias=use_bias,
                   dtype=dtype, param_dtype=param_dtype, kernel_init=kw.pop("kernel_init", kaiming_normal_fan_out),
                   name=name, **kw)


# torchvision's ResNet/MobileNet/segmentation heads use kaiming_normal_(mode="fan_out", relu).
kaiming_normal_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class BatchNorm(nn.Module):
    """BatchNorm with PyTorch's numerics (including the unbiased running variance).

    `momentum` is Flax's: running = momentum * running + (1 - momentum) * batch, i.e. 1 - PyTorch's.
    Statistics are computed in float32 whatever the compute dtype. With `axis_name`, statistics are
    averaged across that mapped axis (pmap / shard_map); under jit with a sharded batch XLA already
    reduces over the global batch.
    """
    momentum: float = 0.9
    epsilon: float = 1e-5
    axis_name: str | None = None
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        xf = x.astype(jnp.float32)
        if train:
            axes = tuple(range(x.ndim - 1))
            count = math.prod(x.shape[:-1])
            mean = xf.mean(axes)
            if self.axis_name is not None:
                mean = jax.lax.pmean(mean, self.axis_name)
            var = jnp.square(xf - mean).mean(axes)
            if self.axis_name is not None:
                var = jax.lax.pmean(var, self.axis_name)
                count = count * jax.lax.psum(1, self.axis_name)
            if not self.is_initializing():
                m = self.momentum
                ra_mean.value = m * ra_mean.value + (1 - m) * mean
                ra_var.value = m * ra_var.value + (1 - m) * var * (count / max(count - 1, 1))
        else:
            mean, var = ra_mean.value, ra_var.value
        mul = scale.astype(jnp.float32) * jax.lax.rsqrt(var + self.epsilon)
        y = (xf - mean) * mul + bias.astype(jnp.float32)
        return y.astype(self.dtype or x.dtype)


class ConvBN(nn.Module):
    """Conv -> BatchNorm -> activation, named "0"/"1" like torchvision's Conv2dNormActivation."""
    features: int
    kernel_size: int | Sequence[int] = 3
    stride: int = 1
    dilation: int = 1
    groups: int = 1
    padding: int | None = None
    act: Callable[[Array], Array] | None = nn.relu
    use_bias: bool = False
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    axis_name: str | None = None
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        x = conv2d(self.features, self.kernel_size, self.stride, self.padding, self.dilation, self.groups,
                   self.use_bias, self.dtype, self.param_dtype, name="0")(x)
        x = BatchNorm(self.bn_momentum, self.bn_epsilon, self.axis_name, self.dtype, self.param_dtype, name="1")(x, train)
        return self.act(x) if self.act is not None else x


# ----------------------------------------------------------------------------------------- resize

def _source_index(out_size: int, in_size: int, align_corners: bool):
    """Lower index, upper index and weight of the upper one, as torch's linear interpolation computes them."""
    dst = np.arange(out_size, dtype=np.float64)
    if align_corners:
        src = dst * ((in_size - 1) / (out_size - 1)) if out_size > 1 else np.zeros_like(dst)
    else:
        src = np.maximum((dst + 0.5) * (in_size / out_size) - 0.5, 0.0)
    lo = np.minimum(np.floor(src).astype(np.int32), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    return lo, hi, (src - lo).astype(np.float32)


def _lerp_axis(x: Array, axis: int, out_size: int, align_corners: bool) -> Array:
    in_size = x.shape[axis]
    if in_size == out_size and not align_corners:
        return x
    lo, hi, w = _source_index(out_size, in_size, align_corners)
    shape = [1] * x.ndim
    shape[axis] = out_size
    w = jnp.asarray(w).reshape(shape).astype(x.dtype)
    return jnp.take(x, lo, axis=axis) * (1 - w) + jnp.take(x, hi, axis=axis) * w


def resize(x: Array, size: Sequence[int], method: str = "bilinear", align_corners: bool = False) -> Array:
    """`F.interpolate(x, size=size, mode=method, align_corners=...)` for NHWC `x`, exactly.

    Unlike `jax.image.resize` it never antialiases and it supports align_corners=True
    (milesial's UNet). Index tables are static numpy, so this costs two gathers per axis.
    """
    h, w = int(size[0]), int(size[1])
    if method == "nearest":
        ih, iw = x.shape[1], x.shape[2]
        rows = np.minimum(np.floor(np.arange(h) * (ih / h)).astype(np.int32), ih - 1)
        cols = np.minimum(np.floor(np.arange(w) * (iw / w)).astype(np.int32), iw - 1)
        return jnp.take(jnp.take(x, rows, axis=1), cols, axis=2)
    if method != "bilinear":
        raise ValueError(f"resize: method must be 'bilinear' or 'nearest', got {method!r}")
    if x.shape[1] == h and x.shape[2] == w:
        return x
    return _lerp_axis(_lerp_axis(x, 1, h, align_corners), 2, w, align_corners)


# ----------------------------------------------------------------------------------------- pooling

def pool_output_size(size: int, kernel: int, stride: int, padding: int, ceil_mode: bool) -> int:
    """PyTorch's pooling output size, including the ceil_mode rule that a window may not start in the right pad."""
    span = size + 2 * padding - kernel
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


def max_pool2d(x: Array, kernel_size: int = 2, stride: int | None = None, padding: int = 0,
               ceil_mode: bool = False) -> Array:
    """`F.max_pool2d` for NHWC, with ceil_mode (U2-Net) and symmetric padding."""
    stride = kernel_size if stride is None else stride
    pads = []
    for size in x.shape[1:3]:
        out = pool_output_size(size, kernel_size, stride, padding, ceil_mode)
        extra = max((out - 1) * stride + kernel_size - (size + 2 * padding), 0)
        pads.append((padding, padding + extra))
    return nn.max_pool(x, (kernel_size, kernel_size), (stride, stride), padding=pads)


def adaptive_avg_pool2d(x: Array, output_size: int | Sequence[int]) -> Array:
    """`F.adaptive_avg_pool2d` for NHWC: bin i spans [floor(i*H/o), ceil((i+1)*H/o))."""
    oh, ow = pair(output_size)
    if (oh, ow) == (1, 1):
        return x.mean(axis=(1, 2), keepdims=True)

    def bins(size, out):
        return [(i * size // out, -(-(i + 1) * size // out)) for i in range(out)]

    rows = [x[:, a:b].mean(axis=1, keepdims=True) for a, b in bins(x.shape[1], oh)]
    x = jnp.concatenate(rows, axis=1)
    cols = [x[:, :, a:b].mean(axis=2, keepdims=True) for a, b in bins(x.shape[2], ow)]
    return jnp.concatenate(cols, axis=2)


# ----------------------------------------------------------------------------------------- upsampling

def bilinear_upsample_kernel(kernel_size: int, channels: int) -> np.ndarray:
    """FCN's bilinear filter as a channel-diagonal kernel in `ConvTranspose` layout (kh, kw, out, in)."""
    factor = (kernel_size + 1) // 2
    center = factor - 1 if kernel_size % 2 == 1 else factor - 0.5
    og = np.arange(kernel_size, dtype=np.float64)
    filt = 1 - np.abs(og - center) / factor
    filt2d = np.outer(filt, filt).astype(np.float32)
    kernel = np.zeros((kernel_size, kernel_size, channels, channels), np.float32)
    kernel[:, :, np.arange(channels), np.arange(channels)] = filt2d[:, :, None]
    return kernel


def bilinear_kernel_init(key, shape, dtype=jnp.float32):
    kh, kw, out_c, in_c = shape
    assert kh == kw and out_c == in_c, "bilinear init needs a square kernel and as many outputs as inputs"
    return jnp.asarray(bilinear_upsample_kernel(kh, out_c), dtype)


class ConvTranspose(nn.Module):
    """`torch.nn.ConvTranspose2d` exactly: output size (H - 1) * s - 2p + d(k - 1) + output_padding + 1.

    The kernel is stored as the forward convolution's HWIO kernel, shape (kh, kw, out, in): that is
    PyTorch's (in, out, kh, kw) weight transposed by (2, 3, 1, 0), the same rule as for a Conv2d, so
    the converter treats both alike. The op is the transpose (gradient) of that forward convolution.
    """
    features: int
    kernel_size: int = 4
    stride: int = 2
    padding: int = 0
    output_padding: int = 0
    dilation: int = 1
    use_bias: bool = True
    kernel_init: Callable = nn.initializers.lecun_normal()
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        k, s, d = self.kernel_size, self.stride, self.dilation
        kernel = self.param("kernel", self.kernel_init, (k, k, self.features, x.shape[-1]), self.param_dtype)
        dtype = self.dtype or x.dtype
        # Forward-conv HWIO (k, k, out, in) -> spatially flipped HWIO (k, k, in, out) of the transposed op.
        rhs = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2).astype(dtype)
        lo = d * (k - 1) - self.padding
        y = jax.lax.conv_general_dilated(
            x.astype(dtype), rhs, window_strides=(1, 1),
            padding=((lo, lo + self.output_padding),) * 2,
            lhs_dilation=(s, s), rhs_dilation=(d, d),
            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype).astype(dtype)
        return y


def conv_transpose_output_size(size: int, kernel: int, stride: int, padding: int = 0,
                               output_padding: int = 0, dilation: int = 1) -> int:
    return (size - 1) * stride - 2 * padding + dilation * (kernel - 1) + output_padding + 1


def max_unpool2d(x: Array, indices: Array, output_size: Sequence[int]) -> Array:
    """SegNet-style unpooling: scatter each value to its flat spatial index (per sample, per channel)."""
    n, h, w, c = x.shape
    oh, ow = output_size
    flat = jnp.zeros((n, oh * ow, c), x.dtype)
    idx = indices.reshape(n, h * w, c)
    flat = jax.vmap(lambda f, i, v: f.at[i, jnp.arange(c)[None, :]].set(v))(flat, idx, x.reshape(n, h * w, c))
    return flat.reshape(n, oh, ow, c)


def bed_of_nails_upsample(x: Array, factor: int = 2) -> Array:
    """Places each value at the top-left of a factor x factor block of zeros."""
    n, h, w, c = x.shape
    out = jnp.zeros((n, h, factor, w, factor, c), x.dtype).at[:, :, 0, :, 0, :].set(x)
    return out.reshape(n, h * factor, w * factor, c)


def nearest_upsample(x: Array, factor: int = 2) -> Array:
    return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)


def dtype_partials(dtype: Dtype, param_dtype: Dtype, axis_name: str | None, bn_momentum: float = 0.9,
                   bn_epsilon: float = 1e-5):
    """The (conv, norm, conv_bn) factories a model builds its layers from, as in flax's imagenet example."""
    conv = functools.partial(conv2d, dtype=dtype, param_dtype=param_dtype)
    norm = functools.partial(BatchNorm, momentum=bn_momentum, epsilon=bn_epsilon, axis_name=axis_name,
                             dtype=dtype, param_dtype=param_dtype)
    conv_bn = functools.partial(ConvBN, bn_momentum=bn_momentum, bn_epsilon=bn_epsilon, axis_name=axis_name,
                                dtype=dtype, param_dtype=param_dtype)
    return conv, norm, conv_bn
