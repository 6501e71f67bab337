"""DeepLab v2, v3 and v3+ on ResNet (and v3 on MobileNetV3), with one shared ASPP.

- v2 (Chen et al. 2017, TPAMI): ResNet-101 at output stride 8, "ASPP-L": four 3x3 convs (with bias)
  at rates 6/12/18/24 straight to the classes, summed.
- v3 (Chen et al. 2017, arXiv:1706.05587), as torchvision's `deeplabv3_*`: ASPP (1x1 branch, three
  3x3 atrous branches, image pooling; 256 ch each), 1x1 projection + BN + ReLU + Dropout(0.5), then
  3x3 conv + BN + ReLU and a 1x1 classifier. Output stride 8 (rates 12/24/36, torchvision's default)
  or 16 (rates 6/12/18, only layer4 dilated). Optional auxiliary FCNHead on layer3.
- v3+ (Chen et al. 2018, ECCV): the v3 ASPP as encoder (output stride 16 by default), then a decoder:
  layer1 projected to 48 ch (1x1 + BN + ReLU), the ASPP output bilinearly upsampled to layer1's size,
  concatenated, two 3x3 conv(256) + BN + ReLU (the paper's Table 2 choice; some PyTorch ports use
  one), and a 1x1 classifier. VainF/DeepLabV3Plus-Pytorch's head is `decoder_convs=1,
  low_level_first=True` (one 3x3 conv on [low-level, ASPP]).
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax.numpy as jnp
from flax import linen as nn

from segjax.errors import SegjaxError
from segjax.models import mobilenetv3
from segjax.models._utils import FCNHead, SegmentationModel
from segjax.models.registry import register
from segjax.models.resnet import resnet_backbone
from segjax.nn import BatchNorm, ConvBN, Layers, ModuleDef, conv2d, dtype_partials, resize

ASPP_RATES = {8: (12, 24, 36), 16: (6, 12, 18)}
# Which ResNet stages trade their stride for dilation at a given output stride.
RESNET_DILATION = {8: (False, True, True), 16: (False, False, True)}


class ASPPPooling(nn.Module):
    """Image-level branch: global average pool, 1x1 conv, BN, ReLU, broadcast back (torchvision's
    bilinear resize of a 1x1 map is a broadcast). Children "1"/"2": torchvision's "0" is the pool."""
    features: int = 256
    conv: ModuleDef = conv2d
    norm: ModuleDef = BatchNorm

    @nn.compact
    def __call__(self, x, train: bool = False):
        y = x.astype(jnp.float32).mean(axis=(1, 2), keepdims=True).astype(x.dtype)
        y = nn.relu(self.norm(name="2")(self.conv(self.features, 1, name="1")(y), train))
        return jnp.broadcast_to(y, x.shape[:3] + (self.features,))


class ASPPBranches(nn.Module):
    """The parallel branches ("convs" in torchvision): "0" 1x1, "1".."n" 3x3 atrous, last the pooling."""
    rates: Sequence[int]
    features: int = 256
    conv: ModuleDef = conv2d
    norm: ModuleDef = BatchNorm
    conv_bn: ModuleDef = ConvBN

    @nn.compact
    def __call__(self, x, train: bool = False):
        branches = [self.conv_bn(self.features, 1, name="0")(x, train)]
        for i, rate in enumerate(self.rates):
            branches.append(self.conv_bn(self.features, 3, dilation=rate, name=str(i + 1))(x, train))
        pooling = ASPPPooling(self.features, self.conv, self.norm, name=str(len(self.rates) + 1))
        branches.append(pooling(x, train))
        return jnp.concatenate(branches, axis=-1)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: branches, concat, 1x1 projection + BN + ReLU + dropout."""
    rates: Sequence[int]
    features: int = 256
    dropout_rate: float = 0.5
    conv: ModuleDef = conv2d
    norm: ModuleDef = BatchNorm
    conv_bn: ModuleDef = ConvBN

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = ASPPBranches(tuple(self.rates), self.features, self.conv, self.norm, self.conv_bn, name="convs")(x, train)
        x = self.conv_bn(self.features, 1, name="project")(x, train)
        return nn.Dropout(self.dropout_rate, deterministic=not train)(x)


class DeepLabHead(nn.Module):
    """torchvision's DeepLabHead: "0" ASPP, "1" 3x3 conv, "2" BN, (ReLU), "4" 1x1 classifier."""
    channels: int
    rates: Sequence[int] = (12, 24, 36)
    dropout_rate: float = 0.5
    conv: ModuleDef = conv2d
    norm: ModuleDef = BatchNorm
    conv_bn: ModuleDef = ConvBN

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = ASPP(tuple(self.rates), 256, self.dropout_rate, self.conv, self.norm, self.conv_bn, name="0")(x, train)
        x = nn.relu(self.norm(name="2")(self.conv(256, 3, name="1")(x), train))
        return self.conv(self.channels, 1, use_bias=True, name="4")(x)


