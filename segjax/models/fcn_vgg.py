"""FCN-32s, FCN-16s and FCN-8s on VGG16 (Long, Shelhamer & Darrell, CVPR 2015), as the caffe
"voc-fcn*s" nets build them.

    conv1_1 (pad 100) ... pool5           VGG16 body, caffe max-pools (ceil mode)
    fc6  7x7 conv 4096 (no pad), ReLU, dropout      VGG16's classifier, "convolutionalised"
    fc7  1x1 conv 4096, ReLU, dropout
    score_fr 1x1 -> C
    FCN-32s: upscore 64/32                                                  crop 19
    FCN-16s: upscore2 4/2 + crop(score_pool4, 5); upscore16 32/16           crop 27
    FCN-8s:  upscore2 4/2 + crop(score_pool4, 5); upscore_pool4 4/2
             + crop(score_pool3, 9); upscore8 16/8                           crop 31

The 100-pixel padding makes the coarse output at least as large as the input for any size, so the
final crop returns exactly the input's H, W. Upsamplers are transposed convs without bias,
initialised to bilinear interpolation and learnable; the scoring layers start at zero (paper, 4.1).
The body and fc6/fc7 live under "backbone" (caffe names) so `segjax.convert.load_backbone` can
fill them from a torchvision vgg16 state_dict.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import linen as nn

from segjax.models.registry import register
from segjax.models.vgg import STAGES, Pool, vgg_conv_body
from segjax.nn import ConvTranspose, ModuleDef, bilinear_kernel_init, conv2d, dtype_partials, is_symbolic

CAFFE_POOLS = (Pool(2, 2, 0, ceil_mode=True),) * 5
FIRST_CONV_PADDING = 100
# Crop offsets of the caffe nets (what caffe's coord-map computes for this geometry).
SCORE_POOL4_OFFSET, SCORE_POOL3_OFFSET = 5, 9
FINAL_OFFSET = {32: 19, 16: 27, 8: 31}


def crop(x: jax.Array, offset: int, size: tuple[int, int]) -> jax.Array:
    """caffe's Crop layer on NHWC: x[:, offset:offset + h, offset:offset + w]."""
    h, w = size
    if not is_symbolic(h, w) and (x.shape[1] < offset + h or x.shape[2] < offset + w):
        raise ValueError(f"crop: {x.shape} is too small for offset {offset} and size {size}")
    # lax.slice, not x[...]: with symbolic sizes indexing becomes a gather, which jax2onnx lowers
    # only where the sizes are constants.
    return jax.lax.slice(x, (0, offset, offset, 0), (x.shape[0], offset + h, offset + w, x.shape[3]))


class FCNBackbone(nn.Module):
    """VGG16 with caffe pools and padding 100, plus fc6/fc7 as convolutions: returns pool3, pool4, fc7."""
    dropout_rate: float = 0.5
    conv: ModuleDef = conv2d

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        feats = vgg_conv_body(x, train, stages=STAGES["vgg16"], caffe_names=True, first_padding=FIRST_CONV_PADDING,
                              pools=CAFFE_POOLS, conv=self.conv)
        y = feats["pool5"]
        for name, kernel in (("fc6", 7), ("fc7", 1)):
            y = nn.relu(self.conv(4096, kernel, padding=0, use_bias=True, name=name)(y))
            y = nn.Dropout(self.dropout_rate)(y, deterministic=not train)
        return {"pool3": feats["pool3"], "pool4": feats["pool4"], "fc7": y}


class FCNVGG16(nn.Module):
    """FCN-`stride`s (32, 16 or 8): {"out": (N, H, W, num_classes)} logits."""
    num_classes: int
    stride: int = 8
    dropout_rate: float = 0.5
    conv: ModuleDef = conv2d
    conv_transpose: ModuleDef = ConvTranspose

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        if self.stride not in FINAL_OFFSET:
            raise ValueError(f"FCNVGG16: stride must be 32, 16 or 8, got {self.stride}")
        size = x.shape[1:3]
        feats = FCNBackbone(self.dropout_rate, self.conv, name="backbone")(x, train)
        c = self.num_classes
        score = functools.partial(self.conv, c, 1, padding=0, use_bias=True, kernel_init=nn.initializers.zeros)
        upscore = functools.partial(self.conv_transpose, c, use_bias=False, kernel_init=bilinear_kernel_init)

        y = score(name="score_fr")(feats["fc7"])
        if self.stride == 32:
            y = upscore(64, 32, name="upscore")(y)
        else:
            y = upscore(4, 2, name="upscore2")(y)
            y = y + crop(score(name="score_pool4")(feats["pool4"]), SCORE_POOL4_OFFSET, y.shape[1:3])
            if self.stride == 16:
                y = upscore(32, 16, name="upscore16")(y)
            else:
                y = upscore(4, 2, name="upscore_pool4")(y)
                y = y + crop(score(name="score_pool3")(feats["pool3"]), SCORE_POOL3_OFFSET, y.shape[1:3])
                y = upscore(16, 8, name="upscore8")(y)
        return {"out": crop(y, FINAL_OFFSET[self.stride], size)}


def fcn_vgg16(stride: int, num_classes: int = 21, dropout_rate: float = 0.5, dtype=None, param_dtype=jnp.float32,
              axis_name=None, conv_lowering: str = "auto") -> FCNVGG16:
    """FCN-`stride`s; no BatchNorm, so axis_name changes nothing (every model takes it)."""
    layers = dtype_partials(dtype, param_dtype, axis_name, conv_lowering=conv_lowering)
    return FCNVGG16(num_classes, stride, dropout_rate, conv=layers.conv,
                    conv_transpose=layers.conv_transpose)


for _stride in (32, 16, 8):
    register(f"fcn{_stride}s_vgg16")(functools.partial(fcn_vgg16, _stride))
