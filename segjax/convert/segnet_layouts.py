"""SegNet checkpoints -> `segnet_vgg16_bn`.

segjax's own names (the default layout, also tests/torch_reference.py's twin) are caffe's:
encoder.conv1_1, encoder.conv1_1_bn, ..., decoder.conv5_3_D, decoder.conv5_3_D_bn, ...,
decoder.conv1_1_D (the logits). The encoder's backbone import reads torchvision's vgg16_bn, whose
`features` Sequential numbers conv, BatchNorm, ReLU per layer and one index per pool.

delta-onera/segnet_pytorch's `SegNet` names every layer at the top level: conv11 / bn11 ... conv53 /
bn53 for the encoder, conv53d / bn53d ... conv12d / bn12d and conv11d (the logits) for the decoder.
It pools with floor (ceil_mode=False) and unpools to the default size, which equals segjax's where
the input's H and W are multiples of 32.
"""
from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from segjax.convert import Layout, register_layout
from segjax.errors import SegjaxError
from segjax.models.vgg import STAGES, layer_names

_DELTA_ONERA = re.compile(r"^(conv|bn)(\d)(\d)(d?)\.(.+)$")


# torchvision vgg16_bn `features` index -> caffe name, for every conv and BatchNorm
_VGG16_BN_NAMES = {tv: caffe for tv_pair, caffe_pair in zip(layer_names(STAGES["vgg16"], True, False),
                                                            layer_names(STAGES["vgg16"], True, True))
                   for tv, caffe in zip(tv_pair, caffe_pair)}


def _vgg16_bn_rename(key: str) -> str | None:
    """torchvision vgg16_bn `features.<index>` -> the encoder's caffe names; the classifier is dropped."""
    group, index, leaf = key.split(".", 2) if key.count(".") >= 2 else (key, "", "")
    if group == "features" and index in _VGG16_BN_NAMES:
        return f"{_VGG16_BN_NAMES[index]}.{leaf}"
    return None if group == "classifier" else key


def _segjax_kwargs(state_dict: Mapping[str, np.ndarray]) -> dict:
    if "decoder.conv1_1_D.weight" not in state_dict:
        raise SegjaxError("state_dict has no decoder.conv1_1_D.weight: not a segjax-named SegNet checkpoint "
                          "(delta-onera/segnet_pytorch checkpoints have conv11d.weight)")
    return {"num_classes": int(np.shape(state_dict["decoder.conv1_1_D.weight"])[0]),
            "base_width": int(np.shape(state_dict["encoder.conv1_1.weight"])[0])}


def _delta_onera_rename(key: str) -> str:
    m = _DELTA_ONERA.match(key)
    if m is None:
        return key  # reported as unexpected
    kind, stage, index, decoder, leaf = m.groups()
    name = f"conv{stage}_{index}" + ("_D" if decoder else "") + ("_bn" if kind == "bn" else "")
    return f"{'decoder' if decoder else 'encoder'}.{name}.{leaf}"


def _delta_onera_kwargs(state_dict: Mapping[str, np.ndarray]) -> dict:
    return {"num_classes": int(np.shape(state_dict["conv11d.weight"])[0]), "ceil_mode": False,
            "base_width": int(np.shape(state_dict["conv11.weight"])[0])}


register_layout("segnet_vgg16_bn", Layout(infer_kwargs=_segjax_kwargs, input_conv="encoder.conv1_1.weight",
                                          backbone=("encoder", _vgg16_bn_rename)))
register_layout("segnet_vgg16_bn", Layout(rename=_delta_onera_rename, infer_kwargs=_delta_onera_kwargs,
                                          matches=lambda sd: "conv11d.weight" in sd and "conv53d.weight" in sd,
                                          input_conv="conv11.weight", reference="delta-onera/segnet_pytorch"))
