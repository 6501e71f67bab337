"""Convolution and transposed convolution with PyTorch's semantics, and the lowering strategies behind them."""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax.linen.dtypes import promote_dtype

from segjax.nn.core import Array, Dtype, conv_output_size, kaiming_normal_fan_out, pair

#
# How a convolution is lowered. XLA hands window-dilated (atrous) and base-dilated (transposed)
# forward convolutions to a slow generic path on GPU (it materialises the dilation) and, on CPU,
# runs depthwise and transposed convolutions far below the dense-conv rate. Every conv of every
# model goes through `conv` / `conv_transpose` below, which rewrite them as dense convolutions:
#   - dead taps trimmed: kernel rows/columns that can only ever read zero padding (known from the
#     static shapes) are dropped, so an ASPP rate of 24 on a 16 px map is a 1x1 conv;
#   - space-to-batch (TensorFlow's atrous_conv2d): the rate x rate phases of the padded input go
#     into the batch, a dense conv runs on them, and they are interleaved back;
#   - sub-pixel transposed conv: a stride-s transposed conv is s*s small dense convs on the
#     undilated input (one conv with s*s*out channels) followed by depth-to-space;
#   - depthwise k x k as k*k shifted multiply-adds, which XLA fuses into one loop.
# The lowering is chosen once, when a model is built: `segjax.models.create(..., conv_lowering=...)`
# binds it into the network's Conv ModuleDef (`dtype_partials`), so it is part of the module and of
# every jit cache key; two models with different lowerings can live in one process. $SEGJAX_CONV is
# the user's override of the default, read by `default_conv_lowering` when a model is built.
# docs/benchmarks.md gives the measurements behind `auto`.

CONV_METHODS = ("native", "dense", "auto")
TAPS_MIN_CHANNELS2 = 256 * 256  # below it, XLA:CPU's conv beat the per-tap matmuls (backward)


_OVERRIDE: dict = {}  # set by `conv_lowering` only


def check_conv_method(method: str, what: str = "conv_lowering") -> str:
    method = str(method).strip().lower()
    if method not in CONV_METHODS:
        raise ValueError(f"{what}={method!r}: use one of {', '.join(CONV_METHODS)}")
    return method


def default_conv_lowering() -> str:
    """The lowering a model gets when its builder is given none: $SEGJAX_CONV, else "auto"."""
    return check_conv_method(os.environ.get("SEGJAX_CONV", "").strip() or "auto", "SEGJAX_CONV")


@contextlib.contextmanager
def conv_lowering(method: str | None = None, backend: str | None = None):
    """Trace convolutions as `method` would lower them on `backend`, whatever a model has bound.

    For one-off traces only, never for a function jitted and called again outside: export and FLOP
    counts trace with "native" (portable lax ops, their true FLOPs), and tests trace the plan of
    another backend (e.g. "gpu" from a CPU host).
    """
    saved = dict(_OVERRIDE)
    _OVERRIDE.update({k: v for k, v in (("method", method), ("backend", backend)) if v is not None})
    try:
        yield
    finally:
        _OVERRIDE.clear()
        _OVERRIDE.update(saved)


def conv_plan(method: str | None = None, backend: str | None = None) -> dict:
    """What each kind of conv lowers to under `method` (default "auto"; a `conv_lowering` block's
    method wins) on `backend` (default: the block's, else JAX's default backend).

    atrous: "native" (rhs_dilation), "taps" (a matmul per tap over its valid outputs, for convs of
    at least TAPS_MIN_CHANNELS2 in x out channels; narrower ones trimmed, then native) or "dense"
    (dead taps trimmed, then space-to-batch); transposed: "native" (lhs_dilation) or "subpixel";
    depthwise: "native" (grouped conv) or "shifted" (multiply-adds); pointwise (ungrouped stride-1
    1x1 convs, and kernels of 5x5 or more): "native" or "dot" (matmuls over the channels).
    """
    method = check_conv_method(_OVERRIDE.get("method") or method or "auto")
    backend = backend or _OVERRIDE.get("backend") or jax.default_backend()
    if method == "native":
        return {"atrous": "native", "transposed": "native", "depthwise": "native", "pointwise": "native"}
    if method == "dense" or backend != "cpu":
        # GPU/TPU: XLA's dilated convolutions are its slow path; cuDNN has fast depthwise kernels.
        return {"atrous": "dense", "transposed": "subpixel", "depthwise": "native" if method == "auto" else "shifted",
                "pointwise": "native"}
    # CPU, measured (docs/benchmarks.md): space-to-batch is slower than XLA:CPU's dilated conv;
    # matmuls over each tap's valid outputs beat it on wide convs, trimming plus the native conv
    # on narrow ones; sub-pixel and shifted multiply-adds beat XLA:CPU's own lowering by 2-40x.
    # A 1x1 stride-1 conv as a matmul: its backward ran 1.3-2x faster than XLA:CPU's conv backward;
    # kernels of 5x5 and more (FCN's fc6) as one matmul over shifted copies (`_im2col_conv`).
    return {"atrous": "taps", "transposed": "subpixel", "depthwise": "shifted", "pointwise": "dot"}


