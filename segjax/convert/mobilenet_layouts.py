"""torchvision MobileNetV3 layouts: classifiers, LR-ASPP and DeepLabV3 on MobileNetV3-Large.

Our modules carry torchvision's names, so full checkpoints convert with no renaming. A segmentation
model's "backbone" is torchvision's `features` (taken through IntermediateLayerGetter, which keeps
the child names "0".."16"), so an ImageNet `mobilenet_v3_large` state_dict initialises it by
dropping the "features." prefix and the classifier.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from segjax.convert import Layout, register_layout
from segjax.errors import SegjaxError


def _classes_from(key: str):
    def infer(state_dict: Mapping[str, np.ndarray]) -> dict:
        if key not in state_dict:
            raise SegjaxError(f"state_dict has no {key!r}: not a checkpoint of this model")
        return {"num_classes": int(np.shape(state_dict[key])[0])}
    return infer


def _deeplabv3_kwargs(state_dict: Mapping[str, np.ndarray]) -> dict:
    # DeepLabHead: "0" ASPP, "1" conv, "2" BN, "3" ReLU, "4" the 1x1 classifier.
    kw = _classes_from("classifier.4.weight")(state_dict)
    kw["aux"] = any(k.startswith("aux_classifier.") for k in state_dict)
    return kw


def features_to_backbone(key: str) -> str | None:
    """"features.3.block.0.0.weight" -> "3.block.0.0.weight"; the ImageNet classifier is dropped."""
    if key.startswith("features."):
        return key[len("features."):]
    return None


_BACKBONE = ("backbone", features_to_backbone)

register_layout(["mobilenet_v3_large", "mobilenet_v3_small"], Layout(infer_kwargs=_classes_from("classifier.3.weight")))
register_layout("lraspp_mobilenet_v3_large",
                Layout(infer_kwargs=_classes_from("classifier.low_classifier.weight"), backbone=_BACKBONE))
register_layout("deeplabv3_mobilenet_v3_large", Layout(infer_kwargs=_deeplabv3_kwargs, backbone=_BACKBONE))
