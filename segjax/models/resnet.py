"""ResNet 18/34/50/101/152 (He et al. 2016), laid out exactly like torchvision's.

Module names mirror torchvision (conv1, bn1, layer1..4, "0".."k" blocks, conv1/bn1/.../downsample
with "0" conv and "1" BN, fc), so torchvision state_dicts convert with the generic rule.
Bottleneck puts the stride on the 3x3 conv (ResNet v1.5, as torchvision does).

`replace_stride_with_dilation` follows torchvision: a stage whose flag is set keeps stride 1 and
multiplies the running dilation by 2 instead; its first block still uses the dilation of the
stage before it (torchvision's `previous_dilation`), the other blocks the new one.

`style="caffe"` is the MSRA ResNet that caffe-trained DeepLab v2 weights use: a bottleneck's stride
on its first 1x1 conv, the stem max-pool in ceil mode, and every block of a dilated stage at the
stage's dilation (the first one too). Parameter names do not change.

`multi_grid` (DeepLab v3's, e.g. (1, 2, 4)): layer4's blocks at its dilation times these factors;
with it, as in DeepLab v3 and its multi-grid ports, every block of a dilated stage (its first one
too) runs at the stage's dilation.

Without `num_classes` the network is a backbone returning its features by name:
"stem" (after conv1/bn1/relu, stride 2, 64 ch), "layer1".."layer4" (strides 4, 8, 16, 32 before dilation).
With `num_classes` it is the ImageNet classifier (global average pool + fc) returning {"out": (N, C)}.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax.numpy as jnp
from flax import linen as nn

from segjax.errors import SegjaxError
from segjax.models.registry import register
from segjax.nn import BatchNorm, ConvBN, Layers, ModuleDef, conv2d, dtype_partials, max_pool2d


class BasicBlock(nn.Module):
    planes: int
    stride: int = 1
    dilation: int = 1
    downsample: bool = False
    conv: ModuleDef = conv2d
    norm: ModuleDef = BatchNorm
    conv_bn: ModuleDef = ConvBN
    expansion = 1

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.dilation > 1:
            raise NotImplementedError("BasicBlock does not support dilation (as in torchvision)")
        conv, norm = self.conv, self.norm
        identity = x
        y = nn.relu(norm(name="bn1")(conv(self.planes, 3, self.stride, name="conv1")(x), train))
        y = norm(name="bn2")(conv(self.planes, 3, name="conv2")(y), train)
        if self.downsample:
            identity = self.conv_bn(self.planes, 1, self.stride, act=None, name="downsample")(x, train)
        return nn.relu(y + identity)


class Bottleneck(nn.Module):
    planes: int
    stride: int = 1
    dilation: int = 1
    downsample: bool = False
    stride_on_1x1: bool = False  # caffe's MSRA ResNet; torchvision (v1.5) strides the 3x3
    conv: ModuleDef = conv2d
    norm: ModuleDef = BatchNorm
    conv_bn: ModuleDef = ConvBN
    expansion = 4

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv, norm = self.conv, self.norm
        out_channels = self.planes * self.expansion
        identity = x
        s1, s3 = (self.stride, 1) if self.stride_on_1x1 else (1, self.stride)
        y = nn.relu(norm(name="bn1")(conv(self.planes, 1, s1, name="conv1")(x), train))
        y = nn.relu(norm(name="bn2")(conv(self.planes, 3, s3, dilation=self.dilation, name="conv2")(y), train))
        y = norm(name="bn3")(conv(out_channels, 1, name="conv3")(y), train)
        if self.downsample:
            identity = self.conv_bn(out_channels, 1, self.stride, act=None, name="downsample")(x, train)
        return nn.relu(y + identity)


def stage_plan(stage_sizes: Sequence[int], expansion: int, replace_stride_with_dilation: Sequence[bool],
               caffe: bool = False, multi_grid: Sequence[int] | None = None):
    """Per stage: list of (stride, dilation, downsample) for each block, as torchvision's `_make_layer`
    (caffe or multi_grid: the first block of a dilated stage at the stage's dilation too; multi_grid:
    layer4's block j at its dilation x multi_grid[j])."""
    if multi_grid is not None and len(multi_grid) != stage_sizes[3]:
        raise SegjaxError(f"multi_grid={list(multi_grid)}: needs one factor per layer4 block ({stage_sizes[3]})")
    caffe = caffe or multi_grid is not None
    inplanes, dilation, plan = 64, 1, []
    for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), stage_sizes)):
        stride = 1 if i == 0 else 2
        previous_dilation = dilation
        if i > 0 and replace_stride_with_dilation[i - 1]:
            dilation *= stride
            stride = 1
        downsample = stride != 1 or inplanes != planes * expansion
        first_dilation = dilation if caffe else previous_dilation
        blocks_plan = [(stride, first_dilation, downsample)] + [(1, dilation, False)] * (blocks - 1)
        if i == 3 and multi_grid is not None:
            blocks_plan = [(s, dilation * int(g), d) for (s, _, d), g in zip(blocks_plan, multi_grid)]
        plan.append((planes, blocks_plan))
        inplanes = planes * expansion
    return plan