def _live_taps(size: int, k: int, stride: int, dilation: int, lo: int, hi: int) -> tuple[int, int]:
    """First and last kernel tap along one axis that reads a real input element for some output."""
    out = conv_output_size(size, k, stride, lo, hi, dilation)
    live = [i for i in range(k) if i * dilation - lo <= size - 1 and (out - 1) * stride - lo + i * dilation >= 0]
    return (live[0], live[-1]) if live else (k // 2, k // 2)


def _pad(x: Array, pads: Sequence[tuple[int, int]]) -> Array:
    """Pads (or, with negative amounts, crops) the spatial axes of NHWC `x`."""
    if all(p == (0, 0) for p in pads):
        return x
    return jax.lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0)] + [(lo, hi, 0) for lo, hi in pads] + [(0, 0, 0)])


def _lax_conv(x: Array, kernel: Array, stride=(1, 1), padding=((0, 0), (0, 0)), groups: int = 1,
              dilation=(1, 1)) -> Array:
    return jax.lax.conv_general_dilated(x, kernel, tuple(stride), [tuple(p) for p in padding],
                                        rhs_dilation=tuple(dilation), dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=groups)


def _shifted_depthwise(x: Array, kernel: Array, stride, padding, dilation) -> Array:
    """Depthwise conv (kernel (kh, kw, 1, C)) as kh*kw strided slices times per-channel weights."""
    x = _pad(x, padding)
    (kh, kw), (sh, sw), (dh, dw) = kernel.shape[:2], stride, dilation
    oh, ow = conv_output_size(x.shape[1], kh, sh, dilation=dh), conv_output_size(x.shape[2], kw, sw, dilation=dw)
    out = None
    for i in range(kh):
        for j in range(kw):
            tap = jax.lax.slice(x, (0, i * dh, j * dw, 0),
                                (x.shape[0], i * dh + (oh - 1) * sh + 1, j * dw + (ow - 1) * sw + 1, x.shape[3]),
                                (1, sh, sw, 1))
            term = tap * kernel[i, j, 0]
            out = term if out is None else out + term
    return out


