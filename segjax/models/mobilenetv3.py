"""MobileNetV3 Large and Small ("Searching for MobileNetV3", Howard et al. 2019), as torchvision builds them.

The network is torchvision's `features` Sequential: a stride-2 3x3 stem "0", one inverted-residual
bottleneck per row of the paper's Table 1 (Large) / Table 2 (Small) named "1".."n", and a 1x1
conv "n+1" to 6x the last width. Each bottleneck keeps torchvision's inner names: "block" holding
"0", "1", ... (optional 1x1 expand, depthwise conv, optional squeeze-excitation "fc1"/"fc2",
linear 1x1 projection). BatchNorm is eps=1e-3 with PyTorch momentum 0.01 (Flax 0.99).

`dilated=True` is the segmentation variant (torchvision's `_mobilenet_v3_conf(dilated=True)`): the
last stage keeps stride 16 and uses dilation 2 in its depthwise convs instead.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
from flax import linen as nn

from segjax.errors import SegjaxError
from segjax.models.registry import register
from segjax.nn import Layers, ModuleDef, dtype_partials

BN_MOMENTUM = 0.99  # PyTorch momentum 0.01
BN_EPSILON = 1e-3


def backbone_layers(dtype=None, param_dtype=jnp.float32, axis_name=None, conv_lowering: str = "auto") -> Layers:
    """The network's layers (its BatchNorm constants; segmentation heads on it keep PyTorch's defaults)."""
    return dtype_partials(dtype, param_dtype, axis_name, BN_MOMENTUM, BN_EPSILON, conv_lowering=conv_lowering)


_LAYERS = backbone_layers()


def make_divisible(value: float, divisor: int = 8) -> int:
    """torchvision's `_make_divisible`: round to the nearest multiple of divisor, never losing over 10%."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


@dataclasses.dataclass(frozen=True)
class Bottleneck:
    """One row of the paper's architecture table."""
    in_channels: int
    kernel: int
    expanded: int
    out_channels: int
    use_se: bool
    hardswish: bool  # "HS" in the table; otherwise ReLU ("RE")
    stride: int
    dilation: int = 1


#            in  k  exp  out  SE     HS     stride
_LARGE = [(16, 3, 16, 16, False, False, 1),
          (16, 3, 64, 24, False, False, 2),    # C1
          (24, 3, 72, 24, False, False, 1),
          (24, 5, 72, 40, True, False, 2),     # C2
          (40, 5, 120, 40, True, False, 1),
          (40, 5, 120, 40, True, False, 1),
          (40, 3, 240, 80, False, True, 2),    # C3
          (80, 3, 200, 80, False, True, 1),
          (80, 3, 184, 80, False, True, 1),
          (80, 3, 184, 80, False, True, 1),
          (80, 3, 480, 112, True, True, 1),
          (112, 3, 672, 112, True, True, 1),
          (112, 5, 672, 160, True, True, 2),   # C4
          (160, 5, 960, 160, True, True, 1),
          (160, 5, 960, 160, True, True, 1)]
_SMALL = [(16, 3, 16, 16, True, False, 2),     # C1
          (16, 3, 72, 24, False, False, 2),    # C2
          (24, 3, 88, 24, False, False, 1),
          (24, 5, 96, 40, True, True, 2),      # C3
          (40, 5, 240, 40, True, True, 1),
          (40, 5, 240, 40, True, True, 1),
          (40, 5, 120, 48, True, True, 1),
          (48, 5, 144, 48, True, True, 1),
          (48, 5, 288, 96, True, True, 2),     # C4
          (96, 5, 576, 96, True, True, 1),
          (96, 5, 576, 96, True, True, 1)]
_ARCHS = {"large": (_LARGE, 1280), "small": (_SMALL, 1024)}  # rows, classifier hidden width


def bottlenecks(arch: str, dilated: bool = False) -> tuple[list[Bottleneck], int]:
    """The bottleneck rows of `arch` and the classifier's hidden width; dilated=True dilates the last stage."""
    if arch not in _ARCHS:
        raise SegjaxError(f"MobileNetV3 arch must be one of {sorted(_ARCHS)}, got {arch!r}")
    rows, last_channel = _ARCHS[arch]
    last_stage = max(i for i, row in enumerate(rows) if row[6] == 2)
    blocks = [Bottleneck(*row, dilation=2 if dilated and i >= last_stage else 1) for i, row in enumerate(rows)]
    return blocks, last_channel


def stage_indices(blocks: list[Bottleneck]) -> list[int]:
    """Indices into `features` of the stem, every strided bottleneck and the last conv (torchvision's rule)."""
    return [0] + [i for i, b in enumerate(blocks, start=1) if b.stride > 1] + [len(blocks) + 1]


class SqueezeExcitation(nn.Module):
    """x * hardsigmoid(fc2(relu(fc1(mean_hw(x))))), fc1/fc2 being 1x1 convs with bias."""
    squeeze_channels: int
    conv: ModuleDef = _LAYERS.conv

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(self.conv, kernel_size=1, use_bias=True)
        s = x.mean(axis=(1, 2), keepdims=True)
        s = nn.relu(conv(self.squeeze_channels, name="fc1")(s))
        s = jax.nn.hard_sigmoid(conv(x.shape[-1], name="fc2")(s))
        return x * s


