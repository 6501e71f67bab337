"""What the torchvision-style segmentation models share: `SegmentationModel` (backbone -> head ->
bilinear resize to the input) and torchvision's `FCNHead` (the FCN classifier and every aux head)."""
from __future__ import annotations

from typing import Sequence

from flax import linen as nn

from segjax.nn import BatchNorm, ModuleDef, conv2d, resize


class FCNHead(nn.Module):
    """3x3 conv to in/4 channels, BN, ReLU, Dropout, 1x1 conv with bias; children named like
    torchvision's Sequential ("0" conv, "1" BN, "4" classifier)."""
    channels: int
    dropout_rate: float = 0.1
    conv: ModuleDef = conv2d
    norm: ModuleDef = BatchNorm

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(self.norm(name="1")(self.conv(x.shape[-1] // 4, 3, name="0")(x), train))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return self.conv(self.channels, 1, use_bias=True, name="4")(x)


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
