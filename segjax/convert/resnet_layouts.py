"""torchvision ResNet layouts: classifiers, FCN, DeepLab v3 (and our v2/v3+ on the same backbone).

Our modules mirror torchvision's names, so full checkpoints need no renaming. A segmentation
model's "backbone" is torchvision's ResNet minus avgpool/fc (IntermediateLayerGetter keeps the
names), so an ImageNet `resnet50`/`resnet101` state_dict initialises it after dropping "fc.*".
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from segjax.convert import Layout, register_layout
from segjax.errors import SegjaxError


def _classes_from(key: str, has_aux: bool):
    """infer_kwargs: num_classes from the classifier's last weight; aux from any aux_classifier key."""
    def infer(state_dict: Mapping[str, np.ndarray]) -> dict:
        if key not in state_dict:
            raise SegjaxError(f"state_dict has no {key!r}: not a checkpoint of this model "
                              f"(first keys: {', '.join(list(state_dict)[:3])})")
        kw = {"num_classes": int(np.shape(state_dict[key])[0])}
        if has_aux:
            kw["aux"] = any(k.startswith("aux_classifier.") for k in state_dict)
        return kw
    return infer


def drop_fc(key: str) -> str | None:
    """ImageNet ResNet key -> backbone key: identical, except the classifier (fc.*) is dropped."""
    return None if key.startswith("fc.") else key


_BACKBONE = ("backbone", drop_fc)

register_layout([f"resnet{d}" for d in (18, 34, 50, 101, 152)],
                Layout(infer_kwargs=_classes_from("fc.weight", has_aux=False)))
# FCNHead and DeepLabHead both end in the 1x1 classifier "4".
register_layout(["fcn_resnet50", "fcn_resnet101", "deeplabv3_resnet50", "deeplabv3_resnet101"],
                Layout(infer_kwargs=_classes_from("classifier.4.weight", has_aux=True), backbone=_BACKBONE))
register_layout(["deeplabv3plus_resnet50", "deeplabv3plus_resnet101"],
                Layout(infer_kwargs=_classes_from("classifier.logits.weight", has_aux=True), backbone=_BACKBONE))
register_layout("deeplabv2_resnet101", Layout(infer_kwargs=_classes_from("classifier.0.weight", has_aux=False),
                                              backbone=_BACKBONE))
