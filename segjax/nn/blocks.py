"""Conv -> norm -> activation, and the ModuleDefs a network's builder binds once."""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Sequence

import jax.numpy as jnp
from flax import linen as nn

from segjax.nn.convolution import conv2d
from segjax.nn.core import Array, Dtype, ModuleDef
from segjax.nn.norm import BatchNorm

class ConvBN(nn.Module):
    """Conv -> norm -> activation, named "0"/"1" like torchvision's Conv2dNormActivation.

    `conv` and `norm` are the network's ModuleDefs (see `dtype_partials`), which carry the dtypes,
    the BatchNorm momentum / epsilon and the axis name.
    """
    features: int
    kernel_size: int | Sequence[int] = 3
    stride: int = 1
    dilation: int = 1
    groups: int = 1
    padding: int | None = None
    act: Callable[[Array], Array] | None = nn.relu
    use_bias: bool = False
    conv: ModuleDef = conv2d
    norm: ModuleDef = BatchNorm

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        x = self.conv(self.features, self.kernel_size, stride=self.stride, padding=self.padding,
                      dilation=self.dilation, groups=self.groups, use_bias=self.use_bias, name="0")(x)
        x = self.norm(name="1")(x, train)
        return self.act(x) if self.act is not None else x


class Layers(NamedTuple):
    """A network's layer factories (ModuleDefs), built once by its builder and handed to its blocks."""
    conv: ModuleDef
    norm: ModuleDef
    conv_bn: ModuleDef


def dtype_partials(dtype: Dtype = None, param_dtype: Dtype = jnp.float32, axis_name: str | None = None,
                   bn_momentum: float = 0.9, bn_epsilon: float = 1e-5) -> Layers:
    """(conv, norm, conv_bn) with the dtypes, axis name and BatchNorm constants bound, as in flax's imagenet example."""
    conv = functools.partial(conv2d, dtype=dtype, param_dtype=param_dtype)
    norm = functools.partial(BatchNorm, momentum=bn_momentum, epsilon=bn_epsilon, axis_name=axis_name,
                             dtype=dtype, param_dtype=param_dtype)
    return Layers(conv, norm, functools.partial(ConvBN, conv=conv, norm=norm))
