"""DeepLab v1 "LargeFOV" on VGG16 (Chen et al., ICLR 2015), as its caffe net builds it.

    conv1_1 ... conv4_3, pools 1-3: 3x3 stride 2 pad 1       output stride 8
    pool4: 3x3 stride 1 pad 1
    conv5_1 ... conv5_3 dilated by 2, pool5: 3x3 stride 1 pad 1
    pool5a  3x3 stride 1 pad 1 *average* pool (zero padding counted: caffe's AVE pool and
            PyTorch's count_include_pad=True agree, the window never passing pad + size)
    fc6  3x3 conv, rate 12, 1024 channels, ReLU, dropout
    fc7  1x1 conv 1024, ReLU, dropout
    fc8  1x1 conv -> C, logits bilinearly resized to the input

Pools round up like caffe's (ceil_mode=True), so an input of 8k + 1 pixels gives k + 1 feature
rows; PyTorch ports of the caffe model pool with floor (ceil_mode=False: the same at 8k + 1 sizes
such as 321 or 513, one row fewer at even sizes) and resize with align_corners=True (default False).
The conv body lives under "backbone" with caffe names; `segjax.convert.load_backbone` fills it
from a torchvision vgg16 state_dict (fc6/fc7 differ in shape from VGG's and start from scratch).
No CRF: this is the network's unary term.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import linen as nn

from segjax.models.registry import register
from segjax.models.vgg import STAGES, Pool, VGGFeatures
from segjax.nn import ModuleDef, conv2d, dtype_partials, resize


def largefov_pools(ceil_mode: bool = True) -> tuple[Pool, ...]:
    return (Pool(3, 2, 1, ceil_mode),) * 3 + (Pool(3, 1, 1, ceil_mode),) * 2


LARGEFOV_DILATIONS = (1, 1, 1, 1, 2)
FC6_RATE, FC_WIDTH = 12, 1024


class DeepLabLargeFOV(nn.Module):
    num_classes: int
    dropout_rate: float = 0.5
    align_corners: bool = False
    ceil_mode: bool = True
    conv: ModuleDef = conv2d

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, upsample: bool = True) -> dict[str, jax.Array]:
        """upsample=False returns the stride-8 logits (the multi-scale max-logits rule)."""
        size = x.shape[1:3]
        feats = VGGFeatures(STAGES["vgg16"], caffe_names=True, pools=largefov_pools(self.ceil_mode),
                            dilations=LARGEFOV_DILATIONS, conv=self.conv, name="backbone")(x, train)
        conv = functools.partial(self.conv, use_bias=True)
        y = nn.avg_pool(feats["pool5"], (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=True)
        y = nn.relu(conv(FC_WIDTH, 3, dilation=FC6_RATE, name="fc6")(y))
        y = nn.Dropout(self.dropout_rate)(y, deterministic=not train)
        y = nn.relu(conv(FC_WIDTH, 1, name="fc7")(y))
        y = nn.Dropout(self.dropout_rate)(y, deterministic=not train)
        # The caffe net initialises the classifier with N(0, 0.01).
        y = conv(self.num_classes, 1, kernel_init=nn.initializers.normal(0.01), name="fc8")(y)
        return {"out": resize(y, size, "bilinear", align_corners=self.align_corners) if upsample else y}


@register("deeplabv1_largefov_vgg16")
def deeplabv1_largefov_vgg16(num_classes: int = 21, dropout_rate: float = 0.5, align_corners: bool = False,
                             ceil_mode: bool = True, dtype=None, param_dtype=jnp.float32,
                             axis_name=None, conv_lowering: str = "auto") -> DeepLabLargeFOV:
    """align_corners: of the final resize; ceil_mode: of the five max-pools (see the module docstring).
    No BatchNorm, so axis_name changes nothing (every model takes it)."""
    layers = dtype_partials(dtype, param_dtype, axis_name, conv_lowering=conv_lowering)
    return DeepLabLargeFOV(num_classes, dropout_rate, bool(align_corners), bool(ceil_mode), conv=layers.conv)
