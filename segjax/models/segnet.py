"""SegNet (Badrinarayanan, Kendall & Cipolla, TPAMI 2017), as the original caffe net builds it.

    encoder (VGG16-BN's 13 convs)                      decoder (the mirror)
    conv1_1, conv1_2            -> pool1 --indices-->  unpool1 -> conv1_2_D, conv1_1_D (num_classes logits)
    conv2_1, conv2_2            -> pool2 --indices-->  unpool2 -> conv2_2_D, conv2_1_D
    conv3_1 .. conv3_3          -> pool3 --indices-->  unpool3 -> conv3_3_D .. conv3_1_D
    conv4_1 .. conv4_3          -> pool4 --indices-->  unpool4 -> conv4_3_D .. conv4_1_D
    conv5_1 .. conv5_3          -> pool5 --indices-->  unpool5 -> conv5_3_D .. conv5_1_D

Every conv is 3x3 (pad 1, with bias) -> BatchNorm -> ReLU, except conv1_1_D, which gives the
logits. Each decoder stage keeps its encoder stage's width, its last conv narrows to the width of
the stage above. Pools are 2x2/2 and return their indices; each unpooling puts the values back where
its pool found them, at the size the pool saw. caffe pools with ceil_mode (the default here): at
360x480 the encoder goes 180x240, 90x120, 45x60, 23x30, 12x15, and the decoder back through exactly
those sizes. `ceil_mode=False` is the geometry of the common PyTorch ports (floor pools; their
default unpooling size gives back each pool's input size only where H and W are multiples of 32).

The encoder lives under "encoder" with caffe's names (conv1_1, conv1_1_bn, ...), so
`segjax.convert.load_backbone` fills it from torchvision's vgg16_bn (the paper starts from VGG16).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from segjax.errors import SegjaxError
from segjax.models.registry import register
from segjax.models.vgg import STAGES
from segjax.nn import BatchNorm, ModuleDef, PoolIndices, conv2d, dtype_partials, is_symbolic, max_pool2d, max_unpool2d

POOL = 2  # every pool is 2x2, stride 2


def conv_bn_relu(conv: ModuleDef, norm: ModuleDef, width: int, name: str, x: jax.Array, train: bool) -> jax.Array:
    """caffe's Convolution (3x3, pad 1, bias) -> BN -> ReLU, named `name` and `name`_bn; inside a compact method."""
    x = conv(width, 3, padding=1, use_bias=True, name=name)(x)
    return nn.relu(norm(name=f"{name}_bn")(x, train))


class SegNetEncoder(nn.Module):
    """VGG16-BN's conv body; returns pool5 and every pool's indices (pool1 first)."""
    stages: Sequence[Sequence[int]] = STAGES["vgg16"]
    ceil_mode: bool = True
    conv: ModuleDef = conv2d
    norm: ModuleDef = BatchNorm

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, list[PoolIndices]]:
        pool_indices = []
        for s, widths in enumerate(self.stages, 1):
            for k, width in enumerate(widths, 1):
                x = conv_bn_relu(self.conv, self.norm, width, f"conv{s}_{k}", x, train)
            if not self.ceil_mode and not is_symbolic(*x.shape[1:3]) and min(x.shape[1:3]) < POOL:
                raise SegjaxError(f"SegNet (ceil_mode=False): input too small, {x.shape[1:3]} at pool{s}; "
                                  f"use images of at least {POOL ** len(self.stages)} px or ceil_mode=True")
            x, where = max_pool2d(x, POOL, POOL, ceil_mode=self.ceil_mode, return_indices=True)
            pool_indices.append(where)
        return x, pool_indices


class SegNetDecoder(nn.Module):
    """The encoder's mirror: unpool with the stage's indices, then its convs in reverse order."""
    num_classes: int
    stages: Sequence[Sequence[int]] = STAGES["vgg16"]
    conv: ModuleDef = conv2d
    norm: ModuleDef = BatchNorm

    @nn.compact
    def __call__(self, x: jax.Array, pool_indices: Sequence[PoolIndices], train: bool = False) -> jax.Array:
        for s in range(len(self.stages), 0, -1):
            x = max_unpool2d(x, pool_indices[s - 1], POOL, POOL)
            widths = self.stages[s - 1]
            narrower = self.stages[s - 2][-1] if s > 1 else None  # the stage above's width
            for k in range(len(widths), 1, -1):
                x = conv_bn_relu(self.conv, self.norm, widths[k - 1], f"conv{s}_{k}_D", x, train)
            if narrower is not None:
                x = conv_bn_relu(self.conv, self.norm, narrower, f"conv{s}_1_D", x, train)
        # conv1_1_D: the logits, no BN or ReLU
        return self.conv(self.num_classes, 3, padding=1, use_bias=True, name="conv1_1_D")(x)


class SegNet(nn.Module):
    """{"out": (N, H, W, num_classes)} logits at the input's size."""
    num_classes: int
    stages: Sequence[Sequence[int]] = STAGES["vgg16"]
    ceil_mode: bool = True
    conv: ModuleDef = conv2d
    norm: ModuleDef = BatchNorm

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        if x.ndim != 4:
            raise SegjaxError(f"SegNet expects NHWC images, got an array of shape {x.shape}")
        x, pool_indices = SegNetEncoder(self.stages, self.ceil_mode, self.conv, self.norm, name="encoder")(x, train)
        logits = SegNetDecoder(self.num_classes, self.stages, self.conv, self.norm, name="decoder")(
            x, pool_indices, train)
        return {"out": logits}


@register("segnet_vgg16_bn")
def segnet_vgg16_bn(num_classes: int = 11, ceil_mode: bool = True, base_width: int = 64, dtype=None,
                    param_dtype=jnp.float32, axis_name=None, conv_lowering: str = "auto") -> SegNet:
    """SegNet on VGG16-BN; `base_width` scales every stage (64: the paper's; smaller for quick tests)."""
    if base_width < 1:
        raise SegjaxError(f"segnet_vgg16_bn: base_width must be a positive integer, got {base_width}")
    stages = tuple(tuple(max(1, w * base_width // 64) for w in stage) for stage in STAGES["vgg16"])
    layers = dtype_partials(dtype, param_dtype, axis_name, conv_lowering=conv_lowering)
    return SegNet(num_classes, stages, ceil_mode, conv=layers.conv, norm=layers.norm)
