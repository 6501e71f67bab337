"""`F.interpolate` (bilinear, either align_corners, and nearest) for NHWC, exactly."""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from segjax.nn.core import Array, is_symbolic

def _table_arrays(*sizes):
    """(array module, float type) for index tables over `sizes`: numpy float64 constants for concrete
    sizes, jnp float32 in the program for symbolic ones."""
    return (jnp, jnp.float32) if is_symbolic(*sizes) else (np, np.float64)


def _source_index(out_size, in_size, align_corners: bool, scale_factor: float | None = None):
    """Lower index, upper index and weight of the upper one, as torch's linear interpolation computes them.

    A `scale_factor` (torch's `F.interpolate(scale_factor=...)`) samples at 1/scale_factor rather
    than at in/out, which differs when in * scale_factor is not a whole number. Concrete sizes give
    numpy tables (constants in the compiled program); symbolic ones (`jax.export` with free H, W)
    give the same arithmetic in jnp, in float32.
    """
    xp, ftype = _table_arrays(out_size, in_size)
    dst = xp.arange(out_size, dtype=ftype)
    n_in, n_out = xp.asarray(in_size, ftype), xp.asarray(out_size, ftype)
    if align_corners:  # out_size == 1 samples pixel 0 whatever the ratio
        src = dst * ((n_in - 1) / xp.maximum(n_out - 1, 1))
    else:
        step = 1.0 / scale_factor if scale_factor else n_in / n_out
        src = xp.maximum((dst + 0.5) * step - 0.5, 0.0)
    lo = xp.minimum(xp.floor(src).astype(xp.int32), in_size - 1)
    hi = xp.minimum(lo + 1, in_size - 1)
    return lo, hi, (src - lo).astype(xp.float32)


def _lerp_axis(x: Array, axis: int, out_size, align_corners: bool, scale_factor: float | None = None) -> Array:
    in_size = x.shape[axis]
    if in_size == out_size and not align_corners and (not scale_factor or scale_factor == 1):
        return x  # a symbolic size compares equal only where it provably is
    if is_symbolic(in_size, out_size):  # export: forward only, tables computed in the program
        return _gather_lerp(x, axis, out_size, align_corners, scale_factor)
    return _lerp(x, axis, out_size, align_corners, scale_factor)


def _gather_lerp(x: Array, axis: int, out_size, align_corners: bool, scale_factor: float | None) -> Array:
    lo, hi, w = _source_index(out_size, x.shape[axis], align_corners, scale_factor)
    shape = [1] * x.ndim
    shape[axis] = out_size
    w = jnp.asarray(w).reshape(shape).astype(x.dtype)
    return jnp.take(x, lo, axis=axis) * (1 - w) + jnp.take(x, hi, axis=axis) * w


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _lerp(x: Array, axis: int, out_size: int, align_corners: bool, scale_factor: float | None) -> Array:
    """Linear interpolation along one axis as two gathers (2 multiply-adds per output).

    Its gradient is a matmul with the (out, in) interpolation matrix: autodiff of the gathers is
    a scatter-add, which XLA:CPU runs as a serial loop.
    """
    return _gather_lerp(x, axis, out_size, align_corners, scale_factor)


def _interpolation_matrix(out_size: int, in_size: int, align_corners: bool, scale_factor=None) -> np.ndarray:
    lo, hi, w = _source_index(out_size, in_size, align_corners, scale_factor)
    matrix = np.zeros((out_size, in_size), np.float32)
    np.add.at(matrix, (np.arange(out_size), lo), 1 - w)
    np.add.at(matrix, (np.arange(out_size), hi), w)
    return matrix


def _lerp_forward(x, axis, out_size, align_corners, scale_factor):
    return _lerp(x, axis, out_size, align_corners, scale_factor), x.shape[axis]


def _lerp_backward(axis, out_size, align_corners, scale_factor, in_size, g):
    matrix = jnp.asarray(_interpolation_matrix(out_size, in_size, align_corners, scale_factor), g.dtype)
    dx = jax.lax.dot_general(g, matrix, (((axis,), (0,)), ((), ())))  # the input axis comes last
    return (jnp.moveaxis(dx, -1, axis),)


_lerp.defvjp(_lerp_forward, _lerp_backward)


def _nearest_index(out_size, in_size):
    """torch's 'nearest': source floor(dst * in / out), clamped."""
    xp, ftype = _table_arrays(out_size, in_size)
    ratio = xp.asarray(in_size, ftype) / xp.asarray(out_size, ftype)
    return xp.minimum(xp.floor(xp.arange(out_size, dtype=ftype) * ratio).astype(xp.int32), in_size - 1)


def resize(x: Array, size: Sequence[int] | None, method: str = "bilinear", align_corners: bool = False,
           scale_factor: float | None = None) -> Array:
    """`F.interpolate(x, size=size, mode=method, align_corners=...)` for NHWC `x`, exactly.

    With `size=None` and a `scale_factor` it is `F.interpolate(x, scale_factor=...)`: the size is
    floor(in * scale_factor) and the bilinear samples sit at 1/scale_factor apart.
    Unlike `jax.image.resize` it never antialiases and it supports align_corners=True
    (milesial's UNet). Index tables are static numpy for concrete sizes, so this costs two gathers
    per axis; symbolic sizes (`jax.export` with free H, W) compute the same tables in the program.
    """
    if size is None:
        if not scale_factor:
            raise ValueError("resize: give a size or a scale_factor")
        if method != "bilinear" or align_corners:
            raise ValueError("resize: scale_factor is supported for bilinear with align_corners=False")
        h, w = (int(np.floor(n * scale_factor)) for n in x.shape[1:3])
        return _lerp_axis(_lerp_axis(x, 1, h, False, scale_factor), 2, w, False, scale_factor)
    h, w = (n if is_symbolic(n) else int(n) for n in size)
    if method == "nearest":
        rows, cols = _nearest_index(h, x.shape[1]), _nearest_index(w, x.shape[2])
        return jnp.take(jnp.take(x, rows, axis=1), cols, axis=2)
    if method != "bilinear":
        raise ValueError(f"resize: method must be 'bilinear' or 'nearest', got {method!r}")
    if x.shape[1] == h and x.shape[2] == w:
        return x
    return _lerp_axis(_lerp_axis(x, 1, h, align_corners), 2, w, align_corners)
