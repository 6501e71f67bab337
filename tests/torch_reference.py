"""Compact PyTorch twins of segjax's UNet and U^2-Net, for throughput side by side (experiments/benchmark.py
picks up a builder named like the segjax model). Written from the architectures as segjax/models documents
them; the same layer widths, so parameter counts match segjax's exactly (tested), not a copy of the
original repositories. Outputs follow segjax's contract: {"out": logits, "sides": [...]} in NCHW.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn_relu(cin: int, cout: int, dilation: int = 1, bias: bool = False) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=dilation, dilation=dilation, bias=bias), nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True)]


class DoubleConv(nn.Sequential):
    def __init__(self, cin: int, cout: int, mid: int | None = None):
        super().__init__(*conv_bn_relu(cin, mid or cout), *conv_bn_relu(mid or cout, cout))


class Up(nn.Module):
    """Bilinear x2 (align_corners) or a 2x2 stride-2 transposed conv halving the channels; pad to the
    skip's size; DoubleConv over [skip, upsampled] (bilinear: the first conv halves the width)."""

    def __init__(self, cin: int, cskip: int, cout: int, bilinear: bool):
        super().__init__()
        if bilinear:
            self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
            self.conv = DoubleConv(cskip + cin, cout, (cskip + cin) // 2)
        else:
            self.up = nn.ConvTranspose2d(cin, cin // 2, 2, stride=2)
            self.conv = DoubleConv(cskip + cin // 2, cout)

    def forward(self, x, skip):
        x = self.up(x)
        dy, dx = skip.shape[2] - x.shape[2], skip.shape[3] - x.shape[3]
        x = F.pad(x, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])
        return self.conv(torch.cat([skip, x], 1))


class UNet(nn.Module):
    def __init__(self, num_classes: int, bilinear: bool = False, base_channels: int = 64, in_channels: int = 3):
        super().__init__()
        c, f = base_channels, (2 if bilinear else 1)
        widths = [c, 2 * c, 4 * c, 8 * c, 16 * c // f]
        self.inc = DoubleConv(in_channels, c)
        self.downs = nn.ModuleList(DoubleConv(a, b) for a, b in zip(widths[:-1], widths[1:]))
        outs = [8 * c // f, 4 * c // f, 2 * c // f, c]
        self.ups = nn.ModuleList(Up(cin, skip, cout, bilinear)
                                 for cin, skip, cout in zip([widths[-1], *outs[:-1]], widths[-2::-1], outs))
        self.outc = nn.Conv2d(c, num_classes, 1)

    def forward(self, x):
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(F.max_pool2d(skips[-1], 2)))
        y = skips.pop()
        for up in self.ups:
            y = up(y, skips.pop())
        return {"out": self.outc(y)}


def unet(num_classes: int, bilinear: bool = False, base_channels: int = 64, **_) -> UNet:
    return UNet(num_classes, bilinear, base_channels)


# ---------------------------------------------------------------------------------------------- U^2-Net

def _resize_like(x, target):
    return F.interpolate(x, size=target.shape[2:], mode="bilinear", align_corners=False)


class RSU(nn.Module):
    """RSU-`height` (RSU-4F when `dilated`): input conv, a small U-Net of that height, residual add."""

    def __init__(self, height: int, cin: int, mid: int, cout: int, dilated: bool = False, bias: bool = True):
        super().__init__()
        self.height, self.dilated = height, dilated
        dil = (lambda i: 2 ** (i - 1)) if dilated else (lambda i: 2 if i == height else 1)
        self.conv_in = nn.Sequential(*conv_bn_relu(cin, cout, 1, bias))
        self.enc = nn.ModuleList(nn.Sequential(*conv_bn_relu(cout if i == 1 else mid, mid, dil(i), bias))
                                 for i in range(1, height + 1))
        self.dec = nn.ModuleList(nn.Sequential(*conv_bn_relu(2 * mid, cout if i == 1 else mid, dil(i), bias))
                                 for i in range(height - 1, 0, -1))

    def forward(self, x):
        x_in = self.conv_in(x)
        encoded = [self.enc[0](x_in)]
        for i, block in enumerate(self.enc[1:], start=2):
            h = encoded[-1]
            if not self.dilated and i < self.height:
                h = F.max_pool2d(h, 2, 2, ceil_mode=True)
            encoded.append(block(h))
        y = encoded.pop()
        for block in self.dec:
            skip = encoded.pop()
            y = block(torch.cat([_resize_like(y, skip), skip], 1))
        return y + x_in


U2NET_ENCODER = ((7, 32, 64), (6, 32, 128), (5, 64, 256), (4, 128, 512), (4, 256, 512), (4, 256, 512))
U2NET_DECODER = ((4, 256, 512), (4, 128, 256), (5, 64, 128), (6, 32, 64), (7, 16, 64))
U2NETP_ENCODER = ((7, 16, 64), (6, 16, 64), (5, 16, 64), (4, 16, 64), (4, 16, 64), (4, 16, 64))
U2NETP_DECODER = ((4, 16, 64), (4, 16, 64), (5, 16, 64), (6, 16, 64), (7, 16, 64))


class U2Net(nn.Module):
    def __init__(self, num_classes: int = 1, encoder=U2NET_ENCODER, decoder=U2NET_DECODER, bias: bool = True):
        super().__init__()
        cin, self.encoder = 3, nn.ModuleList()
        for i, (height, mid, out) in enumerate(encoder, start=1):
            self.encoder.append(RSU(height, cin, mid, out, dilated=i >= 5, bias=bias))
            cin = out
        enc_out = [out for _, _, out in encoder]
        self.decoder = nn.ModuleList()
        below = enc_out[-1]
        for level, (height, mid, out) in zip(range(5, 0, -1), decoder):
            self.decoder.append(RSU(height, below + enc_out[level - 1], mid, out, dilated=level == 5, bias=bias))
            below = out
        side_in = [decoder[-1][2], *[d[2] for d in decoder[-2::-1]], enc_out[-1]]  # levels 1..6
        self.sides = nn.ModuleList(nn.Conv2d(c, num_classes, 3, padding=1) for c in side_in)
        self.outconv = nn.Conv2d(6 * num_classes, num_classes, 1)

    def forward(self, x):
        encoded, h = [], x
        for i, stage in enumerate(self.encoder):
            if i:
                h = F.max_pool2d(h, 2, 2, ceil_mode=True)
            h = stage(h)
            encoded.append(h)
        decoded = [encoded.pop()]
        for stage in self.decoder:
            skip = encoded.pop()
            decoded.append(stage(torch.cat([_resize_like(decoded[-1], skip), skip], 1)))
        sides = [_resize_like(conv(decoded[6 - i]), x) for i, conv in enumerate(self.sides, start=1)]
        return {"out": self.outconv(torch.cat(sides, 1)), "sides": sides}


def u2net(num_classes: int = 1, conv_bias: bool = True, **_) -> U2Net:
    return U2Net(num_classes, U2NET_ENCODER, U2NET_DECODER, conv_bias)


def u2netp(num_classes: int = 1, conv_bias: bool = True, **_) -> U2Net:
    return U2Net(num_classes, U2NETP_ENCODER, U2NETP_DECODER, conv_bias)
