"""What every nn module shares: array type aliases, the (h, w) pair rule, the output-size rule, symbolic
sizes, the default init."""
from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from flax import linen as nn

Dtype = Any
Array = jax.Array
ModuleDef = Any  # a Module class, or a functools.partial of one (or of `conv2d`)


def pair(v: int | Sequence[int]) -> tuple[int, int]:
    """An int (numpy ones too) or an (h, w) pair as (h, w)."""
    return (int(v), int(v)) if np.isscalar(v) else (int(v[0]), int(v[1]))


# torchvision's ResNet/MobileNet/segmentation heads use kaiming_normal_(mode="fan_out", relu).
kaiming_normal_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def conv_output_size(size, kernel: int, stride: int = 1, lo: int = 0, hi: int = 0, dilation: int = 1):
    """Output length of a convolution (or window) along one axis: `F.conv2d`'s rule, padding lo + hi."""
    return (size + lo + hi - dilation * (kernel - 1) - 1) // stride + 1


def is_symbolic(*sizes) -> bool:
    """Whether any of `sizes` is a `jax.export` symbolic dimension (an export with free H, W)."""
    return any(jax.export.is_symbolic_dim(n) for n in sizes)
