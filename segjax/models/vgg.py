"""VGG 11/13/16/19 (Simonyan & Zisserman, 2015), with and without BatchNorm, as torchvision builds them.

The classifier nets mirror torchvision's module paths: `features` numbered "0", "1", ... exactly as
torchvision's Sequential numbers its Conv2d/BatchNorm2d/ReLU/MaxPool2d, `avgpool` (adaptive 7x7) and
`classifier` "0"/"3"/"6", so torchvision state_dicts convert with the generic rule.

`vgg_conv_body` is the conv body on its own, for the segmentation nets (FCN, DeepLab-LargeFOV): it
returns every stage's last activation and pooled output, with the knobs those nets change (padding
of the first conv, each pool's geometry, per-stage dilation) and caffe's layer names (conv1_1, ...).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from segjax.errors import SegjaxError
from segjax.models.registry import register
from segjax.nn import (BatchNorm, ModuleDef, adaptive_avg_pool2d, conv2d, dtype_partials, is_symbolic, max_pool2d,
                       pool_output_size)

# Conv widths per stage; every stage ends with a max-pool.
STAGES: dict[str, tuple[tuple[int, ...], ...]] = {
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}


@dataclasses.dataclass(frozen=True)
class Pool:
    """One max-pool's geometry (torchvision's VGG: 2x2 stride 2, floor)."""
    kernel: int = 2
    stride: int = 2
    padding: int = 0
    ceil_mode: bool = False


TORCHVISION_POOLS = (Pool(),) * 5


def layer_names(stages: Sequence[Sequence[int]], batch_norm: bool, caffe_names: bool) -> list[tuple[str, str | None]]:
    """(conv name, BatchNorm name or None) of every conv in order.

    torchvision numbers conv, [bn,] relu per conv and one index per pool; caffe names are
    conv<stage>_<k> (BatchNorm: conv<stage>_<k>_bn).
    """
    names, index = [], 0
    for s, stage in enumerate(stages, 1):
        for k in range(1, len(stage) + 1):
            if caffe_names:
                names.append((f"conv{s}_{k}", f"conv{s}_{k}_bn" if batch_norm else None))
            else:
                names.append((str(index), str(index + 1) if batch_norm else None))
            index += 3 if batch_norm else 2
        index += 1
    return names


def torchvision_to_caffe(stages: Sequence[Sequence[int]]) -> dict[str, str]:
    """torchvision `features` index -> caffe name, for the convs of a VGG without BatchNorm."""
    return {tv: caffe for (tv, _), (caffe, _) in zip(layer_names(stages, False, False), layer_names(stages, False, True))}


def vgg_conv_body(x: jax.Array, train: bool, *, stages: Sequence[Sequence[int]], batch_norm: bool = False,
                  caffe_names: bool = False, first_padding: int = 1, pools: Sequence[Pool] = TORCHVISION_POOLS,
                  dilations: Sequence[int] = (1,) * 5, conv: ModuleDef = conv2d,
                  norm: ModuleDef = BatchNorm) -> dict[str, jax.Array]:
    """3x3 conv (+BN) + ReLU stages, each closed by a max-pool; call inside a compact method.

    The layers become submodules of the calling module. Returns {"conv1".."conv5": each stage's last
    ReLU output (before its pool), "pool1".."pool5": the pooled outputs}.
    """
    if len(pools) != len(stages) or len(dilations) != len(stages):
        raise ValueError(f"vgg_conv_body: need one pool and one dilation per stage ({len(stages)})")
    if x.ndim != 4:
        raise SegjaxError(f"VGG expects NHWC images, got an array of shape {x.shape}")
    names = iter(layer_names(stages, batch_norm, caffe_names))
    feats = {}
    for s, (stage, pool, dilation) in enumerate(zip(stages, pools, dilations), 1):
        for k, width in enumerate(stage):
            conv_name, bn_name = next(names)
            padding = first_padding if (s, k) == (1, 0) else dilation
            x = conv(width, 3, padding=padding, dilation=dilation, use_bias=True, name=conv_name)(x)
            if bn_name is not None:
                x = norm(name=bn_name)(x, train)
            x = nn.relu(x)
        feats[f"conv{s}"] = x
        out_hw = [pool_output_size(n, pool.kernel, pool.stride, pool.padding, pool.ceil_mode) for n in x.shape[1:3]]
        if not is_symbolic(*out_hw) and min(out_hw) < 1:
            raise SegjaxError(f"VGG: input of shape {x.shape} at pool{s} is too small; use larger images")
        x = max_pool2d(x, pool.kernel, pool.stride, pool.padding, pool.ceil_mode)
        feats[f"pool{s}"] = x
    return feats


class VGGFeatures(nn.Module):
    """`vgg_conv_body` as a module (torchvision's `features`, or a segmentation net's `backbone`)."""
    stages: Sequence[Sequence[int]] = STAGES["vgg16"]
    batch_norm: bool = False
    caffe_names: bool = False
    first_padding: int = 1
    pools: Sequence[Pool] = TORCHVISION_POOLS
    dilations: Sequence[int] = (1,) * 5
    conv: ModuleDef = conv2d
    norm: ModuleDef = BatchNorm

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        return vgg_conv_body(x, train, stages=self.stages, batch_norm=self.batch_norm,
                             caffe_names=self.caffe_names, first_padding=self.first_padding, pools=self.pools,
                             dilations=self.dilations, conv=self.conv, norm=self.norm)


class VGGClassifier(nn.Module):
    """torchvision's `classifier`: Linear-ReLU-Dropout, Linear-ReLU-Dropout, Linear ("0", "3", "6")."""
    num_classes: int
    dropout_rate: float = 0.5
    dense: ModuleDef = nn.Dense

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        # torchvision initialises the Linear layers with N(0, 0.01) and zero bias.
        dense = functools.partial(self.dense, kernel_init=nn.initializers.normal(0.01))
        for name in ("0", "3"):
            x = nn.relu(dense(4096, name=name)(x))
            x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
        return dense(self.num_classes, name="6")(x)


class VGG(nn.Module):
    """ImageNet VGG classifier: {"out": (N, num_classes)} logits."""
    stages: Sequence[Sequence[int]]
    batch_norm: bool = False
    num_classes: int = 1000
    dropout_rate: float = 0.5
    conv: ModuleDef = conv2d
    norm: ModuleDef = BatchNorm
    dense: ModuleDef = nn.Dense

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        feats = VGGFeatures(self.stages, self.batch_norm, conv=self.conv, norm=self.norm, name="features")(x, train)
        x = adaptive_avg_pool2d(feats["pool5"], 7)
        # torch flattens NCHW; flattening in its (C, H, W) order lets classifier.0 convert unchanged.
        x = x.transpose(0, 3, 1, 2).reshape(x.shape[0], -1)
        logits = VGGClassifier(self.num_classes, self.dropout_rate, self.dense, name="classifier")(x, train)
        return {"out": logits}


def vgg(arch: str, batch_norm: bool, num_classes: int = 1000, dropout_rate: float = 0.5, dtype=None,
        param_dtype=jnp.float32, axis_name=None, conv_lowering: str = "auto") -> VGG:
    layers = dtype_partials(dtype, param_dtype, axis_name, conv_lowering=conv_lowering)
    return VGG(STAGES[arch], batch_norm, num_classes, dropout_rate, conv=layers.conv, norm=layers.norm,
               dense=functools.partial(nn.Dense, dtype=dtype, param_dtype=param_dtype))


for _arch in STAGES:
    register(_arch, "classification")(functools.partial(vgg, _arch, False))
    register(_arch + "_bn", "classification")(functools.partial(vgg, _arch, True))
