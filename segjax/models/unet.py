"""U-Net (Ronneberger et al., 2015) in the layout of milesial's Pytorch-UNet.

    inc:    DoubleConv(C)                         H
    down1:  maxpool 2 -> DoubleConv(2C)           H/2
    down2:  maxpool 2 -> DoubleConv(4C)           H/4
    down3:  maxpool 2 -> DoubleConv(8C)           H/8
    down4:  maxpool 2 -> DoubleConv(16C / f)      H/16
    up1..4: upsample x2, pad to the skip's size, concat [skip, up], DoubleConv
    outc:   1x1 conv -> num_classes

DoubleConv is (3x3 conv without bias -> BN -> ReLU) twice. With `bilinear=True` (f = 2) the
upsampling is an align_corners=True bilinear resize and each Up's DoubleConv halves the width in
its first conv; otherwise (f = 1) a 2x2 stride-2 transposed conv halves the channels. Max-pooling
floors odd sizes, so the upsampled map can be one pixel short of its skip: it is zero-padded,
the extra pixel at the bottom/right, as the reference does.

Flax paths: inc/{0,1,3,4}, down1/{0,1,3,4}, up1/up, up1/conv/{0,1,3,4}, outc (the indices are the
reference's `double_conv` Sequential positions; `segjax.convert.unet_layouts` drops the
`maxpool_conv.1.` / `double_conv.` / `outc.conv.` levels of the reference's key names).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import linen as nn

from segjax import nn as snn
from segjax.models.registry import register
from segjax.nn import ModuleDef


class DoubleConv(nn.Module):
    """(3x3 conv -> BN -> ReLU) x 2; submodules named like the reference Sequential: 0, 1, 3, 4."""
    features: int
    mid_features: int | None = None
    conv: ModuleDef = snn.conv2d
    norm: ModuleDef = snn.BatchNorm

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        conv, norm = self.conv, self.norm
        x = nn.relu(norm(name="1")(conv(self.mid_features or self.features, 3, name="0")(x), train))
        return nn.relu(norm(name="4")(conv(self.features, 3, name="3")(x), train))


def pad_to(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Zero-pads NHWC `x` to spatial `size`: half the difference before, the rest after (F.pad rule)."""
    dy, dx = size[0] - x.shape[1], size[1] - x.shape[2]
    if snn.is_symbolic(dy, dx):  # jax.export with free H, W: deciding the pad's sign took minutes, then failed
        raise ValueError("UNet: with symbolic H, W the upsampled map and its skip differ by a size-dependent "
                         "amount; give H and W multiples of 16")
    return jnp.pad(x, ((0, 0), (dy // 2, dy - dy // 2), (dx // 2, dx - dx // 2), (0, 0)))


class Up(nn.Module):
    """Upsample x2, pad to the skip's size, concatenate [skip, upsampled], DoubleConv."""
    features: int
    bilinear: bool
    conv: ModuleDef = snn.conv2d
    norm: ModuleDef = snn.BatchNorm
    conv_transpose: ModuleDef = snn.ConvTranspose

    @nn.compact
    def __call__(self, x: jax.Array, skip: jax.Array, train: bool = False) -> jax.Array:
        in_features = x.shape[-1] + skip.shape[-1]
        if self.bilinear:
            x = snn.resize(x, (2 * x.shape[1], 2 * x.shape[2]), align_corners=True)
            mid = in_features // 2
        else:
            x = self.conv_transpose(x.shape[-1] // 2, kernel_size=2, stride=2, name="up")(x)
            mid = None
        x = jnp.concatenate([skip, pad_to(x, skip.shape[1:3]).astype(skip.dtype)], axis=-1)
        return DoubleConv(self.features, mid, self.conv, self.norm, name="conv")(x, train)


class UNet(nn.Module):
    num_classes: int
    bilinear: bool = False
    base_channels: int = 64
    conv: ModuleDef = snn.conv2d
    norm: ModuleDef = snn.BatchNorm
    conv_transpose: ModuleDef = snn.ConvTranspose

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        c, f = self.base_channels, (2 if self.bilinear else 1)
        double_conv = functools.partial(DoubleConv, conv=self.conv, norm=self.norm)
        up = functools.partial(Up, bilinear=self.bilinear, conv=self.conv, norm=self.norm,
                               conv_transpose=self.conv_transpose)

        skips = [double_conv(c, name="inc")(x, train)]
        for i, width in enumerate([2 * c, 4 * c, 8 * c, 16 * c // f], start=1):
            skips.append(double_conv(width, name=f"down{i}")(snn.max_pool2d(skips[-1], 2), train))

        y = skips.pop()
        for i, width in enumerate([8 * c // f, 4 * c // f, 2 * c // f, c], start=1):
            y = up(width, name=f"up{i}")(y, skips.pop(), train)

        return {"out": self.conv(self.num_classes, 1, use_bias=True, name="outc")(y)}


@register("unet")
def unet(num_classes: int, bilinear: bool = False, base_channels: int = 64, dtype=None, param_dtype=jnp.float32,
         axis_name=None, conv_lowering: str = "auto") -> UNet:
    """milesial's UNet: `bilinear=False` (transposed conv, 31.0M params at base 64) is its default;
    the DRIVE recipe uses `bilinear=True, base_channels=32` (4.3M)."""
    layers = snn.dtype_partials(dtype, param_dtype, axis_name, conv_lowering=conv_lowering)
    return UNet(num_classes, bilinear, base_channels, layers.conv, layers.norm,
                layers.conv_transpose)
