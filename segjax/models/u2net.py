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

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from segjax import nn as snn
from segjax.models.registry import register

Dtype = Any


def upsample_like(x: jax.Array, target: jax.Array) -> jax.Array:
    return snn.resize(x, target.shape[1:3], align_corners=False)


class REBNCONV(nn.Module):
    features: int
    dilation: int = 1
    conv_bias: bool = True
    axis_name: str | None = None
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        conv, norm, _ = snn.dtype_partials(self.dtype, self.param_dtype, self.axis_name)
        x = conv(self.features, 3, dilation=self.dilation, use_bias=self.conv_bias, name="conv_s1")(x)
        return nn.relu(norm(name="bn_s1")(x, train))


class RSU(nn.Module):
    """RSU-`height`; with `dilated` it is RSU-4F (no pooling, dilations 1, 2, 4, 8)."""
    height: int
    mid_features: int
    out_features: int
    dilated: bool = False
    conv_bias: bool = True
    axis_name: str | None = None
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        def rebnconv(features, dilation, name):
            return REBNCONV(features, dilation, self.conv_bias, self.axis_name, self.dtype, self.param_dtype,
                            name=name)

        depth = self.height
        # Encoder dilation of rebnconv{i}: RSU-L uses 1 then 2 at the bottom; RSU-4F doubles each level.
        dilation = (lambda i: 2 ** (i - 1)) if self.dilated else (lambda i: 2 if i == depth else 1)

        x_in = rebnconv(self.out_features, 1, "rebnconvin")(x, train)
        encoded = [rebnconv(self.mid_features, dilation(1), "rebnconv1")(x_in, train)]
        for i in range(2, depth + 1):
            h = encoded[-1]
            if not self.dilated and i < depth:
                h = snn.max_pool2d(h, 2, 2, ceil_mode=True)
            encoded.append(rebnconv(self.mid_features, dilation(i), f"rebnconv{i}")(h, train))

        y = encoded.pop()
        for i in range(depth - 1, 0, -1):
            skip = encoded.pop()
            features = self.out_features if i == 1 else self.mid_features
            y = rebnconv(features, dilation(i), f"rebnconv{i}d")(
                jnp.concatenate([upsample_like(y, skip), skip], -1), train)
        return y + x_in


# (height, mid, out) per stage: encoder stage1..6, then decoder stage5d..1d. Stages 5, 6 and 5d are
# RSU-4F (height 4, dilated).
U2NET_ENCODER = ((7, 32, 64), (6, 32, 128), (5, 64, 256), (4, 128, 512), (4, 256, 512), (4, 256, 512))
U2NET_DECODER = ((4, 256, 512), (4, 128, 256), (5, 64, 128), (6, 32, 64), (7, 16, 64))
U2NETP_ENCODER = ((7, 16, 64), (6, 16, 64), (5, 16, 64), (4, 16, 64), (4, 16, 64), (4, 16, 64))
U2NETP_DECODER = ((4, 16, 64), (4, 16, 64), (5, 16, 64), (6, 16, 64), (7, 16, 64))


class U2Net(nn.Module):
    num_classes: int = 1
    encoder: Sequence[tuple[int, int, int]] = U2NET_ENCODER
    decoder: Sequence[tuple[int, int, int]] = U2NET_DECODER
    conv_bias: bool = True
    axis_name: str | None = None
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> dict[str, Any]:
        common = dict(conv_bias=self.conv_bias, axis_name=self.axis_name, dtype=self.dtype,
                      param_dtype=self.param_dtype)

        encoded, h = [], x
        for i, (height, mid, out) in enumerate(self.encoder, start=1):
            if i > 1:
                h = snn.max_pool2d(h, 2, 2, ceil_mode=True)
            h = RSU(height, mid, out, dilated=i >= 5, **common, name=f"stage{i}")(h, train)
            encoded.append(h)

        decoded = [encoded.pop()]  # stage6's output feeds side6 and the decoder
        for i, (height, mid, out) in zip(range(5, 0, -1), self.decoder):
            skip = encoded.pop()
            h = jnp.concatenate([upsample_like(decoded[-1], skip), skip], -1)
            decoded.append(RSU(height, mid, out, dilated=i == 5, **common, name=f"stage{i}d")(h, train))

        conv = lambda k, name: snn.conv2d(self.num_classes, k, use_bias=True, dtype=self.dtype,  # noqa: E731
                                          param_dtype=self.param_dtype, name=name)
        # decoded = [stage6, stage5d, ..., stage1d]; side i reads the stage at level i.
        sides = [conv(3, f"side{i}")(decoded[6 - i]) for i in range(1, 7)]
        sides = [snn.resize(s, x.shape[1:3], align_corners=False) for s in sides]
        fused = conv(1, "outconv")(jnp.concatenate(sides, -1))
        return {"out": fused, "sides": sides}


@register("u2net")
def u2net(num_classes: int = 1, conv_bias: bool = True, **kw) -> U2Net:
    """Full U^2-Net (44.0M parameters with the original's conv biases)."""
    return U2Net(num_classes=num_classes, encoder=U2NET_ENCODER, decoder=U2NET_DECODER, conv_bias=conv_bias, **kw)


@register("u2netp")
def u2netp(num_classes: int = 1, conv_bias: bool = True, **kw) -> U2Net:
    """U^2-Net lite (1.13M parameters)."""
    return U2Net(num_classes=num_classes, encoder=U2NETP_ENCODER, decoder=U2NETP_DECODER, conv_bias=conv_bias, **kw)
