"""Lite R-ASPP (LR-ASPP) on a dilated MobileNetV3-Large, as torchvision's `lraspp_mobilenet_v3_large`.

    high (960 ch, stride 16) -> cbr: 1x1 conv + BN + ReLU ----------- x  * --> bilinear to low's size
                             -> scale: global pool + 1x1 conv + sigmoid /          -> high_classifier --+
    low (40 ch, stride 8) -------------------------------------------------------> low_classifier ---+-> logits

The head is handed the features of the backbone it is given (torchvision's LRASPP takes a backbone
module too) by `SegmentationModel`, which resizes the logits bilinearly (align_corners=False) to the
input's size. Names mirror torchvision
("backbone", "classifier" with "cbr", "scale", "low_classifier", "high_classifier"), so its state_dict
converts with no renaming.
"""
from __future__ import annotations

import functools

import jax.numpy as jnp
from flax import linen as nn

from segjax.models import mobilenetv3
from segjax.models._utils import SegmentationModel
from segjax.models.registry import register
from segjax.nn import ConvBN, ModuleDef, conv2d, dtype_partials, resize


class GlobalGate(nn.Module):
    """torchvision's `scale` Sequential: AdaptiveAvgPool2d(1), "1" 1x1 conv (no bias), Sigmoid."""
    features: int
    conv: ModuleDef = conv2d

    @nn.compact
    def __call__(self, x):
        x = x.mean(axis=(1, 2), keepdims=True)
        return nn.sigmoid(self.conv(self.features, 1, name="1")(x))


class LRASPPHead(nn.Module):
    num_classes: int
    inter_channels: int = 128
    conv: ModuleDef = conv2d
    conv_bn: ModuleDef = ConvBN

    @nn.compact
    def __call__(self, low, high, train: bool = False):
        x = self.conv_bn(self.inter_channels, 1, name="cbr")(high, train)
        x = x * GlobalGate(self.inter_channels, self.conv, name="scale")(high)
        x = resize(x, low.shape[1:3], "bilinear", align_corners=False)
        classifier = functools.partial(self.conv, self.num_classes, 1, use_bias=True)
        return classifier(name="low_classifier")(low) + classifier(name="high_classifier")(x)


@register("lraspp_mobilenet_v3_large")
def lraspp_mobilenet_v3_large(num_classes: int = 21, inter_channels: int = 128, dtype=None, param_dtype=jnp.float32,
                              axis_name=None, conv_lowering: str = "auto") -> SegmentationModel:
    backbone_layers = mobilenetv3.backbone_layers(dtype, param_dtype, axis_name, conv_lowering)
    backbone = mobilenetv3.MobileNetV3Features("large", True, backbone_layers.conv, backbone_layers.conv_bn)
    layers = dtype_partials(dtype, param_dtype, axis_name, conv_lowering=conv_lowering)  # the head's BN is a plain nn.BatchNorm2d
    classifier = LRASPPHead(num_classes, inter_channels, layers.conv, layers.conv_bn)
    return SegmentationModel(backbone, classifier, ("low", "high"))
