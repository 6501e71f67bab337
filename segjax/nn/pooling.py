"""Pooling and unpooling with PyTorch's semantics.

Indices layout (PyTorch's, used by `max_pool2d(return_indices=True)` and `max_unpool2d`): an int32
array shaped like the pooled values (NHWC), each entry the flat position `h * W + w` of its maximum
in its own (image, channel) plane of the *unpadded* input of height H and width W; among equal
values the first in row-major window order wins.

The max pool is differentiated through the position of each window's maximum (the gradient goes
there, as in PyTorch), not through XLA's `select_and_scatter`: for 2x2/2 pools forward + backward
on XLA:CPU (2x128x128x64, 2x64x64x128 and 2x320x320x64 inputs) that was 7-13x slower than
taking the k*k strided views, keeping the first maximum, and scattering the gradient back as k*k
interior-padded copies.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import struct
from jax.errors import InconclusiveDimensionOperation

from segjax.errors import SegjaxError
from segjax.nn.core import Array, is_symbolic, pair


def pool_output_size(size: int, kernel: int, stride: int, padding: int, ceil_mode: bool) -> int:
    """PyTorch's pooling output size, including the ceil_mode rule that a window may not start in the right pad."""
    span = size + 2 * padding - kernel
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


def _pool_pads(hw, kernel: int, stride: int, padding: int, ceil_mode: bool) -> tuple[tuple[int, int], ...]:
    """(lo, hi) pads of H and W whose floor-mode pool is the requested one.

    ceil_mode pads the right by stride - 1 more (with -inf, which no window sees alone): the floor
    output of that is the ceil output, whatever the size, so symbolic sizes export. Where
    padding + stride > kernel, torch's rule that no window starts in the right pad can drop the
    last window, which needs the concrete size.
    """
    if not ceil_mode:
        extra = (0, 0)
    elif padding + stride <= kernel:
        extra = (stride - 1, stride - 1)
    else:
        extra = tuple((pool_output_size(n, kernel, stride, padding, True) - 1) * stride + kernel - (n + 2 * padding)
                      for n in hw)
    return tuple((padding, padding + max(e, 0)) for e in extra)