class DeepLabV3PlusHead(nn.Module):
    """ASPP encoder output + 48-ch projection of the low-level features -> two 3x3 convs -> classes."""
    channels: int
    rates: Sequence[int] = (6, 12, 18)
    low_level_features: int = 48
    dropout_rate: float = 0.1
    decoder_convs: int = 2  # 3x3 conv + BN + ReLU layers after the concat ("decoder_0", ...)
    low_level_first: bool = False  # concat order: [low-level, ASPP] instead of [ASPP, low-level]
    align_corners: bool = False  # of the ASPP output's resize to the low-level features
    conv: ModuleDef = conv2d
    norm: ModuleDef = BatchNorm
    conv_bn: ModuleDef = ConvBN

    @nn.compact
    def __call__(self, high, low, train: bool = False):
        high = ASPP(tuple(self.rates), 256, self.dropout_rate, self.conv, self.norm, self.conv_bn, name="aspp")(high, train)
        low = self.conv_bn(self.low_level_features, 1, name="project")(low, train)
        parts = [resize(high, low.shape[1:3], "bilinear", align_corners=self.align_corners), low.astype(high.dtype)]
        x = jnp.concatenate(parts[::-1] if self.low_level_first else parts, axis=-1)
        for i in range(self.decoder_convs):
            x = self.conv_bn(256, 3, name=f"decoder_{i}")(x, train)
        return self.conv(self.channels, 1, use_bias=True, name="logits")(x)


class ASPPLargeFOV(nn.Module):
    """DeepLab v2's ASPP-L: parallel 3x3 convs (with bias) at each rate straight to classes, summed."""
    channels: int
    rates: Sequence[int] = (6, 12, 18, 24)
    conv: ModuleDef = conv2d

    @nn.compact
    def __call__(self, x, train: bool = False):
        init = nn.initializers.normal(0.01)  # as the reference Caffe/PyTorch ports
        outs = [self.conv(self.channels, 3, dilation=r, use_bias=True, kernel_init=init, name=str(i))(x)
                for i, r in enumerate(self.rates)]
        return sum(outs[1:], outs[0])


def _check_output_stride(output_stride: int) -> None:
    if output_stride not in ASPP_RATES:
        raise SegjaxError(f"output_stride={output_stride}: choose 8 or 16")


def _aux_head(num_classes: int, dropout_rate: float, aux_dropout_rate: float | None, layers: Layers) -> FCNHead:
    # torchvision's aux FCNHead uses 0.1; dropout_rate=0 (dropout off) turns it off too unless given.
    if aux_dropout_rate is None:
        aux_dropout_rate = 0.1 if dropout_rate > 0 else 0.0
    return FCNHead(num_classes, aux_dropout_rate, layers.conv, layers.norm)


def deeplabv3_resnet(depth: int, num_classes: int = 21, aux: bool = False, output_stride: int = 8,
                     dropout_rate: float = 0.5, aux_dropout_rate: float | None = None, dtype=None,
                     param_dtype=jnp.float32, axis_name=None, conv_lowering: str = "auto") -> SegmentationModel:
    _check_output_stride(output_stride)
    layers = dtype_partials(dtype, param_dtype, axis_name, conv_lowering=conv_lowering)
    backbone = resnet_backbone(depth, RESNET_DILATION[output_stride], layers)
    classifier = DeepLabHead(num_classes, ASPP_RATES[output_stride], dropout_rate, layers.conv, layers.norm, layers.conv_bn)
    aux_classifier = _aux_head(num_classes, dropout_rate, aux_dropout_rate, layers) if aux else None
    return SegmentationModel(backbone, classifier, ("layer4",), aux_classifier, "layer3")


