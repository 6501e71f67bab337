"""Pooling with PyTorch's semantics."""
from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
from flax import linen as nn

from segjax.nn.core import Array, pair

def pool_output_size(size: int, kernel: int, stride: int, padding: int, ceil_mode: bool) -> int:
    """PyTorch's pooling output size, including the ceil_mode rule that a window may not start in the right pad."""
    span = size + 2 * padding - kernel
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


def max_pool2d(x: Array, kernel_size: int = 2, stride: int | None = None, padding: int = 0,
               ceil_mode: bool = False) -> Array:
    """`F.max_pool2d` for NHWC, with ceil_mode (U2-Net, caffe's FCN and DeepLab v1) and symmetric padding.

    ceil_mode pads the right by stride - 1 more (with -inf, which no window sees alone): the floor
    output of that is the ceil output, whatever the size, so symbolic sizes export. Where
    padding + stride > kernel, torch's rule that no window starts in the right pad can drop the
    last window, which needs the concrete size.
    """
    stride = kernel_size if stride is None else stride
    if not ceil_mode:
        extra = (0, 0)
    elif padding + stride <= kernel_size:
        extra = (stride - 1, stride - 1)
    else:
        extra = tuple((pool_output_size(n, kernel_size, stride, padding, True) - 1) * stride + kernel_size
                      - (n + 2 * padding) for n in x.shape[1:3])
    pads = [(padding, padding + max(e, 0)) for e in extra]
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