def _window_views(x: Array, kernel: int, stride: int, pads) -> tuple[list[Array], tuple]:
    """The kernel*kernel strided views of the -inf padded `x`, in row-major window order, and the output H, W."""
    x = jax.lax.pad(x, jnp.array(-jnp.inf, x.dtype), [(0, 0, 0)] + [(lo, hi, 0) for lo, hi in pads] + [(0, 0, 0)])
    oh, ow = ((x.shape[a] - kernel) // stride + 1 for a in (1, 2))
    views = [jax.lax.slice(x, (0, i, j, 0), (x.shape[0], i + (oh - 1) * stride + 1, j + (ow - 1) * stride + 1,
                                              x.shape[3]), (1, stride, stride, 1))
             for i in range(kernel) for j in range(kernel)]
    return views, (oh, ow)


def _window_argmax(x: Array, kernel: int, stride: int, pads) -> tuple[Array, Array]:
    """(window maxima, position of the first maximum in its window as i * kernel + j), one fused pass.

    A later value wins only when strictly greater (or NaN, which PyTorch propagates the same way).
    """
    views, _ = _window_views(x, kernel, stride, pads)
    best, tap = views[0], jnp.zeros(views[0].shape, jnp.int32)
    for t, v in enumerate(views[1:], 1):
        better = (v > best) | jnp.isnan(v)
        best, tap = jnp.where(better, v, best), jnp.where(better, t, tap)
    return best, tap


def _scatter_to_windows(g: Array, tap: Array, kernel: int, stride: int, pads, hw) -> Array:
    """The gradient of a max pool: each output's cotangent added at its window's maximum (unpadded input)."""
    dx = None
    for t in range(kernel * kernel):
        i, j = divmod(t, kernel)
        part = jnp.where(tap == t, g, jnp.zeros((), g.dtype))
        cfg = [(0, 0, 0)]
        for offset, (lo, _), n, size in ((i, pads[0], part.shape[1], hw[0]), (j, pads[1], part.shape[2], hw[1])):
            start = offset - lo  # unpadded input row of output 0's tap
            cfg.append((start, size - (start + (n - 1) * stride + 1), stride - 1))
        part = jax.lax.pad(part, jnp.zeros((), g.dtype), cfg + [(0, 0, 0)])
        dx = part if dx is None else dx + part
    return dx


def _argmax_pool_fwd(x, kernel, stride, pads):
    values, tap = _window_argmax(x, kernel, stride, pads)
    return (values, tap), (tap, jnp.zeros((0,) + x.shape[1:3], x.dtype))


def _argmax_pool_bwd(kernel, stride, pads, residuals, cotangents):
    tap, shape_carrier = residuals
    return (_scatter_to_windows(cotangents[0], tap, kernel, stride, pads, shape_carrier.shape[1:]),)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _argmax_pool(x: Array, kernel: int, stride: int, pads) -> tuple[Array, Array]:
    """(maxima, winning tap) of each window; the gradient goes to the winning tap."""
    return _window_argmax(x, kernel, stride, pads)


_argmax_pool.defvjp(_argmax_pool_fwd, _argmax_pool_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x: Array, kernel: int, stride: int, pads) -> Array:
    """The maxima alone: XLA's reduce_window when not differentiated (inference, export), else `_argmax_pool`."""
    return nn.max_pool(x, (kernel, kernel), (stride, stride), padding=pads)


def _max_pool_fwd(x, kernel, stride, pads):
    (values, _), residuals = _argmax_pool_fwd(x, kernel, stride, pads)
    return values, residuals


def _max_pool_bwd(kernel, stride, pads, residuals, g):
    return _argmax_pool_bwd(kernel, stride, pads, residuals, (g, None))


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


@struct.dataclass
class PoolIndices:
    """`max_pool2d`'s indices (the layout in this module's docstring) and the (H, W) they index into.

    Carrying the input size lets `max_unpool2d` restore a ceil-mode pool of an odd size exactly,
    where PyTorch's default output size would be one short and misplace every value.
    """
    indices: Array
    input_size: tuple = struct.field(pytree_node=False)
    window: tuple = struct.field(pytree_node=False, default=())  # (kernel, stride, padding) of the pool

    # It reads as the index array itself (the contract: indices NHWC like the values), so numpy, jnp
    # and comparisons with PyTorch's indices take it as they are.
    @property
    def shape(self):
        return self.indices.shape

    @property
    def dtype(self):
        return self.indices.dtype

    @property
    def ndim(self):
        return self.indices.ndim

    def __array__(self, dtype=None, copy=None):
        import numpy as np
        return np.asarray(self.indices, dtype)

    def __jax_array__(self):
        return self.indices

    def __getitem__(self, key):
        return self.indices[key]

    def tolist(self):
        return self.indices.tolist()


def max_pool2d(x: Array, kernel_size: int = 2, stride: int | None = None, padding: int = 0,
               ceil_mode: bool = False, return_indices: bool = False):
    """`F.max_pool2d` for NHWC, with ceil_mode (U2-Net, SegNet, caffe's FCN and DeepLab v1) and padding.

    With `return_indices=True` it returns `(values, PoolIndices)`; `PoolIndices.indices` are
    PyTorch's flat indices (see the module docstring), and `max_unpool2d` takes either.

    >>> x = jnp.arange(20.0).reshape(1, 4, 5, 1)
    >>> y, where = max_pool2d(x, 2, ceil_mode=True, return_indices=True)
    >>> y[0, :, :, 0].tolist(), where.indices[0, :, :, 0].tolist()
    ([[6.0, 8.0, 9.0], [16.0, 18.0, 19.0]], [[6, 8, 9], [16, 18, 19]])
    """
    stride = kernel_size if stride is None else stride
    pads = _pool_pads(x.shape[1:3], kernel_size, stride, padding, ceil_mode)
    if not return_indices:
        return _max_pool(x, kernel_size, stride, pads)
    values, tap = _argmax_pool(x, kernel_size, stride, pads)
    oh, ow = values.shape[1:3]
    width = x.shape[2]
    # Window (0, 0)'s flat index, plus the winning tap's offset i * W + j (selected, not divided
    # out of the tap number: ONNX converters handle integer division poorly with symbolic sizes).
    corner = ((jnp.arange(oh, dtype=jnp.int32) * stride - padding) * width)[:, None, None] \
        + (jnp.arange(ow, dtype=jnp.int32) * stride - padding)[None, :, None]
    offset = sum(jnp.where(tap == t, (t // kernel_size) * width + t % kernel_size, 0)
                 for t in range(kernel_size * kernel_size))
    indices = (corner + offset).astype(jnp.int32)
    return values, PoolIndices(indices, tuple(x.shape[1:3]), (kernel_size, stride, padding))


def unpool_output_size(size, kernel: int, stride: int, padding: int, requested=None):
    """F.max_unpool2d's output size: (size - 1) * stride - 2 * padding + kernel, or `requested` within stride of it."""
    default = (size - 1) * stride - 2 * padding + kernel
    if requested is None or is_symbolic(requested, default):
        return default if requested is None else requested
    if not default - stride < requested < default + stride:
        raise SegjaxError(f"max_unpool2d: output size {requested} is out of range for an input of {size}: "
                          f"use a size strictly between {default - stride} and {default + stride}")
    return int(requested)


def max_unpool2d(x: Array, indices, kernel_size: int | Sequence[int], stride=None, padding=0, output_size=None):
    """`F.max_unpool2d` for NHWC: each value of `x` goes to its flat index in a zero (H, W) plane.

    `indices` are `max_pool2d`'s `PoolIndices` or a plain array of flat indices (the module
    docstring's layout) shaped like `x`. (H, W) is `output_size` (the last two entries of a longer
    size, as PyTorch allows), else the pooled input's size that `PoolIndices` carries, else
    (in - 1) * stride - 2 * padding + kernel; PyTorch accepts only sizes strictly within stride of
    that default, and so does this. Its gradient is the output's gradient at each index.

    >>> x = jnp.arange(20.0).reshape(1, 4, 5, 1)
    >>> y, where = max_pool2d(x, 2, ceil_mode=True, return_indices=True)
    >>> max_unpool2d(y, where, 2)[0, :, :, 0].tolist()[1]  # row 1 of the 4x5 plane: 6, 8, 9 back in place
    [0.0, 6.0, 0.0, 8.0, 9.0]
    """
    kernel, stride_hw, pad_hw = pair(kernel_size), pair(stride if stride is not None else kernel_size), pair(padding)
    flat = indices.indices if isinstance(indices, PoolIndices) else jnp.asarray(indices)
    if flat.shape != x.shape:
        raise SegjaxError(f"max_unpool2d: indices of shape {tuple(flat.shape)} do not match the values' "
                          f"{tuple(x.shape)}; pass the indices of the pool that produced x")
    if output_size is None and isinstance(indices, PoolIndices):
        output_size = indices.input_size
    requested = (None, None) if output_size is None else tuple(output_size)[-2:]
    out_hw = tuple(unpool_output_size(x.shape[1 + a], kernel[a], stride_hw[a], pad_hw[a], requested[a]) for a in (0, 1))
    tiles = (isinstance(indices, PoolIndices) and indices.window == (kernel[0], stride_hw[0], pad_hw[0])
             and out_hw == tuple(indices.input_size) and kernel[0] == kernel[1] == stride_hw[0] == stride_hw[1] and pad_hw[0] == pad_hw[1])
    if tiles:  # a pool's own non-overlapping windows: a masked nearest upsampling, no scatter
        return _unpool_windows(x, flat, kernel[0], pad_hw[0], out_hw)
    return _unpool_scatter(x, flat.astype(jnp.int32), out_hw)


def _unpool_windows(x: Array, flat: Array, factor: int, padding: int, out_hw) -> Array:
    """Unpooling of non-overlapping factor x factor windows: each value repeated over its window and
    kept where its flat index is the position's own. Exact for indices that lie in their own windows,
    as a pool's do; no scatter, and no integer division (symbolic sizes export to ONNX)."""
    up = nearest_upsample(x, factor)  # rows -padding .. h * factor - padding - 1 of the output
    width = out_hw[1]
    rows = jnp.arange(up.shape[1], dtype=jnp.int32) - padding
    cols = jnp.arange(up.shape[2], dtype=jnp.int32) - padding
    own = (rows * width)[:, None, None] + cols[None, :, None]
    up = jnp.where(nearest_upsample(flat, factor) == own, up, jnp.zeros((), x.dtype))
    for axis in (1, 2):
        up = _fit(up, axis, padding, out_hw[axis - 1])
    return up


def _fit(x: Array, axis: int, start: int, size) -> Array:
    """x[start:start + size] along `axis`, zero-filled past its end.

    Whether rows are dropped or added at the end is decided as a sign, once: jax proves
    `2 * floordiv(h - 1, 2) + 2 - h >= 0` (a ceil-mode pool's rows) and `h - 2 * floordiv(h, 2) >= 0`
    (a floor-mode pool's), though not their negations, so symbolic sizes keep one static form."""
    extra = size - (x.shape[axis] - start)
    try:
        adds = bool(extra >= 0)
    except InconclusiveDimensionOperation:
        adds = False  # then it is provably <= 0: the slice below checks it
    if not adds:
        return jax.lax.slice_in_dim(x, start, start + size, axis=axis)
    x = jax.lax.slice_in_dim(x, start, x.shape[axis], axis=axis)
    return jnp.pad(x, [(0, extra if a == axis else 0) for a in range(x.ndim)])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _unpool_scatter(x: Array, flat: Array, out_hw) -> Array:
    """Any indices: a scatter into the zero plane; out-of-range indices are dropped."""
    n, h, w, c = x.shape
    plane = jnp.zeros((n, out_hw[0] * out_hw[1], c), x.dtype)
    batch = jnp.arange(n)[:, None, None]
    channel = jnp.arange(c)[None, None, :]
    plane = plane.at[batch, flat.reshape(n, h * w, c), channel].set(x.reshape(n, h * w, c), mode="drop")
    return plane.reshape(n, *out_hw, c)


def _unpool_scatter_fwd(x, flat, out_hw):
    return _unpool_scatter(x, flat, out_hw), flat


def _unpool_scatter_bwd(out_hw, flat, g):
    # PyTorch's rule: every value's gradient is the output gradient at its index (repeated indices too).
    n, h, w, c = flat.shape
    picked = jnp.take_along_axis(g.reshape(n, -1, c), flat.reshape(n, h * w, c), axis=1, mode="fill", fill_value=0)
    return picked.reshape(flat.shape).astype(g.dtype), None


_unpool_scatter.defvjp(_unpool_scatter_fwd, _unpool_scatter_bwd)


def bed_of_nails(x: Array, factor: int) -> Array:
    """Unpooling that puts each value at the top-left corner of its factor x factor block, zeros elsewhere.

    >>> bed_of_nails(jnp.array([[[[1.0], [2.0]]]]), 2)[0, :, :, 0].tolist()
    [[1.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    """
    cfg = [(0, 0, 0)] + [(0, factor - 1, factor - 1)] * 2 + [(0, 0, 0)]
    return jax.lax.pad(x, jnp.zeros((), x.dtype), cfg)


def nearest_upsample(x: Array, factor: int) -> Array:
    """Each value repeated over its factor x factor block (`F.interpolate(mode="nearest", scale_factor=factor)`).

    >>> nearest_upsample(jnp.array([[[[1.0], [2.0]]]]), 2)[0, :, :, 0].tolist()
    [[1.0, 1.0, 2.0, 2.0], [1.0, 1.0, 2.0, 2.0]]
    """
    n, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (n, h, factor, w, factor, c))
    return x.reshape(n, h * factor, w * factor, c)


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
