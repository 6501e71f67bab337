"""DeepLab v1 "LargeFOV" on VGG16 (Chen et al., ICLR 2015), as its caffe net builds it.

    conv1_1 ... conv4_3, pools 1-3: 3x3 stride 2 pad 1       output stride 8
    pool4: 3x3 stride 1 pad 1
    conv5_1 ... conv5_3 dilated by 2, pool5: 3x3 stride 1 pad 1
    fc6  3x3 conv, rate 12, 1024 channels, ReLU, dropout
    fc7  1x1 conv 1024, ReLU, dropout
    fc8  1x1 conv -> C, logits bilinearly resized to the input (align_corners=False)

Pools round up like caffe's (ceil mode), so an input of 8k + 1 pixels gives k + 1 feature rows.
The conv body lives under "backbone" with caffe names; `segjax.convert.load_backbone` fills it
from a torchvision vgg16 state_dict (fc6/fc7 differ in shape from VGG's and start from scratch).
No CRF: this is the network's unary term.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from segjax.models.registry import register
from segjax.models.vgg import STAGES, Pool, VGGFeatures
from segjax.nn import conv2d, resize

Dtype = Any

LARGEFOV_POOLS = (Pool(3, 2, 1, ceil_mode=True),) * 3 + (Pool(3, 1, 1, ceil_mode=True),) * 2
LARGEFOV_DILATIONS = (1, 1, 1, 1, 2)
FC6_RATE, FC_WIDTH = 12, 1024


class DeepLabLargeFOV(nn.Module):
    num_classes: int
    dropout_rate: float = 0.5
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        size = x.shape[1:3]
        feats = VGGFeatures(STAGES["vgg16"], caffe_names=True, pools=LARGEFOV_POOLS, dilations=LARGEFOV_DILATIONS,
                            dtype=self.dtype, param_dtype=self.param_dtype, name="backbone")(x, train)
        conv = functools.partial(conv2d, use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype)
        y = nn.relu(conv(FC_WIDTH, 3, dilation=FC6_RATE, name="fc6")(feats["pool5"]))
        y = nn.Dropout(self.dropout_rate)(y, deterministic=not train)
        y = nn.relu(conv(FC_WIDTH, 1, name="fc7")(y))
        y = nn.Dropout(self.dropout_rate)(y, deterministic=not train)
        # The caffe net initialises the classifier with N(0, 0.01).
        y = conv(self.num_classes, 1, kernel_init=nn.initializers.normal(0.01), name="fc8")(y)
        return {"out": resize(y, size, "bilinear", align_corners=False)}


@register("deeplabv1_largefov_vgg16")
def deeplabv1_largefov_vgg16(num_classes: int = 21, dropout_rate: float = 0.5, dtype: Dtype = None,
                             param_dtype: Dtype = jnp.float32, axis_name: str | None = None) -> DeepLabLargeFOV:
    del axis_name  # no BatchNorm in this net; accepted so every model takes the same kwargs
    return DeepLabLargeFOV(num_classes, dropout_rate, dtype, param_dtype)