class ResLayer(nn.Module):
    """One stage ("layer1".."layer4"): blocks named "0".."k" like torchvision's Sequential."""
    block: ModuleDef  # the block class with the network's layers bound
    planes: int
    blocks: Sequence[tuple[int, int, bool]]  # (stride, dilation, downsample) per block

    @nn.compact
    def __call__(self, x, train: bool = False):
        for j, (stride, dilation, downsample) in enumerate(self.blocks):
            x = self.block(self.planes, stride, dilation, downsample, name=str(j))(x, train)
        return x


class ResNet(nn.Module):
    stage_sizes: Sequence[int]
    block: type = Bottleneck
    replace_stride_with_dilation: Sequence[bool] = (False, False, False)
    num_classes: int | None = None  # None: a backbone returning its features by name
    style: str = "torchvision"  # or "caffe" (see the module docstring)
    multi_grid: Sequence[int] | None = None
    conv: ModuleDef = conv2d
    norm: ModuleDef = BatchNorm
    conv_bn: ModuleDef = ConvBN
    dense: ModuleDef = nn.Dense

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.style not in ("torchvision", "caffe"):
            raise SegjaxError(f"resnet_style={self.style!r}: choose 'torchvision' or 'caffe'")
        caffe = self.style == "caffe"
        if caffe and self.block is not Bottleneck:
            raise SegjaxError("resnet_style='caffe' needs a bottleneck ResNet (50 or deeper)")
        if len(self.replace_stride_with_dilation) != 3:
            raise ValueError("replace_stride_with_dilation needs 3 flags (layer2, layer3, layer4)")
        x = nn.relu(self.norm(name="bn1")(self.conv(64, 7, 2, padding=3, name="conv1")(x), train))
        features = {"stem": x}
        x = max_pool2d(x, 3, 2, padding=1, ceil_mode=caffe)
        multi_grid = None if self.multi_grid is None else tuple(self.multi_grid)
        plan = stage_plan(self.stage_sizes, self.block.expansion, self.replace_stride_with_dilation, caffe, multi_grid)
        block = functools.partial(self.block, conv=self.conv, norm=self.norm, conv_bn=self.conv_bn)
        if caffe:
            block = functools.partial(block, stride_on_1x1=True)
        for i, (planes, blocks) in enumerate(plan):
            x = ResLayer(block, planes, tuple(blocks), name=f"layer{i + 1}")(x, train)
            features[f"layer{i + 1}"] = x
        if self.num_classes is None:
            return features
        return {"out": self.dense(self.num_classes, name="fc")(x.mean(axis=(1, 2)))}


STAGE_SIZES = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


def resnet_backbone(depth: int, replace_stride_with_dilation=(False, False, False), layers: Layers | None = None,
                    **kw) -> ResNet:
    """ResNet-`depth` built from `layers` (`dtype_partials`); without num_classes, the feature extractor
    the segmentation heads sit on (no avgpool/fc)."""
    if depth not in STAGE_SIZES:
        raise SegjaxError(f"ResNet depth {depth}: choose one of {sorted(STAGE_SIZES)}")
    block = BasicBlock if depth < 50 else Bottleneck
    if block is BasicBlock and any(replace_stride_with_dilation):
        raise SegjaxError(f"resnet{depth} (BasicBlock) cannot be dilated, as in torchvision; use resnet50 or deeper")
    layers = layers or dtype_partials()
    return ResNet(STAGE_SIZES[depth], block, tuple(replace_stride_with_dilation), conv=layers.conv, norm=layers.norm,
                  conv_bn=layers.conv_bn, **kw)


def resnet(depth: int, num_classes: int = 1000, replace_stride_with_dilation=(False, False, False), dtype=None,
           param_dtype=jnp.float32, axis_name=None, conv_lowering: str = "auto") -> ResNet:
    """The ImageNet classifier (global average pool + fc), returning {"out": (N, num_classes)}."""
    return resnet_backbone(depth, replace_stride_with_dilation, dtype_partials(dtype, param_dtype, axis_name, conv_lowering=conv_lowering),
                           num_classes=num_classes, dense=functools.partial(nn.Dense, dtype=dtype, param_dtype=param_dtype))


for _depth in STAGE_SIZES:
    register(f"resnet{_depth}", kind="classification")(functools.partial(resnet, _depth))
