"""FCN with a ResNet backbone (torchvision's `fcn_resnet50/101`).

The backbone is dilated in layer3 and layer4 (output stride 8). The head is torchvision's FCNHead:
3x3 conv to in/4 channels, BN, ReLU, Dropout(0.1), 1x1 conv with bias. With `aux=True` a second
FCNHead on layer3 gives the auxiliary logits ("aux"), as torchvision's `aux_loss=True`.
"""
from __future__ import annotations

import functools

import jax.numpy as jnp

from segjax.models._utils import FCNHead, SegmentationModel
from segjax.models.registry import register
from segjax.models.resnet import resnet_backbone
from segjax.nn import dtype_partials


def fcn_resnet(depth: int, num_classes: int = 21, aux: bool = False, dropout_rate: float = 0.1, dtype=None,
               param_dtype=jnp.float32, axis_name=None, conv_lowering: str = "auto") -> SegmentationModel:
    layers = dtype_partials(dtype, param_dtype, axis_name, conv_lowering=conv_lowering)
    backbone = resnet_backbone(depth, (False, True, True), layers)
    classifier = FCNHead(num_classes, dropout_rate, layers.conv, layers.norm)
    aux_classifier = FCNHead(num_classes, dropout_rate, layers.conv, layers.norm) if aux else None
    return SegmentationModel(backbone, classifier, ("layer4",), aux_classifier, "layer3")


for _depth in (50, 101):
    register(f"fcn_resnet{_depth}")(functools.partial(fcn_resnet, _depth))
