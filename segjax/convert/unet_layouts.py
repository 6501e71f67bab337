"""Checkpoint layouts of milesial's Pytorch-UNet and xuebinqin's U-2-Net.

UNet keys (`inc.double_conv.0.weight`, `down1.maxpool_conv.1.double_conv.3.weight`,
`up1.up.weight`, `up1.conv.double_conv.4.running_var`, `outc.conv.bias`) lose their
`maxpool_conv.1.`, `double_conv.` and `outc.conv.` levels: our DoubleConv holds its convs and norms
directly (0, 1, 3, 4) and `outc` is the 1x1 conv itself. U-2-Net keys
(`stage1.rebnconvin.conv_s1.weight`, `stage5d.rebnconv3d.bn_s1.running_mean`, `side1.weight`,
`outconv.bias`) are our paths as they stand.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from segjax.convert import Layout, register_layout
from segjax.errors import SegjaxError


def _unet_rename(key: str) -> str:
    return key.replace("maxpool_conv.1.", "").replace("double_conv.", "").replace("outc.conv.", "outc.")


def _require(state_dict: Mapping[str, np.ndarray], key: str, model: str) -> np.ndarray:
    if key not in state_dict:
        raise SegjaxError(f"state_dict has no {key!r}: not a {model} checkpoint; pass the right model name")
    return np.asarray(state_dict[key])


def _unet_kwargs(state_dict: Mapping[str, np.ndarray]) -> dict:
    """num_classes from the 1x1 head, base_channels from the first conv, bilinear from `up1.up.weight`."""
    head = _require(state_dict, "outc.conv.weight", "milesial UNet")
    first = _require(state_dict, "inc.double_conv.0.weight", "milesial UNet")
    return {"num_classes": int(head.shape[0]), "base_channels": int(first.shape[0]),
            "bilinear": "up1.up.weight" not in state_dict}


def _u2net_kwargs(state_dict: Mapping[str, np.ndarray]) -> dict:
    """num_classes from the fusing 1x1 conv; conv_bias from the first block's conv."""
    fuse = _require(state_dict, "outconv.weight", "U-2-Net")
    return {"num_classes": int(fuse.shape[0]),
            "conv_bias": "stage1.rebnconvin.conv_s1.bias" in state_dict}


register_layout("unet", Layout(rename=_unet_rename, infer_kwargs=_unet_kwargs, input_conv="inc.double_conv.0.weight"))
register_layout(["u2net", "u2netp"], Layout(infer_kwargs=_u2net_kwargs))
