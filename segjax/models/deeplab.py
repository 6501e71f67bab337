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

from typing import Any, Sequence

import jax.numpy as jnp
from flax import linen as nn

from segjax.models.fcn import FCNHead, SegmentationModel
from segjax.models.registry import register
from segjax.models.resnet import resnet_backbone
from segjax.nn import ConvBN, conv2d, dtype_partials, resize

Dtype = Any
ASPP_RATES = {8: (12, 24, 36), 16: (6, 12, 18)}
# Which ResNet stages trade their stride for dilation at a given output stride.
RESNET_DILATION = {8: (False, True, True), 16: (False, False, True)}


class ASPPPooling(nn.Module):
    """Image-level branch: global average pool, 1x1 conv, BN, ReLU, broadcast back (torchvision's
    bilinear resize of a 1x1 map is a broadcast). Children "1"/"2": torchvision's "0" is the pool."""
    features: int = 256
    axis_name: str | None = None
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv, norm, _ = dtype_partials(self.dtype, self.param_dtype, self.axis_name)
        y = x.astype(jnp.float32).mean(axis=(1, 2), keepdims=True).astype(x.dtype)
        y = nn.relu(norm(name="2")(conv(self.features, 1, name="1")(y), train))
        return jnp.broadcast_to(y, x.shape[:3] + (self.features,))


class ASPPBranches(nn.Module):
    """The parallel branches ("convs" in torchvision): "0" 1x1, "1".."n" 3x3 atrous, last the pooling."""
    rates: Sequence[int]
    features: int = 256
    axis_name: str | None = None
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        _, _, conv_bn = dtype_partials(self.dtype, self.param_dtype, self.axis_name)
        branches = [conv_bn(self.features, 1, name="0")(x, train)]
        for i, rate in enumerate(self.rates):
            branches.append(conv_bn(self.features, 3, dilation=rate, name=str(i + 1))(x, train))
        pooling = ASPPPooling(self.features, self.axis_name, self.dtype, self.param_dtype, name=str(len(self.rates) + 1))
        branches.append(pooling(x, train))
        return jnp.concatenate(branches, axis=-1)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: branches, concat, 1x1 projection + BN + ReLU + dropout."""
    rates: Sequence[int]
    features: int = 256
    dropout_rate: float = 0.5
    axis_name: str | None = None
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        common = dict(axis_name=self.axis_name, dtype=self.dtype, param_dtype=self.param_dtype)
        x = ASPPBranches(tuple(self.rates), self.features, **common, name="convs")(x, train)
        x = ConvBN(self.features, 1, **common, name="project")(x, train)
        return nn.Dropout(self.dropout_rate, deterministic=not train)(x)


class DeepLabHead(nn.Module):
    """torchvision's DeepLabHead: "0" ASPP, "1" 3x3 conv, "2" BN, (ReLU), "4" 1x1 classifier."""
    channels: int
    rates: Sequence[int] = (12, 24, 36)
    dropout_rate: float = 0.5
    axis_name: str | None = None
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv, norm, _ = dtype_partials(self.dtype, self.param_dtype, self.axis_name)
        x = ASPP(tuple(self.rates), 256, self.dropout_rate, self.axis_name, self.dtype, self.param_dtype, name="0")(x, train)
        x = nn.relu(norm(name="2")(conv(256, 3, name="1")(x), train))
        return conv(self.channels, 1, use_bias=True, name="4")(x)


