"""FCN with a ResNet backbone (torchvision's `fcn_resnet50/101`), and the pieces every torchvision-style
segmentation model shares: `FCNHead` and `SegmentationModel` (backbone -> head -> bilinear resize).

The backbone is dilated in layer3 and layer4 (output stride 8). The head is torchvision's FCNHead:
3x3 conv to in/4 channels, BN, ReLU, Dropout(0.1), 1x1 conv with bias. With `aux=True` a second
FCNHead on layer3 gives the auxiliary logits ("aux"), as torchvision's `aux_loss=True`.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax.numpy as jnp
from flax import linen as nn

from segjax.models.registry import register
from segjax.models.resnet import resnet_backbone
from segjax.nn import dtype_partials, resize

Dtype = Any


class FCNHead(nn.Module):
    """torchvision's FCNHead; children named like its Sequential ("0" conv, "1" BN, "4" classifier)."""
    channels: int
    dropout_rate: float = 0.1
    axis_name: str | None = None
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv, norm, _ = dtype_partials(self.dtype, self.param_dtype, self.axis_name)
        x = nn.relu(norm(name="1")(conv(x.shape[-1] // 4, 3, name="0")(x), train))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return conv(self.channels, 1, use_bias=True, name="4")(x)


class SegmentationModel(nn.Module):
    """backbone(x) -> classifier(features[in_keys]...) -> logits resized (bilinear) to the input size.

    `backbone` returns a dict of named features; `in_keys` names those the classifier takes (in
    order), `aux_key` the one the optional `aux_classifier` takes. Submodules are dataclass fields,
    so they are named "backbone", "classifier", "aux_classifier" like torchvision's.
    """
    backbone: nn.Module
    classifier: nn.Module
    in_keys: Sequence[str] = ("layer4",)
    aux_classifier: nn.Module | None = None
    aux_key: str = "layer3"
    align_corners: bool = False  # of the final resize (torchvision: False)

    @nn.compact
    def __call__(self, x, train: bool = False, upsample: bool = True):
        """upsample=False returns the logits at the head's output stride (DeepLab v2's multi-scale rule)."""
        size = x.shape[1:3]
        features = self.backbone(x, train)
        up = lambda y: resize(y, size, "bilinear", align_corners=self.align_corners) if upsample else y  # noqa: E731
        outputs = {"out": up(self.classifier(*(features[k] for k in self.in_keys), train=train))}
        if self.aux_classifier is not None:
            outputs["aux"] = up(self.aux_classifier(features[self.aux_key], train=train))
        return outputs


def _fcn_resnet(depth: int, num_classes: int, aux: bool, dropout_rate: float, axis_name, dtype, param_dtype):
    common = dict(axis_name=axis_name, dtype=dtype, param_dtype=param_dtype)
    backbone = resnet_backbone(depth, (False, True, True), **common)
    classifier = FCNHead(num_classes, dropout_rate, **common)
    aux_classifier = FCNHead(num_classes, dropout_rate, **common) if aux else None
    return SegmentationModel(backbone, classifier, ("layer4",), aux_classifier, "layer3")


@register("fcn_resnet50")
def fcn_resnet50(num_classes: int = 21, aux: bool = False, dropout_rate: float = 0.1, axis_name=None,
                 dtype=None, param_dtype=jnp.float32) -> SegmentationModel:
    return _fcn_resnet(50, num_classes, aux, dropout_rate, axis_name, dtype, param_dtype)


@register("fcn_resnet101")
def fcn_resnet101(num_classes: int = 21, aux: bool = False, dropout_rate: float = 0.1, axis_name=None,
                  dtype=None, param_dtype=jnp.float32) -> SegmentationModel:
    return _fcn_resnet(101, num_classes, aux, dropout_rate, axis_name, dtype, param_dtype)