def _space_to_batch_conv(x: Array, kernel: Array, padding, dilation, groups: int) -> Array:
    """Stride-1 atrous conv as a dense conv over the dilation x dilation phases of the padded input."""
    (kh, kw), (dh, dw) = kernel.shape[:2], dilation
    n, c = x.shape[0], x.shape[3]
    x = _pad(x, padding)
    oh, ow = conv_output_size(x.shape[1], kh, dilation=dh), conv_output_size(x.shape[2], kw, dilation=dw)
    qh, qw = -(-x.shape[1] // dh), -(-x.shape[2] // dw)
    x = _pad(x, [(0, qh * dh - x.shape[1]), (0, qw * dw - x.shape[2])])
    x = x.reshape(n, qh, dh, qw, dw, c).transpose(2, 4, 0, 1, 3, 5).reshape(dh * dw * n, qh, qw, c)
    y = _lax_conv(x, kernel, groups=groups)
    ph, pw, f = y.shape[1], y.shape[2], y.shape[3]
    y = y.reshape(dh, dw, n, ph, pw, f).transpose(2, 3, 0, 4, 1, 5).reshape(n, ph * dh, pw * dw, f)
    return y[:, :oh, :ow]


def _dilate_kernel(kernel: Array, dilation) -> Array:
    """The equivalent undilated kernel, zeros between the taps."""
    kh, kw = kernel.shape[:2]
    dh, dw = dilation
    out = jnp.zeros((dh * (kh - 1) + 1, dw * (kw - 1) + 1) + kernel.shape[2:], kernel.dtype)
    return out.at[::dh, ::dw].set(kernel)


def _tap_regions(size: int, k: int, dilation: int, lo: int, out: int) -> list:
    """Per tap along one axis: (first output, end output, input offset) where it reads real input, or None."""
    regions = []
    for i in range(k):
        offset = i * dilation - lo
        first, end = max(0, -offset), min(out, size - offset)
        regions.append((first, end, offset) if first < end else None)
    return regions


def _live_tap_products(x: Array, kernel: Array, out_hw, dilation, padding):
    """(i, j, output window, input window) for every tap with a non-empty valid region (stride 1)."""
    rows = _tap_regions(x.shape[1], kernel.shape[0], dilation[0], padding[0][0], out_hw[0])
    cols = _tap_regions(x.shape[2], kernel.shape[1], dilation[1], padding[1][0], out_hw[1])
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            if r is not None and c is not None:
                yield i, j, (slice(r[0], r[1]), slice(c[0], c[1])), (slice(r[0] + r[2], r[1] + r[2]),
                                                                    slice(c[0] + c[2], c[1] + c[2]))


def _scatter_sum(parts, shape):
    """Sum of (window, value) pairs placed into zeros of `shape` (NHWC, windows over H and W)."""
    total = None
    for (rows, cols), value in parts:
        pads = ((0, 0), (rows.start, shape[1] - rows.stop), (cols.start, shape[2] - cols.stop), (0, 0))
        value = jnp.pad(value, pads)
        total = value if total is None else total + value
    return jnp.zeros(shape, parts[0][1].dtype) if total is None else total


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _taps_conv(x: Array, kernel: Array, dilation, padding) -> Array:
    """Stride-1 conv as one matmul per live tap over the outputs where that tap reads real input.

    No multiply-add touches padding: an ASPP rate of 12 on a 16 px map does 4x fewer FLOPs than a
    conv that pads. Its gradients have the same form (hence the custom VJP; autodiff of the pads
    and slices was 1.5-3x slower on XLA:CPU).
    """
    return _taps_forward(x, kernel, dilation, padding)[0]


def _conv_out_hw(x_shape, kernel_shape, dilation, padding):
    return tuple(conv_output_size(x_shape[1 + a], kernel_shape[a], 1, *padding[a], dilation[a]) for a in (0, 1))


def _taps_forward(x, kernel, dilation, padding):
    out_hw = _conv_out_hw(x.shape, kernel.shape, dilation, padding)
    parts = [(o, x[:, xi[0], xi[1]] @ kernel[i, j]) for i, j, o, xi in _live_tap_products(x, kernel, out_hw, dilation, padding)]
    return _scatter_sum(parts, (x.shape[0], *out_hw, kernel.shape[-1])), (x, kernel)


def _taps_backward(dilation, padding, residuals, g):
    x, kernel = residuals
    out_hw = g.shape[1:3]
    dx_parts, dkernel = [], jnp.zeros_like(kernel)
    for i, j, o, xi in _live_tap_products(x, kernel, out_hw, dilation, padding):
        g_tap = g[:, o[0], o[1]]
        dx_parts.append((xi, g_tap @ kernel[i, j].T))
        dkernel = dkernel.at[i, j].set(jnp.einsum("nhwc,nhwo->co", x[:, xi[0], xi[1]], g_tap))
    return _scatter_sum(dx_parts, x.shape), dkernel


_taps_conv.defvjp(_taps_forward, _taps_backward)


def _im2col_conv(x: Array, kernel: Array, padding) -> Array:
    """Stride-1 conv as one matmul over the kh*kw shifted copies of the input (FCN's 7x7 fc6).

    XLA:CPU's own conv took 1.8 s forward and 50 s forward + backward for fc6 (7x7 512->4096 on
    2x11x11, one thread); as a matmul its gradient is two matmuls as well.
    """
    x = _pad(x, padding)
    kh, kw, cin, cout = kernel.shape
    oh, ow = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    cols = jnp.concatenate([x[:, i:i + oh, j:j + ow] for i in range(kh) for j in range(kw)], axis=-1)
    return cols @ kernel.reshape(kh * kw * cin, cout)


def conv(x: Array, kernel: Array, stride=1, padding=0, dilation=1, groups: int = 1,
         method: str | None = None) -> Array:
    """`F.conv2d` for NHWC `x` and HWIO `kernel` (kh, kw, in/groups, out), lowered per `conv_plan`.

    padding: an int, (ph, pw) symmetric, or ((lo, hi), (lo, hi)). Every method gives the same
    result as `lax.conv_general_dilated(..., rhs_dilation=dilation)` up to float rounding.
    """
    stride, dilation = pair(stride), pair(dilation)
    if isinstance(padding, int):
        padding = ((padding, padding),) * 2
    padding = tuple((p, p) if isinstance(p, int) else (int(p[0]), int(p[1])) for p in padding)
    plan = conv_plan(method)
    depthwise = groups > 1 and groups == x.shape[-1] == kernel.shape[-1] and kernel.shape[2] == 1
    if depthwise and plan["depthwise"] == "shifted":
        return _shifted_depthwise(x, kernel, stride, padding, dilation)
    dense = stride == (1, 1) and groups == 1 and dilation == (1, 1)
    if dense and kernel.shape[:2] == (1, 1) and padding == ((0, 0), (0, 0)) and plan["pointwise"] == "dot":
        return x @ kernel[0, 0]
    if dense and kernel.shape[0] * kernel.shape[1] >= 25 and plan["pointwise"] == "dot":
        return _im2col_conv(x, kernel, padding)
    if dilation == (1, 1) or plan["atrous"] == "native":
        return _lax_conv(x, kernel, stride, padding, groups, dilation)
    if plan["atrous"] == "taps" and stride == (1, 1) and groups == 1 and x.shape[-1] * kernel.shape[-1] >= TAPS_MIN_CHANNELS2:
        return _taps_conv(x, kernel, dilation, padding)
    # Trim dead taps: the output size is kept, so the pads move with the first live tap.
    taps, pads, dil = [], [], []
    for axis in (0, 1):
        k, d, (lo, hi) = kernel.shape[axis], dilation[axis], padding[axis]
        size, s = x.shape[1 + axis], stride[axis]
        first, last = _live_taps(size, k, s, d, lo, hi)
        out = conv_output_size(size, k, s, lo, hi, d)
        k_live = last - first + 1
        new_lo = lo - first * d
        new_hi = (out - 1) * s + d * (k_live - 1) + 1 - size - new_lo
        taps.append(slice(first, last + 1))
        pads.append((new_lo, new_hi))
        dil.append(d if k_live > 1 else 1)
    kernel = kernel[taps[0], taps[1]]
    dilation = tuple(dil)
    if dilation == (1, 1) or plan["atrous"] != "dense":
        # Negative pads crop the input; positive ones stay inside the conv (XLA:CPU's gradient of an
        # explicitly padded input was 2x slower).
        x = _pad(x, [(min(lo, 0), min(hi, 0)) for lo, hi in pads])
        pads = [(max(lo, 0), max(hi, 0)) for lo, hi in pads]
        return _lax_conv(x, kernel, stride, pads, groups, dilation)
    if stride == (1, 1):
        return _space_to_batch_conv(x, kernel, pads, dilation, groups)
    # Strided and dilated (no model uses it): an undilated kernel with zeros between the taps.
    return _lax_conv(_pad(x, pads), _dilate_kernel(kernel, dilation), stride, groups=groups)


def conv_transpose(x: Array, kernel: Array, stride: int, padding: int = 0, output_padding: int = 0,
                   dilation: int = 1, method: str | None = None) -> Array:
    """`F.conv_transpose2d` for NHWC `x`; `kernel` is the forward conv's HWIO kernel (kh, kw, out, in).

    "subpixel": output position o = q*s + r - padding gathers taps r, r + s, ... of the kernel
    from inputs q, q - 1, ...; so each phase r is a small dense conv of the undilated input, and
    all s*s phases are one conv with s*s*out channels, interleaved by depth-to-space.
    """
    if conv_plan(method)["transposed"] == "native":
        k = kernel.shape[0]
        rhs = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)  # the transposed op's spatially flipped HWIO
        lo = dilation * (k - 1) - padding
        return jax.lax.conv_general_dilated(x, rhs, window_strides=(1, 1),
                                            padding=((lo, lo + output_padding),) * 2,
                                            lhs_dilation=(stride, stride), rhs_dilation=(dilation, dilation),
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))
    s = stride
    w = kernel.transpose(0, 1, 3, 2)  # (kh, kw, in, out): tap t of input channel i to output o
    if dilation > 1:
        w = _dilate_kernel(w, (dilation, dilation))
    k, cin, cout = w.shape[0], w.shape[2], w.shape[3]
    m = -(-k // s)  # taps per phase
    w = jnp.pad(w, ((0, m * s - k), (0, m * s - k), (0, 0), (0, 0)))
    # (m, s, m, s, in, out) [a, r, b, t] = w[a*s + r, b*s + t]; flipped along a, b for a correlation.
    w = w.reshape(m, s, m, s, cin, cout)[::-1, :, ::-1]
    w = w.transpose(0, 2, 4, 1, 3, 5).reshape(m, m, cin, s * s * cout)
    n, h, wd = x.shape[:3]
    out_h = conv_transpose_output_size(h, kernel.shape[0], s, padding, output_padding, dilation)
    out_w = conv_transpose_output_size(wd, kernel.shape[1], s, padding, output_padding, dilation)
    # Phase rows q_lo..q_hi cover output rows padding .. padding + out - 1 of the uncropped result.
    q_lo = padding // s
    q_hi_h, q_hi_w = (padding + out_h - 1) // s, (padding + out_w - 1) // s
    x = _pad(x, [(m - 1 - q_lo, q_hi_h - (h - 1)), (m - 1 - q_lo, q_hi_w - (wd - 1))])
    y = conv(x, w, method=method)  # UNet's 2x2/2 is 1x1 here: a matmul on CPU
    qh, qw = y.shape[1], y.shape[2]
    y = y.reshape(n, qh, qw, s, s, cout).transpose(0, 1, 3, 2, 4, 5).reshape(n, qh * s, qw * s, cout)
    start = padding - q_lo * s
    return y[:, start:start + out_h, start:start + out_w]


class Conv(nn.Module):
    """`torch.nn.Conv2d` with flax.linen.Conv's parameters ("kernel" HWIO, "bias"), lowered by `conv`."""
    features: int
    kernel_size: tuple[int, int] = (3, 3)
    strides: tuple[int, int] = (1, 1)
    padding: tuple[tuple[int, int], tuple[int, int]] = ((1, 1), (1, 1))
    kernel_dilation: tuple[int, int] = (1, 1)
    feature_group_count: int = 1
    use_bias: bool = False
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros
    lowering: str = "auto"  # see `conv_plan`; bound once by the network's builder (`dtype_partials`)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        shape = tuple(self.kernel_size) + (x.shape[-1] // self.feature_group_count, self.features)
        kernel = self.param("kernel", self.kernel_init, shape, self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = conv(x, kernel, self.strides, self.padding, self.kernel_dilation, self.feature_group_count, self.lowering)
        return y + bias if bias is not None else y


def conv2d(features: int, kernel_size: int | Sequence[int] = 3, stride: int = 1, padding: int | None = None,
           dilation: int = 1, groups: int = 1, use_bias: bool = False, dtype: Dtype = None,
           param_dtype: Dtype = jnp.float32, name: str | None = None, **kw) -> Conv:
    """`torch.nn.Conv2d` semantics: symmetric padding, default `dilation * (k - 1) // 2` ("same" at stride 1)."""
    kh, kw_ = pair(kernel_size)
    if padding is None:
        ph, pw = dilation * (kh - 1) // 2, dilation * (kw_ - 1) // 2
    else:
        ph, pw = pair(padding)
    return Conv(features, (kh, kw_), strides=pair(stride), padding=((ph, ph), (pw, pw)),
                kernel_dilation=pair(dilation), feature_group_count=groups, use_bias=use_bias,
                dtype=dtype, param_dtype=param_dtype, kernel_init=kw.pop("kernel_init", kaiming_normal_fan_out),
                name=name, **kw)



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
    lowering: str = "auto"  # see `conv_plan`

    @nn.compact
    def __call__(self, x: Array) -> Array:
        k, s, d = self.kernel_size, self.stride, self.dilation
        kernel = self.param("kernel", self.kernel_init, (k, k, self.features, x.shape[-1]), self.param_dtype)
        x, kernel = promote_dtype(x, kernel, dtype=self.dtype)
        y = conv_transpose(x, kernel, s, self.padding, self.output_padding, d, self.lowering)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype).astype(y.dtype)
        return y


def conv_transpose_output_size(size: int, kernel: int, stride: int, padding: int = 0,
                               output_padding: int = 0, dilation: int = 1) -> int:
    return (size - 1) * stride - 2 * padding + dilation * (kernel - 1) + output_padding + 1