class DeepLabV3PlusHead(nn.Module):
    """ASPP encoder output + 48-ch projection of the low-level features -> two 3x3 convs -> classes."""
    channels: int
    rates: Sequence[int] = (6, 12, 18)
    low_level_features: int = 48
    dropout_rate: float = 0.1
    axis_name: str | None = None
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32
    decoder_convs: int = 2  # 3x3 conv + BN + ReLU layers after the concat ("decoder_0", ...)
    low_level_first: bool = False  # concat order: [low-level, ASPP] instead of [ASPP, low-level]
    align_corners: bool = False  # of the ASPP output's resize to the low-level features

    @nn.compact
    def __call__(self, high, low, train: bool = False):
        common = dict(axis_name=self.axis_name, dtype=self.dtype, param_dtype=self.param_dtype)
        high = ASPP(tuple(self.rates), 256, self.dropout_rate, **common, name="aspp")(high, train)
        low = ConvBN(self.low_level_features, 1, **common, name="project")(low, train)
        parts = [resize(high, low.shape[1:3], "bilinear", align_corners=self.align_corners), low.astype(high.dtype)]
        x = jnp.concatenate(parts[::-1] if self.low_level_first else parts, axis=-1)
        for i in range(self.decoder_convs):
            x = ConvBN(256, 3, **common, name=f"decoder_{i}")(x, train)
        return conv2d(self.channels, 1, use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype, name="logits")(x)


class ASPPLargeFOV(nn.Module):
    """DeepLab v2's ASPP-L: parallel 3x3 convs (with bias) at each rate straight to classes, summed."""
    channels: int
    rates: Sequence[int] = (6, 12, 18, 24)
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        init = nn.initializers.normal(0.01)  # as the reference Caffe/PyTorch ports
        outs = [conv2d(self.channels, 3, dilation=r, use_bias=True, kernel_init=init, dtype=self.dtype,
                       param_dtype=self.param_dtype, name=str(i))(x) for i, r in enumerate(self.rates)]
        return sum(outs[1:], outs[0])


def _check_output_stride(output_stride: int) -> None:
    if output_stride not in ASPP_RATES:
        from segjax.errors import SegjaxError
        raise SegjaxError(f"output_stride={output_stride}: choose 8 or 16")


def _aux_rate(dropout_rate: float, aux_dropout_rate: float | None) -> float:
    # torchvision's aux FCNHead uses 0.1; dropout_rate=0 (dropout off) turns it off too unless given.
    if aux_dropout_rate is not None:
        return aux_dropout_rate
    return 0.1 if dropout_rate > 0 else 0.0


def _deeplabv3_resnet(depth, num_classes, aux, output_stride, dropout_rate, aux_dropout_rate, axis_name, dtype,
                      param_dtype):
    _check_output_stride(output_stride)
    common = dict(axis_name=axis_name, dtype=dtype, param_dtype=param_dtype)
    backbone = resnet_backbone(depth, RESNET_DILATION[output_stride], **common)
    classifier = DeepLabHead(num_classes, ASPP_RATES[output_stride], dropout_rate, **common)
    aux_classifier = FCNHead(num_classes, _aux_rate(dropout_rate, aux_dropout_rate), **common) if aux else None
    return SegmentationModel(backbone, classifier, ("layer4",), aux_classifier, "layer3")


@register("deeplabv3_resnet50")
def deeplabv3_resnet50(num_classes: int = 21, aux: bool = False, output_stride: int = 8, dropout_rate: float = 0.5,
                       aux_dropout_rate: float | None = None, axis_name=None, dtype=None, param_dtype=jnp.float32):
    return _deeplabv3_resnet(50, num_classes, aux, output_stride, dropout_rate, aux_dropout_rate, axis_name, dtype,
                             param_dtype)


@register("deeplabv3_resnet101")
def deeplabv3_resnet101(num_classes: int = 21, aux: bool = False, output_stride: int = 8, dropout_rate: float = 0.5,
                        aux_dropout_rate: float | None = None, axis_name=None, dtype=None, param_dtype=jnp.float32):
    return _deeplabv3_resnet(101, num_classes, aux, output_stride, dropout_rate, aux_dropout_rate, axis_name, dtype,
                             param_dtype)


def _deeplabv3plus_resnet(depth, num_classes, aux, output_stride, dropout_rate, aux_dropout_rate, axis_name, dtype,
                          param_dtype, decoder_convs=2, low_level_first=False, multi_grid=None, align_corners=False):
    _check_output_stride(output_stride)
    common = dict(axis_name=axis_name, dtype=dtype, param_dtype=param_dtype)
    multi_grid = None if multi_grid is None else tuple(int(g) for g in multi_grid)  # a list after JSON
    backbone = resnet_backbone(depth, RESNET_DILATION[output_stride], multi_grid=multi_grid, **common)
    classifier = DeepLabV3PlusHead(num_classes, ASPP_RATES[output_stride], 48, dropout_rate, **common,
                                   decoder_convs=int(decoder_convs), low_level_first=bool(low_level_first),
                                   align_corners=bool(align_corners))
    aux_classifier = FCNHead(num_classes, _aux_rate(dropout_rate, aux_dropout_rate), **common) if aux else None
    return SegmentationModel(backbone, classifier, ("layer4", "layer1"), aux_classifier, "layer3",
                             align_corners=bool(align_corners))


