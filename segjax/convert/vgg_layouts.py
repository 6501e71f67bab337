"""torchvision VGG checkpoints -> our VGG classifiers, FCN-32s/16s/8s and DeepLab-LargeFOV.

The classifiers mirror torchvision's module paths, so their layout only reads num_classes. The
segmentation nets name their VGG16 body after caffe (conv1_1, ...) under "backbone"; their backbone
import renames torchvision's `features.<index>` to those names. FCN also takes fc6/fc7 from VGG's
classifier.0/.3, reshaped into 7x7 and 1x1 convolutions (torch flattens pool5 in (C, H, W) order,
so Linear(25088, 4096)'s weight is a (4096, 512, 7, 7) conv weight); DeepLab-LargeFOV's fc6/fc7
have other shapes and start from scratch.

wkentaro/pytorch-fcn's FCN32s/FCN16s/FCN8s/FCN8sAtOnce (its `*_from_caffe.pth` files are the caffe
voc-fcn*s weights) name every layer at the top level (conv1_1 ... conv5_3, fc6, fc7, score_fr,
score_pool4, score_pool3, upscore, upscore16, upscore2, upscore_pool4, upscore8), with our
geometry; the body and fc6/fc7 move under "backbone". The weights take caffe's input (BGR, 0-255,
minus the ILSVRC mean), so conv1_1's input channels are reversed and segjax.json gets that mean.
FCN8sAtOnce has FCN8s's keys but scores pool4 x 0.01 and pool3 x 1e-4: `atonce=True` folds those
factors into score_pool4/score_pool3's weights.

wangleihitcs/DeepLab-V1-PyTorch's VGG16_LargeFOV is one Sequential `features`: the conv body at
torchvision's indices (0 ... 28), fc6/fc7/fc8 at 32/35/38 (31 is pool5a). It pools with floor,
resizes with align_corners=True and takes caffe input with its own mean: the layout sets those, and
segjax.json gets the CRF values of its main.py (segjax.crf.LARGEFOV_PORT), those of its 69.60 row.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from segjax import crf
from segjax.convert import Layout, caffe_normalisation, register_layout
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


# --------------------------------------------------------------------------- wkentaro/pytorch-fcn

WKENTARO_MEAN_BGR = (104.00698793, 116.66876762, 122.67891434)  # torchfcn.datasets.VOC's mean_bgr
ATONCE_SCALES = {"score_pool4.weight": 0.01, "score_pool3.weight": 1e-4}


def _wkentaro_rename(key: str) -> str:
    return "backbone." + key if key.startswith(("conv", "fc6.", "fc7.")) else key


def _wkentaro_kwargs(state_dict: Mapping[str, np.ndarray]) -> dict:
    if "score_fr.weight" not in state_dict:
        raise SegjaxError("state_dict has no score_fr.weight: not a wkentaro/pytorch-fcn FCN checkpoint")
    return {"num_classes": int(np.shape(state_dict["score_fr.weight"])[0])}


def fold_atonce(state_dict: Mapping[str, np.ndarray], atonce: bool = False) -> dict[str, np.ndarray]:
    """FCN8sAtOnce's forward scales pool4 by 0.01 and pool3 by 1e-4 before their 1x1 scores: the same as
    scaling those scores' weights (biases unchanged)."""
    if not isinstance(atonce, bool):
        raise SegjaxError(f"--set atonce={atonce!r}: expected True or False")
    if not atonce:
        return dict(state_dict)
    out = dict(state_dict)
    for key, scale in ATONCE_SCALES.items():
        if key not in out:
            raise SegjaxError(f"atonce=True: state_dict has no {key}; FCN8sAtOnce checkpoints have FCN8s's keys")
        out[key] = np.asarray(out[key], np.float32) * np.float32(scale)
    return out


def _is_wkentaro(state_dict: Mapping[str, np.ndarray]) -> bool:
    return "conv1_1.weight" in state_dict and "score_fr.weight" in state_dict


_WKENTARO = dict(rename=_wkentaro_rename, infer_kwargs=_wkentaro_kwargs, matches=_is_wkentaro,
                 input_conv="conv1_1.weight", bgr=True, reference="wkentaro/pytorch-fcn",
                 **caffe_normalisation(WKENTARO_MEAN_BGR))
register_layout(["fcn32s_vgg16", "fcn16s_vgg16"], Layout(**_WKENTARO))
register_layout("fcn8s_vgg16", Layout(**_WKENTARO, options=("atonce",), prepare=fold_atonce))


# --------------------------------------------------------------------------- wangleihitcs/DeepLab-V1-PyTorch

LARGEFOV_PORT_MEAN_BGR = (104.008, 116.669, 122.675)  # its datasets.VOCDataset's mean_bgr
_LARGEFOV_PORT_HEAD = {"32": "fc6", "35": "fc7", "38": "fc8"}


def _largefov_port_rename(key: str) -> str:
    group, index, leaf = key.split(".", 2) if key.count(".") >= 2 else (key, "", "")
    conv_names = torchvision_to_caffe(STAGES["vgg16"])
    if group == "features" and index in conv_names:
        return f"backbone.{conv_names[index]}.{leaf}"
    if group == "features" and index in _LARGEFOV_PORT_HEAD:
        return f"{_LARGEFOV_PORT_HEAD[index]}.{leaf}"
    return key


def _largefov_port_kwargs(state_dict: Mapping[str, np.ndarray]) -> dict:
    return {"num_classes": int(np.shape(state_dict["features.38.weight"])[0]), "align_corners": True,
            "ceil_mode": False}


register_layout("deeplabv1_largefov_vgg16",
                Layout(rename=_largefov_port_rename, infer_kwargs=_largefov_port_kwargs,
                       matches=lambda sd: "features.38.weight" in sd and "features.32.weight" in sd,
                       input_conv="features.0.weight", bgr=True, reference="wangleihitcs/DeepLab-V1-PyTorch",
                       crf=crf.LARGEFOV_PORT, **caffe_normalisation(LARGEFOV_PORT_MEAN_BGR)))