def deeplabv3plus_resnet(depth: int, num_classes: int = 21, aux: bool = False, output_stride: int = 16,
                         dropout_rate: float = 0.1, aux_dropout_rate: float | None = None, decoder_convs: int = 2,
                         low_level_first: bool = False, multi_grid: Sequence[int] | None = None,
                         align_corners: bool = False, dtype=None, param_dtype=jnp.float32,
                         axis_name=None, conv_lowering: str = "auto") -> SegmentationModel:
    """decoder_convs / low_level_first: the decoder variant (see DeepLabV3PlusHead); multi_grid: layer4's
    dilation factors (e.g. (1, 2, 4)); align_corners: of the decoder's and the final resize."""
    _check_output_stride(output_stride)
    layers = dtype_partials(dtype, param_dtype, axis_name, conv_lowering=conv_lowering)
    multi_grid = None if multi_grid is None else tuple(int(g) for g in multi_grid)  # a list after JSON
    backbone = resnet_backbone(depth, RESNET_DILATION[output_stride], layers, multi_grid=multi_grid)
    classifier = DeepLabV3PlusHead(num_classes, ASPP_RATES[output_stride], 48, dropout_rate, int(decoder_convs),
                                   bool(low_level_first), bool(align_corners), layers.conv,
                                   layers.norm, layers.conv_bn)
    aux_classifier = _aux_head(num_classes, dropout_rate, aux_dropout_rate, layers) if aux else None
    return SegmentationModel(backbone, classifier, ("layer4", "layer1"), aux_classifier, "layer3",
                             align_corners=bool(align_corners))


for _depth in (50, 101):
    register(f"deeplabv3_resnet{_depth}")(functools.partial(deeplabv3_resnet, _depth))
    register(f"deeplabv3plus_resnet{_depth}")(functools.partial(deeplabv3plus_resnet, _depth))


@register("deeplabv2_resnet101")
def deeplabv2_resnet101(num_classes: int = 21, resnet_style: str = "torchvision", dtype=None, param_dtype=jnp.float32,
                        axis_name=None, conv_lowering: str = "auto") -> SegmentationModel:
    """resnet_style="caffe": the MSRA ResNet of the caffe-trained weights (see segjax.models.resnet)."""
    layers = dtype_partials(dtype, param_dtype, axis_name, conv_lowering=conv_lowering)
    backbone = resnet_backbone(101, RESNET_DILATION[8], layers, style=resnet_style)
    return SegmentationModel(backbone, ASPPLargeFOV(num_classes, (6, 12, 18, 24), layers.conv), ("layer4",))


@register("deeplabv3_mobilenet_v3_large")
def deeplabv3_mobilenet_v3_large(num_classes: int = 21, aux: bool = False, dropout_rate: float = 0.5,
                                 aux_dropout_rate: float | None = None, dtype=None, param_dtype=jnp.float32,
                                 axis_name=None, conv_lowering: str = "auto") -> SegmentationModel:
    """torchvision's: dilated MobileNetV3-Large (output stride 16), DeepLabHead on the 960-ch "high"
    features (rates 12/24/36, torchvision's default), aux FCNHead on the 40-ch "low" features."""
    backbone_layers = mobilenetv3.backbone_layers(dtype, param_dtype, axis_name, conv_lowering)
    backbone = mobilenetv3.MobileNetV3Features("large", True, backbone_layers.conv, backbone_layers.conv_bn)
    layers = dtype_partials(dtype, param_dtype, axis_name, conv_lowering=conv_lowering)  # the heads' BatchNorm: PyTorch's defaults
    classifier = DeepLabHead(num_classes, (12, 24, 36), dropout_rate, layers.conv, layers.norm, layers.conv_bn)
    aux_classifier = _aux_head(num_classes, dropout_rate, aux_dropout_rate, layers) if aux else None
    return SegmentationModel(backbone, classifier, ("high",), aux_classifier, "low")