@register("deeplabv3plus_resnet50")
def deeplabv3plus_resnet50(num_classes: int = 21, aux: bool = False, output_stride: int = 16,
                           dropout_rate: float = 0.1, aux_dropout_rate: float | None = None, axis_name=None,
                           dtype=None, param_dtype=jnp.float32, decoder_convs: int = 2, low_level_first: bool = False,
                           multi_grid: Sequence[int] | None = None, align_corners: bool = False):
    """decoder_convs / low_level_first: the decoder variant (see DeepLabV3PlusHead); multi_grid: layer4's
    dilation factors (e.g. (1, 2, 4)); align_corners: of the decoder's and the final resize."""
    return _deeplabv3plus_resnet(50, num_classes, aux, output_stride, dropout_rate, aux_dropout_rate, axis_name,
                                 dtype, param_dtype, decoder_convs, low_level_first, multi_grid, align_corners)


@register("deeplabv3plus_resnet101")
def deeplabv3plus_resnet101(num_classes: int = 21, aux: bool = False, output_stride: int = 16,
                            dropout_rate: float = 0.1, aux_dropout_rate: float | None = None, axis_name=None,
                            dtype=None, param_dtype=jnp.float32, decoder_convs: int = 2, low_level_first: bool = False,
                            multi_grid: Sequence[int] | None = None, align_corners: bool = False):
    """decoder_convs / low_level_first: the decoder variant (see DeepLabV3PlusHead); multi_grid: layer4's
    dilation factors (e.g. (1, 2, 4)); align_corners: of the decoder's and the final resize."""
    return _deeplabv3plus_resnet(101, num_classes, aux, output_stride, dropout_rate, aux_dropout_rate, axis_name,
                                 dtype, param_dtype, decoder_convs, low_level_first, multi_grid, align_corners)


@register("deeplabv2_resnet101")
def deeplabv2_resnet101(num_classes: int = 21, axis_name=None, dtype=None, param_dtype=jnp.float32,
                        resnet_style: str = "torchvision"):
    """resnet_style="caffe": the MSRA ResNet of the caffe-trained weights (see segjax.models.resnet)."""
    backbone = resnet_backbone(101, RESNET_DILATION[8], axis_name=axis_name, dtype=dtype, param_dtype=param_dtype,
                               style=resnet_style)
    classifier = ASPPLargeFOV(num_classes, (6, 12, 18, 24), dtype, param_dtype)
    return SegmentationModel(backbone, classifier, ("layer4",))


@register("deeplabv3_mobilenet_v3_large")
def deeplabv3_mobilenet_v3_large(num_classes: int = 21, aux: bool = False, dropout_rate: float = 0.5,
                                 aux_dropout_rate: float | None = None, axis_name=None, dtype=None,
                                 param_dtype=jnp.float32):
    """torchvision's: dilated MobileNetV3-Large (output stride 16), DeepLabHead on the 960-ch "high"
    features (rates 12/24/36, torchvision's default), aux FCNHead on the 40-ch "low" features."""
    from segjax.models import mobilenetv3

    common = dict(axis_name=axis_name, dtype=dtype, param_dtype=param_dtype)
    backbone = mobilenetv3.MobileNetV3Features("large", dilated=True, **common)
    classifier = DeepLabHead(num_classes, (12, 24, 36), dropout_rate, **common)
    aux_classifier = FCNHead(num_classes, _aux_rate(dropout_rate, aux_dropout_rate), **common) if aux else None
    return SegmentationModel(backbone, classifier, ("high",), aux_classifier, "low")
