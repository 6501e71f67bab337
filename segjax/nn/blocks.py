"""Conv -> norm -> activation, and the ModuleDefs a network's builder binds once."""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Sequence

import jax.numpy as jnp
from flax import linen as nn

from segjax.nn.convolution import ConvTranspose, check_conv_method, conv2d
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
    conv_transpose: ModuleDef


def dtype_partials(dtype: Dtype = None, param_dtype: Dtype = jnp.float32, axis_name: str | None = None,
                   bn_momentum: float = 0.9, bn_epsilon: float = 1e-5, conv_lowering: str = "auto") -> Layers:
    """The layers with the dtypes, axis name, BatchNorm constants and convolution lowering (`conv_plan`)
    bound, as in flax's imagenet example."""
    conv_lowering = check_conv_method(conv_lowering)
    conv = functools.partial(conv2d, dtype=dtype, param_dtype=param_dtype, lowering=conv_lowering)
    norm = functools.partial(BatchNorm, momentum=bn_momentum, epsilon=bn_epsilon, axis_name=axis_name,
                             dtype=dtype, param_dtype=param_dtype)
    return Layers(conv, norm, functools.partial(ConvBN, conv=conv, norm=norm),
                  functools.partial(ConvTranspose, dtype=dtype, param_dtype=param_dtype, lowering=conv_lowering))
