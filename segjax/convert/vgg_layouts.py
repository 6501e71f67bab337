"""torchvision VGG checkpoints -> our VGG classifiers, FCN-32s/16s/8s and DeepLab-LargeFOV.

The classifiers mirror torchvision's module paths, so their layout only reads num_classes. The
segmentation nets name their VGG16 body after caffe (conv1_1, ...) under "backbone"; their backbone
import renames torchvision's `features.<index>` to those names. FCN also takes fc6/fc7 from VGG's
classifier.0/.3, reshaped into 7x7 and 1x1 convolutions (torch flattens pool5 in (C, H, W) order,
so Linear(25088, 4096)'s weight is a (4096, 512, 7, 7) conv weight); DeepLab-LargeFOV's fc6/fc7
have other shapes and start from scratch.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from segjax.convert import Layout, register_layout
from segjax.errors import SegjaxError
from segjax.models.vgg import STAGES, torchvision_to_caffe


def _classifier_kwargs(state_dict: Mapping[str, np.ndarray]) -> dict:
    if "classifier.6.weight" not in state_dict:
        raise SegjaxError("state_dict has no classifier.6.weight: not a torchvision VGG classifier checkpoint")
    return {"num_classes": int(state_dict["classifier.6.weight"].shape[0])}


def _backbone_rename(with_fc: bool):
    conv_names = torchvision_to_caffe(STAGES["vgg16"])
    fc_names = {"0": "fc6", "3": "fc7"} if with_fc else {}

    def rename(key: str) -> str | None:
        group, index, leaf = key.split(".", 2) if key.count(".") >= 2 else (key, "", "")
        if group == "features" and index in conv_names:
            return f"{conv_names[index]}.{leaf}"
        if group == "classifier":
            return f"{fc_names[index]}.{leaf}" if index in fc_names else None
        return key  # anything else (e.g. BatchNorm of a vgg16_bn) is reported as unexpected
    return rename


def convolutionalise_classifier(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """VGG16's classifier.0/.3 Linear weights as the (out, in, kh, kw) weights of 7x7 and 1x1 convs."""
    out = dict(state_dict)
    for key, shape in (("classifier.0.weight", (4096, 512, 7, 7)), ("classifier.3.weight", (4096, 4096, 1, 1))):
        if key not in out:
            raise SegjaxError(f"state_dict has no {key}: FCN needs a full torchvision vgg16 checkpoint")
        w = np.asarray(out[key])
        if w.shape != (shape[0], int(np.prod(shape[1:]))):
            raise SegjaxError(f"{key} has shape {w.shape}, expected {(shape[0], int(np.prod(shape[1:])))}: "
                              "not a torchvision vgg16 checkpoint")
        out[key] = w.reshape(shape)
    return out


for _arch in STAGES:
    register_layout([_arch, _arch + "_bn"], Layout(infer_kwargs=_classifier_kwargs))

register_layout(["fcn32s_vgg16", "fcn16s_vgg16", "fcn8s_vgg16"],
                Layout(backbone=("backbone", _backbone_rename(with_fc=True)),
                       backbone_prepare=convolutionalise_classifier))
register_layout("deeplabv1_largefov_vgg16", Layout(backbone=("backbone", _backbone_rename(with_fc=False))))
