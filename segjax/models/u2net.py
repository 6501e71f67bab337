"""U^2-Net (Qin et al., 2020): a U-Net of U-Nets, in the layout of xuebinqin's U-2-Net.

Every stage is a Residual U-block, RSU-L: an input conv, then a small U-Net of height L whose
output is added back to the input conv's output.

    RSU-L (L = 7, 6, 5, 4)                       RSU-4F
    rebnconvin   in -> out                       rebnconvin  in -> out
    rebnconv1    out -> mid       pool /2        rebnconv1   d1      (no pooling: dilations
    rebnconv2..L-1 mid -> mid     pool /2 each   rebnconv2   d2       1, 2, 4, 8 keep the size)
    rebnconvL    mid -> mid, dilation 2          rebnconv3   d4
    rebnconv{L-1}d..2d  2mid -> mid, upsample    rebnconv4   d8
    rebnconv1d   2mid -> out                     rebnconv3d d4, 2d d2, 1d d1
    return rebnconv1d + rebnconvin

"rebnconv" = 3x3 conv (with bias, as in the original) -> BN -> ReLU. Pools are 2x2 stride 2 with
ceil_mode; decoder maps are bilinearly resized (align_corners=False, the original's
F.upsample default) to their skip's exact size, so any H, W works.

The network: six encoder stages (RSU7, 6, 5, 4, 4F, 4F) with ceil-mode pools between, five decoder
stages (RSU4F, 4, 5, 6, 7) fed [upsampled deeper, skip], a 3x3 side conv on each decoder stage and on
the deepest encoder stage, each side resized to the input, and a 1x1 `outconv` fusing all six.
Returns logits: {"out": fused, "sides": [side1 .. side6]} (the original applies sigmoid itself).
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from segjax import nn as snn
from segjax.models.registry import register
from segjax.nn import ModuleDef


def upsample_like(x: jax.Array, target: jax.Array) -> jax.Array:
    return snn.resize(x, target.shape[1:3], align_corners=False)


class REBNCONV(nn.Module):
    features: int
    dilation: int = 1
    conv: ModuleDef = snn.conv2d
    norm: ModuleDef = snn.BatchNorm

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = self.conv(self.features, 3, dilation=self.dilation, name="conv_s1")(x)
        return nn.relu(self.norm(name="bn_s1")(x, train))


class RSU(nn.Module):
    """RSU-`height`; with `dilated` it is RSU-4F (no pooling, dilations 1, 2, 4, 8)."""
    height: int
    mid_features: int
    out_features: int
    dilated: bool = False
    conv: ModuleDef = snn.conv2d
    norm: ModuleDef = snn.BatchNorm

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        rebnconv = functools.partial(REBNCONV, conv=self.conv, norm=self.norm)
        depth = self.height
        # Encoder dilation of rebnconv{i}: RSU-L uses 1 then 2 at the bottom; RSU-4F doubles each level.
        dilation = (lambda i: 2 ** (i - 1)) if self.dilated else (lambda i: 2 if i == depth else 1)

        x_in = rebnconv(self.out_features, 1, name="rebnconvin")(x, train)
        encoded = [rebnconv(self.mid_features, dilation(1), name="rebnconv1")(x_in, train)]
        for i in range(2, depth + 1):
            h = encoded[-1]
            if not self.dilated and i < depth:
                h = snn.max_pool2d(h, 2, 2, ceil_mode=True)
            encoded.append(rebnconv(self.mid_features, dilation(i), name=f"rebnconv{i}")(h, train))

        y = encoded.pop()
        for i in range(depth - 1, 0, -1):
            skip = encoded.pop()
            features = self.out_features if i == 1 else self.mid_features
            y = rebnconv(features, dilation(i), name=f"rebnconv{i}d")(
                jnp.concatenate([upsample_like(y, skip), skip], -1), train)
        return y + x_in


# (height, mid, out) per stage: encoder stage1..6, then decoder stage5d..1d. Stages 5, 6 and 5d are
# RSU-4F (height 4, dilated).
U2NET_ENCODER = ((7, 32, 64), (6, 32, 128), (5, 64, 256), (4, 128, 512), (4, 256, 512), (4, 256, 512))
U2NET_DECODER = ((4, 256, 512), (4, 128, 256), (5, 64, 128), (6, 32, 64), (7, 16, 64))
U2NETP_ENCODER = ((7, 16, 64), (6, 16, 64), (5, 16, 64), (4, 16, 64), (4, 16, 64), (4, 16, 64))
U2NETP_DECODER = ((4, 16, 64), (4, 16, 64), (5, 16, 64), (6, 16, 64), (7, 16, 64))
# Full U^2-Net: 44.0M parameters with the original's conv biases; U^2-Net lite ("u2netp"): 1.13M.
VARIANTS = {"u2net": (U2NET_ENCODER, U2NET_DECODER), "u2netp": (U2NETP_ENCODER, U2NETP_DECODER)}


class U2Net(nn.Module):
    num_classes: int = 1
    encoder: Sequence[tuple[int, int, int]] = U2NET_ENCODER
    decoder: Sequence[tuple[int, int, int]] = U2NET_DECODER
    conv_bias: bool = True  # of the RSU convs (the side convs and outconv always have one)
    conv: ModuleDef = snn.conv2d
    norm: ModuleDef = snn.BatchNorm

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> dict[str, Any]:
        rsu = functools.partial(RSU, conv=functools.partial(self.conv, use_bias=self.conv_bias), norm=self.norm)

        encoded, h = [], x
        for i, (height, mid, out) in enumerate(self.encoder, start=1):
            if i > 1:
                h = snn.max_pool2d(h, 2, 2, ceil_mode=True)
            h = rsu(height, mid, out, dilated=i >= 5, name=f"stage{i}")(h, train)
            encoded.append(h)

        decoded = [encoded.pop()]  # stage6's output feeds side6 and the decoder
        for i, (height, mid, out) in zip(range(5, 0, -1), self.decoder):
            skip = encoded.pop()
            h = jnp.concatenate([upsample_like(decoded[-1], skip), skip], -1)
            decoded.append(rsu(height, mid, out, dilated=i == 5, name=f"stage{i}d")(h, train))

        conv = functools.partial(self.conv, self.num_classes, use_bias=True)
        # decoded = [stage6, stage5d, ..., stage1d]; side i reads the stage at level i.
        sides = [conv(3, name=f"side{i}")(decoded[6 - i]) for i in range(1, 7)]
        sides = [snn.resize(s, x.shape[1:3], align_corners=False) for s in sides]
        fused = conv(1, name="outconv")(jnp.concatenate(sides, -1))
        return {"out": fused, "sides": sides}


def u2net(variant: str, num_classes: int = 1, conv_bias: bool = True, dtype=None, param_dtype=jnp.float32,
          axis_name=None, conv_lowering: str = "auto") -> U2Net:
    layers = snn.dtype_partials(dtype, param_dtype, axis_name, conv_lowering=conv_lowering)
    encoder, decoder = VARIANTS[variant]
    return U2Net(num_classes, encoder, decoder, conv_bias, layers.conv, layers.norm)


for _variant in VARIANTS:
    register(_variant)(functools.partial(u2net, _variant))