class BottleneckLayers(nn.Module):
    """torchvision's `InvertedResidual.block`: [expand 1x1], depthwise kxk, [SE], project 1x1 (no activation)."""
    cfg: Bottleneck
    conv: ModuleDef = _LAYERS.conv
    conv_bn: ModuleDef = _LAYERS.conv_bn

    @nn.compact
    def __call__(self, x, train: bool = False):
        cfg, conv_bn = self.cfg, self.conv_bn
        act = jax.nn.hard_swish if cfg.hardswish else nn.relu
        names = map(str, itertools.count())
        if cfg.expanded != cfg.in_channels:
            x = conv_bn(cfg.expanded, 1, act=act, name=next(names))(x, train)
        # A dilated stage trades its stride for dilation (output stride stays 16).
        stride = 1 if cfg.dilation > 1 else cfg.stride
        x = conv_bn(cfg.expanded, cfg.kernel, stride=stride, dilation=cfg.dilation, groups=cfg.expanded, act=act,
                    name=next(names))(x, train)
        if cfg.use_se:
            x = SqueezeExcitation(make_divisible(cfg.expanded // 4), self.conv, name=next(names))(x)
        return conv_bn(cfg.out_channels, 1, act=None, name=next(names))(x, train)


class InvertedResidual(nn.Module):
    cfg: Bottleneck
    conv: ModuleDef = _LAYERS.conv
    conv_bn: ModuleDef = _LAYERS.conv_bn

    @nn.compact
    def __call__(self, x, train: bool = False):
        y = BottleneckLayers(self.cfg, self.conv, self.conv_bn, name="block")(x, train)
        if self.cfg.stride == 1 and self.cfg.in_channels == self.cfg.out_channels:
            y = y + x
        return y


class MobileNetV3Features(nn.Module):
    """torchvision's `MobileNetV3.features` ("0".."16" Large, "0".."12" Small) as a feature extractor.

    Returns {"low": output of features[stage_indices[-4]] (Large: features[4], 40 ch, stride 8),
             "high": output of the last conv (Large: features[16], 960 ch, stride 32, or 16 if dilated)},
    the taps torchvision's LR-ASPP and DeepLabV3 heads use. Name it "backbone" in a segmentation model.
    """
    arch: str = "large"
    dilated: bool = False
    conv: ModuleDef = _LAYERS.conv
    conv_bn: ModuleDef = _LAYERS.conv_bn

    @nn.compact
    def __call__(self, x, train: bool = False) -> dict:
        blocks, _ = bottlenecks(self.arch, self.dilated)
        low_index = stage_indices(blocks)[-4]
        conv_bn = functools.partial(self.conv_bn, act=jax.nn.hard_swish)
        x = conv_bn(blocks[0].in_channels, 3, stride=2, name="0")(x, train)
        low = None
        for i, cfg in enumerate(blocks, start=1):
            x = InvertedResidual(cfg, self.conv, self.conv_bn, name=str(i))(x, train)
            if i == low_index:
                low = x
        high = conv_bn(6 * blocks[-1].out_channels, 1, name=str(len(blocks) + 1))(x, train)
        return {"low": low, "high": high}


class ClassifierHead(nn.Module):
    """torchvision's `classifier`: "0" Linear, Hardswish, Dropout, "3" Linear."""
    hidden: int
    num_classes: int
    dropout_rate: float = 0.2
    dense: ModuleDef = nn.Dense

    @nn.compact
    def __call__(self, x, train: bool = False):
        dense = functools.partial(self.dense, kernel_init=nn.initializers.normal(0.01))
        x = jax.nn.hard_swish(dense(self.hidden, name="0")(x))
        x = nn.Dropout(self.dropout_rate, deterministic=not train or self.dropout_rate == 0)(x)
        return dense(self.num_classes, name="3")(x)


class MobileNetV3(nn.Module):
    """ImageNet classifier: features -> global average pool -> classifier. Returns {"out": (N, num_classes)}."""
    num_classes: int = 1000
    arch: str = "large"
    dilated: bool = False
    dropout_rate: float = 0.2
    conv: ModuleDef = _LAYERS.conv
    conv_bn: ModuleDef = _LAYERS.conv_bn
    dense: ModuleDef = nn.Dense

    @nn.compact
    def __call__(self, x, train: bool = False) -> dict:
        _, hidden = bottlenecks(self.arch)
        x = MobileNetV3Features(self.arch, self.dilated, self.conv, self.conv_bn, name="features")(x, train)["high"]
        x = x.mean(axis=(1, 2))
        x = ClassifierHead(hidden, self.num_classes, self.dropout_rate, self.dense, name="classifier")(x, train)
        return {"out": x}


def mobilenet_v3(arch: str, num_classes: int = 1000, dilated: bool = False, dropout_rate: float = 0.2, dtype=None,
                 param_dtype=jnp.float32, axis_name=None, conv_lowering: str = "auto") -> MobileNetV3:
    layers = backbone_layers(dtype, param_dtype, axis_name, conv_lowering)
    return MobileNetV3(num_classes, arch, dilated, dropout_rate, layers.conv, layers.conv_bn,
                       functools.partial(nn.Dense, dtype=dtype, param_dtype=param_dtype))


for _arch in ("large", "small"):
    register(f"mobilenet_v3_{_arch}", kind="classification")(functools.partial(mobilenet_v3, _arch))
