"""torchvision ResNet layouts: classifiers, FCN, DeepLab v3 (and our v2/v3+ on the same backbone).

Our modules mirror torchvision's names, so full checkpoints need no renaming. A segmentation
model's "backbone" is torchvision's ResNet minus avgpool/fc (IntermediateLayerGetter keeps the
names), so an ImageNet `resnet50`/`resnet101` state_dict initialises it after dropping "fc.*".

kazuto1011/deeplab-pytorch's DeepLab v2 (its `deeplabv2_resnet101_msc-*.pth` files are the caffe
models converted) is an MSRA ResNet under a multi-scale wrapper: `base.layer1.conv1.{conv,bn}` is the
stem, `base.layer{2..5}.block{j}.{reduce,conv3x3,increase,shortcut}.{conv,bn}` our layer1..4 blocks
j-1 (conv1/bn1, conv2/bn2, conv3/bn3, downsample.0/.1), `base.aspp.c{i}` our classifier.{i}. The
layout converts it to resnet_style="caffe" with conv1's input channels reversed and the caffe mean;
segjax.json gets its CRF values (configs/voc12.yaml, the same in its cocostuff configs: segjax.crf.KAZUTO_VOC).

VainF/DeepLabV3Plus-Pytorch's DeepLab v3+ keeps torchvision's backbone and ASPP names; its decoder is
one 3x3 conv on [low-level, ASPP] (`classifier.classifier.{0,1}` conv/BN, `.3` the classifier), so
the layout sets decoder_convs=1, low_level_first=True and output_stride=16, the stride of every
published `best_deeplabv3plus_*_os16.pth` (`--set output_stride=8` for an os8 file). ImageNet input.

jfzhang95/pytorch-deeplab-xception's ResNet DeepLab v3+ (`deeplab-resnet.pth.tar`, a {"epoch",
"state_dict", "optimizer", "best_pred"} dict, output stride 16) has torchvision's backbone names and
its own head names (aspp.aspp1..4, aspp.global_avg_pool, decoder.last_conv); the layout sets
multi_grid=(1, 2, 4) (layer4 at dilations 2/4/8) and align_corners=True. ImageNet input.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

import re

from segjax import crf
from segjax.convert import Layout, caffe_normalisation, register_layout
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


# --------------------------------------------------------------------------- kazuto1011/deeplab-pytorch

KAZUTO_MEAN_BGR = (104.008, 116.669, 122.675)  # its configs/voc12.yaml IMAGE.MEAN
_KAZUTO_PARTS = {"reduce.conv": "conv1", "reduce.bn": "bn1", "conv3x3.conv": "conv2", "conv3x3.bn": "bn2",
                 "increase.conv": "conv3", "increase.bn": "bn3", "shortcut.conv": "downsample.0",
                 "shortcut.bn": "downsample.1"}


def _strip_msc(state_dict: Mapping[str, np.ndarray]) -> dict:
    """The multi-scale wrapper (MSC) holds the net as `base`."""
    return {(k[len("base."):] if k.startswith("base.") else k): v for k, v in state_dict.items()}


def _kazuto_rename(key: str) -> str:
    if key.startswith("layer1.conv1."):
        part, leaf = key[len("layer1.conv1."):].split(".", 1)
        return f"backbone.{'conv1' if part == 'conv' else 'bn1'}.{leaf}"
    block = re.fullmatch(r"layer([2-5])\.block(\d+)\.(\w+\.\w+)\.(\w+)", key)
    if block and block[3] in _KAZUTO_PARTS:
        return f"backbone.layer{int(block[1]) - 1}.{int(block[2]) - 1}.{_KAZUTO_PARTS[block[3]]}.{block[4]}"
    aspp = re.fullmatch(r"aspp\.c(\d+)\.(\w+)", key)
    if aspp:
        return f"classifier.{aspp[1]}.{aspp[2]}"
    return key  # reported as unexpected


def _kazuto_kwargs(state_dict: Mapping[str, np.ndarray]) -> dict:
    sd = _strip_msc(state_dict)
    if "aspp.c0.weight" not in sd:
        raise SegjaxError("state_dict has no base.aspp.c0.weight: not a kazuto1011/deeplab-pytorch DeepLab v2")
    return {"num_classes": int(np.shape(sd["aspp.c0.weight"])[0]), "resnet_style": "caffe"}


register_layout("deeplabv2_resnet101",
                Layout(rename=_kazuto_rename, infer_kwargs=_kazuto_kwargs, prepare=_strip_msc,
                       matches=lambda sd: "base.layer1.conv1.conv.weight" in sd or "layer1.conv1.conv.weight" in sd,
                       input_conv="layer1.conv1.conv.weight", bgr=True, reference="kazuto1011/deeplab-pytorch",
                       crf=crf.KAZUTO_VOC, **caffe_normalisation(KAZUTO_MEAN_BGR)))


# --------------------------------------------------------------------------- VainF/DeepLabV3Plus-Pytorch

_VAINF_HEAD = {"classifier.classifier.0.": "classifier.decoder_0.0.", "classifier.classifier.1.": "classifier.decoder_0.1.",
               "classifier.classifier.3.": "classifier.logits."}


def _vainf_rename(key: str) -> str:
    for old, new in _VAINF_HEAD.items():
        if key.startswith(old):
            return new + key[len(old):]
    return key


def _vainf_kwargs(state_dict: Mapping[str, np.ndarray]) -> dict:
    return {"num_classes": int(np.shape(state_dict["classifier.classifier.3.weight"])[0]), "aux": False,
            "output_stride": 16, "decoder_convs": 1, "low_level_first": True}


register_layout(["deeplabv3plus_resnet50", "deeplabv3plus_resnet101"],
                Layout(rename=_vainf_rename, infer_kwargs=_vainf_kwargs, backbone=_BACKBONE,
                       matches=lambda sd: "classifier.classifier.3.weight" in sd and "classifier.aspp.project.0.weight" in sd,
                       reference="VainF/DeepLabV3Plus-Pytorch"))


# --------------------------------------------------------------------------- jfzhang95/pytorch-deeplab-xception

def _jfzhang95_rename(key: str) -> str:
    """aspp.aspp{k}.{atrous_conv,bn}, aspp.global_avg_pool.{1,2}, aspp.{conv1,bn1}, decoder.{conv1,bn1},
    decoder.last_conv.{0,1,4,5,8} -> our v3+ head (torchvision's ASPP names, decoder_0/1, logits)."""
    m = re.fullmatch(r"aspp\.aspp(\d)\.(atrous_conv|bn)\.(\w+)", key)
    if m:
        return f"classifier.aspp.convs.{int(m[1]) - 1}.{0 if m[2] == 'atrous_conv' else 1}.{m[3]}"
    table = {"aspp.global_avg_pool.1.": "classifier.aspp.convs.4.1.", "aspp.global_avg_pool.2.": "classifier.aspp.convs.4.2.",
             "aspp.conv1.": "classifier.aspp.project.0.", "aspp.bn1.": "classifier.aspp.project.1.",
             "decoder.conv1.": "classifier.project.0.", "decoder.bn1.": "classifier.project.1.",
             "decoder.last_conv.0.": "classifier.decoder_0.0.", "decoder.last_conv.1.": "classifier.decoder_0.1.",
             "decoder.last_conv.4.": "classifier.decoder_1.0.", "decoder.last_conv.5.": "classifier.decoder_1.1.",
             "decoder.last_conv.8.": "classifier.logits."}
    for old, new in table.items():
        if key.startswith(old):
            return new + key[len(old):]
    return key


def _jfzhang95_kwargs(state_dict: Mapping[str, np.ndarray]) -> dict:
    return {"num_classes": int(np.shape(state_dict["decoder.last_conv.8.weight"])[0]), "aux": False,
            "output_stride": 16, "multi_grid": [1, 2, 4], "align_corners": True}


register_layout(["deeplabv3plus_resnet50", "deeplabv3plus_resnet101"],
                Layout(rename=_jfzhang95_rename, infer_kwargs=_jfzhang95_kwargs, backbone=_BACKBONE,
                       matches=lambda sd: "decoder.last_conv.8.weight" in sd and "aspp.aspp1.atrous_conv.weight" in sd,
                       reference="jfzhang95/pytorch-deeplab-xception"))
