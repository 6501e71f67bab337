"""Lite R-ASPP (LR-ASPP) on a dilated MobileNetV3-Large, as torchvision's `lraspp_mobilenet_v3_large`.

    high (960 ch, stride 16) -> cbr: 1x1 conv + BN + ReLU ----------- x  * --> bilinear to low's size
                             -> scale: global pool + 1x1 conv + sigmoid /          -> high_classifier --+
    low (40 ch, stride 8) -------------------------------------------------------> low_classifier ---+-> logits

The logits are resized bilinearly (align_corners=False) to the input's size. Names mirror torchvision
("backbone", "classifier" with "cbr", "scale", "low_classifier", "high_classifier"), so its state_dict
converts with no renaming.
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from segjax.models.mobilenetv3 import MobileNetV3Features
from segjax.models.registry import register
from segjax.nn import ConvBN, conv2d, resize

Dtype = Any


class GlobalGate(nn.Module):
    """torchvision's `scale` Sequential: AdaptiveAvgPool2d(1), "1" 1x1 conv (no bias), Sigmoid."""
    features: int
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = x.mean(axis=(1, 2), keepdims=True)
        return nn.sigmoid(conv2d(self.features, 1, dtype=self.dtype, param_dtype=self.param_dtype, name="1")(x))


class LRASPPHead(nn.Module):
    num_classes: int
    inter_channels: int = 128
    axis_name: str | None = None
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, low, high, train: bool = False):
        # The head's BatchNorm is a plain nn.BatchNorm2d: eps 1e-5, PyTorch momentum 0.1.
        x = ConvBN(self.inter_channels, 1, axis_name=self.axis_name, dtype=self.dtype, param_dtype=self.param_dtype,
                   name="cbr")(high, train)
        x = x * GlobalGate(self.inter_channels, self.dtype, self.param_dtype, name="scale")(high)
        x = resize(x, low.shape[1:3], "bilinear", align_corners=False)
        classifier = lambda name: conv2d(self.num_classes, 1, use_bias=True, dtype=self.dtype,  # noqa: E731
                                         param_dtype=self.param_dtype, name=name)
        return classifier("low_classifier")(low) + classifier("high_classifier")(x)


class LRASPP(nn.Module):
    num_classes: int = 21
    inter_channels: int = 128
    axis_name: str | None = None
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False) -> dict:
        size = x.shape[1:3]
        features = MobileNetV3Features("large", dilated=True, axis_name=self.axis_name, dtype=self.dtype,
                                       param_dtype=self.param_dtype, name="backbone")(x, train)
        out = LRASPPHead(self.num_classes, self.inter_channels, self.axis_name, self.dtype, self.param_dtype,
                         name="classifier")(features["low"], features["high"], train)
        return {"out": resize(out, size, "bilinear", align_corners=False)}


@register("lraspp_mobilenet_v3_large")
def lraspp_mobilenet_v3_large(num_classes: int = 21, **kw) -> LRASPP:
    return LRASPP(num_classes=num_classes, **kw)
