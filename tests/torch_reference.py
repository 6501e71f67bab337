"""Compact PyTorch twins of segjax models that torchvision lacks: UNet, U^2-Net, DeepLab v3+ (ResNet),
FCN-32s/16s/8s (VGG16) and SegNet, for throughput side by side (experiments/benchmark.py picks up a builder named like
the segjax model). Written from the architectures as segjax/models documents them; the same layer widths,
so parameter counts match segjax's exactly (tested), not a copy of the original repositories. Outputs
follow segjax's contract: {"out": logits, "aux": ..., "sides": [...]} in NCHW.
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


# ---------------------------------------------------------------------------------------------- DeepLab v3+

def conv_bn_act(cin: int, cout: int, kernel: int, dilation: int = 1) -> nn.Sequential:
    """Conv (no bias, "same" padding) + BN + ReLU."""
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=dilation * (kernel - 1) // 2, dilation=dilation,
                                   bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class AtrousPyramid(nn.Module):
    """ASPP: a 1x1 branch, one 3x3 branch per rate, image pooling (1x1 conv + BN + ReLU on the global mean,
    broadcast back); concatenated, projected by 1x1 conv + BN + ReLU, then dropout."""

    def __init__(self, cin: int, rates, width: int = 256, dropout_rate: float = 0.1):
        super().__init__()
        self.branches = nn.ModuleList([conv_bn_act(cin, width, 1), *(conv_bn_act(cin, width, 3, r) for r in rates)])
        self.image_pool = conv_bn_act(cin, width, 1)
        self.project = conv_bn_act(width * (len(rates) + 2), width, 1)
        self.dropout = nn.Dropout(dropout_rate)

    def forward(self, x):
        pooled = self.image_pool(x.mean(dim=(2, 3), keepdim=True)).expand(-1, -1, *x.shape[2:])
        return self.dropout(self.project(torch.cat([b(x) for b in self.branches] + [pooled], 1)))


class AuxHead(nn.Sequential):
    """3x3 conv to a quarter of the channels + BN + ReLU, dropout, 1x1 classifier (with bias)."""

    def __init__(self, cin: int, num_classes: int, dropout_rate: float = 0.1):
        super().__init__(conv_bn_act(cin, cin // 4, 3), nn.Dropout(dropout_rate), nn.Conv2d(cin // 4, num_classes, 1))


class DeepLabV3Plus(nn.Module):
    """ResNet (torchvision's, dilated to the output stride) -> ASPP on layer4; decoder: layer1 projected to
    48 ch, the ASPP output resized to layer1's size, concatenated, two 3x3 conv(256) + BN + ReLU, a 1x1
    classifier, and a bilinear resize (align_corners=False) to the input size. Aux head on layer3."""

    RATES = {8: (12, 24, 36), 16: (6, 12, 18)}
    DILATE = {8: [False, True, True], 16: [False, False, True]}

    def __init__(self, depth: int, num_classes: int, aux: bool = False, output_stride: int = 16,
                 dropout_rate: float = 0.1, aux_dropout_rate: float | None = None, decoder_convs: int = 2,
                 low_level_first: bool = False, align_corners: bool = False):
        super().__init__()
        import torchvision

        self.low_level_first, self.align_corners = low_level_first, align_corners

        resnet = getattr(torchvision.models, f"resnet{depth}")(weights=None,
                                                               replace_stride_with_dilation=self.DILATE[output_stride])
        self.stem = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4
        self.aspp = AtrousPyramid(2048, self.RATES[output_stride], 256, dropout_rate)
        self.low_project = conv_bn_act(256, 48, 1)
        self.decoder = nn.Sequential(*(conv_bn_act(256 if i else 256 + 48, 256, 3) for i in range(decoder_convs)))
        self.logits = nn.Conv2d(256, num_classes, 1)
        if aux_dropout_rate is None:
            aux_dropout_rate = 0.1 if dropout_rate > 0 else 0.0
        self.aux = AuxHead(1024, num_classes, aux_dropout_rate) if aux else None

    def forward(self, x):
        low = self.layer1(self.stem(x))
        mid = self.layer3(self.layer2(low))
        high = self.aspp(self.layer4(mid))
        low = self.low_project(low)
        parts = [_resize_to(high, low.shape[2:], self.align_corners), low]
        y = torch.cat(parts[::-1] if self.low_level_first else parts, 1)
        out = {"out": _resize_to(self.logits(self.decoder(y)), x.shape[2:], self.align_corners)}
        if self.aux is not None:
            out["aux"] = _resize_to(self.aux(mid), x.shape[2:], self.align_corners)
        return out


def _resize_to(x, size, align_corners: bool = False):
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=align_corners)


def _deeplabv3plus(depth, num_classes, aux, output_stride, dropout_rate, aux_dropout_rate, multi_grid, head_kw):
    if multi_grid is not None:
        raise NotImplementedError("the DeepLab v3+ twin has no multi_grid (torchvision's ResNet dilates layer4 "
                                  "uniformly); benchmark without it")
    return DeepLabV3Plus(depth, num_classes, aux, output_stride, dropout_rate, aux_dropout_rate, **head_kw)


def deeplabv3plus_resnet50(num_classes: int = 21, aux: bool = False, output_stride: int = 16,
                           dropout_rate: float = 0.1, aux_dropout_rate: float | None = None, decoder_convs: int = 2,
                           low_level_first: bool = False, multi_grid=None, align_corners: bool = False,
                           **_) -> DeepLabV3Plus:
    return _deeplabv3plus(50, num_classes, aux, output_stride, dropout_rate, aux_dropout_rate, multi_grid,
                          dict(decoder_convs=decoder_convs, low_level_first=low_level_first,
                               align_corners=align_corners))


def deeplabv3plus_resnet101(num_classes: int = 21, aux: bool = False, output_stride: int = 16,
                            dropout_rate: float = 0.1, aux_dropout_rate: float | None = None, decoder_convs: int = 2,
                            low_level_first: bool = False, multi_grid=None, align_corners: bool = False,
                            **_) -> DeepLabV3Plus:
    return _deeplabv3plus(101, num_classes, aux, output_stride, dropout_rate, aux_dropout_rate, multi_grid,
                          dict(decoder_convs=decoder_convs, low_level_first=low_level_first,
                               align_corners=align_corners))


# ---------------------------------------------------------------------------------------------- FCN (VGG16)

VGG16_STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


def bilinear_filter(channels: int, size: int) -> torch.Tensor:
    """A ConvTranspose2d weight (in, out, k, k) that upsamples each channel bilinearly by itself."""
    factor = (size + 1) // 2
    centre = factor - 1 if size % 2 else factor - 0.5
    taps = 1 - (torch.arange(size, dtype=torch.float64) - centre).abs() / factor
    weight = torch.zeros(channels, channels, size, size, dtype=torch.float64)
    weight[range(channels), range(channels)] = torch.outer(taps, taps)
    return weight.float()


class FCNVGG16(nn.Module):
    """FCN-`stride`s as the voc-fcn nets: VGG16 body whose first conv pads 100 and whose max-pools round up;
    fc6 (7x7, 4096, unpadded) and fc7 (1x1, 4096) with ReLU and dropout; 1x1 score layers (zero init);
    bias-free transposed-conv upsamplers initialised bilinear; the skips and the output cropped at fixed
    offsets (pool4 5, pool3 9; final 19 / 27 / 31 for 32s / 16s / 8s)."""

    FINAL_OFFSET = {32: 19, 16: 27, 8: 31}

    def __init__(self, num_classes: int, stride: int = 8, dropout_rate: float = 0.5):
        super().__init__()
        self.stride = stride
        self.stages, cin = nn.ModuleList(), 3
        for s, widths in enumerate(VGG16_STAGES):
            layers = []
            for k, width in enumerate(widths):
                layers += [nn.Conv2d(cin, width, 3, padding=100 if s == k == 0 else 1), nn.ReLU(inplace=True)]
                cin = width
            self.stages.append(nn.Sequential(*layers, nn.MaxPool2d(2, 2, ceil_mode=True)))
        self.fc = nn.Sequential(nn.Conv2d(512, 4096, 7), nn.ReLU(inplace=True), nn.Dropout(dropout_rate),
                                nn.Conv2d(4096, 4096, 1), nn.ReLU(inplace=True), nn.Dropout(dropout_rate))
        c = num_classes
        self.score_fr = self._score(4096, c)
        if stride == 32:
            self.upscore = self._upscore(c, 64, 32)
        else:
            self.upscore2, self.score_pool4 = self._upscore(c, 4, 2), self._score(512, c)
            if stride == 16:
                self.upscore16 = self._upscore(c, 32, 16)
            else:
                self.upscore_pool4, self.score_pool3 = self._upscore(c, 4, 2), self._score(256, c)
                self.upscore8 = self._upscore(c, 16, 8)

    @staticmethod
    def _score(cin: int, c: int) -> nn.Conv2d:
        conv = nn.Conv2d(cin, c, 1)
        nn.init.zeros_(conv.weight)
        nn.init.zeros_(conv.bias)
        return conv

    @staticmethod
    def _upscore(c: int, kernel: int, stride: int) -> nn.ConvTranspose2d:
        up = nn.ConvTranspose2d(c, c, kernel, stride=stride, bias=False)
        with torch.no_grad():
            up.weight.copy_(bilinear_filter(c, kernel))
        return up

    def forward(self, x):
        h, w = x.shape[2:]
        pools, y = [], x
        for stage in self.stages:
            y = stage(y)
            pools.append(y)

        def crop(t, offset, size):
            return t[:, :, offset:offset + size[0], offset:offset + size[1]]

        y = self.score_fr(self.fc(y))
        if self.stride == 32:
            y = self.upscore(y)
        else:
            y = self.upscore2(y)
            y = y + crop(self.score_pool4(pools[3]), 5, y.shape[2:])
            if self.stride == 16:
                y = self.upscore16(y)
            else:
                y = self.upscore_pool4(y)
                y = y + crop(self.score_pool3(pools[2]), 9, y.shape[2:])
                y = self.upscore8(y)
        return {"out": crop(y, self.FINAL_OFFSET[self.stride], (h, w))}


def fcn32s_vgg16(num_classes: int = 21, dropout_rate: float = 0.5, **_) -> FCNVGG16:
    return FCNVGG16(num_classes, 32, dropout_rate)


def fcn16s_vgg16(num_classes: int = 21, dropout_rate: float = 0.5, **_) -> FCNVGG16:
    return FCNVGG16(num_classes, 16, dropout_rate)


def fcn8s_vgg16(num_classes: int = 21, dropout_rate: float = 0.5, **_) -> FCNVGG16:
    return FCNVGG16(num_classes, 8, dropout_rate)


# ------------------------------------------------------------------------------------------ SegNet

VGG16_STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


class SegNet(nn.Module):
    """VGG16-BN encoder whose MaxPool2d(return_indices=True) indices drive the decoder's MaxUnpool2d, each
    unpooling to the size its pool saw. Parameter names are segjax's (encoder.conv1_1, encoder.conv1_1_bn,
    ..., decoder.conv1_1_D), so `segjax.convert.from_torch` maps this state_dict with the generic rule."""

    def __init__(self, num_classes: int, ceil_mode: bool = True, base_width: int = 64):
        super().__init__()
        self.stages = [[max(1, w * base_width // 64) for w in stage] for stage in VGG16_STAGES]
        self.pool = nn.MaxPool2d(2, 2, ceil_mode=ceil_mode, return_indices=True)
        self.unpool = nn.MaxUnpool2d(2, 2)
        self.encoder, self.decoder = nn.ModuleDict(), nn.ModuleDict()
        cin = 3
        for s, widths in enumerate(self.stages, 1):
            for k, width in enumerate(widths, 1):
                self.encoder[f"conv{s}_{k}"] = nn.Conv2d(cin, width, 3, padding=1)
                self.encoder[f"conv{s}_{k}_bn"] = nn.BatchNorm2d(width)
                cin = width
        for s in range(len(self.stages), 0, -1):
            widths = self.stages[s - 1]
            for k in range(len(widths), 0, -1):
                cout = widths[k - 1] if k > 1 else (self.stages[s - 2][-1] if s > 1 else num_classes)
                self.decoder[f"conv{s}_{k}_D"] = nn.Conv2d(cin, cout, 3, padding=1)
                if (s, k) != (1, 1):
                    self.decoder[f"conv{s}_{k}_D_bn"] = nn.BatchNorm2d(cout)
                cin = cout

    def forward(self, x):
        sizes, indices = [], []
        for s, widths in enumerate(self.stages, 1):
            for k in range(1, len(widths) + 1):
                x = F.relu(self.encoder[f"conv{s}_{k}_bn"](self.encoder[f"conv{s}_{k}"](x)))
            sizes.append(x.shape[2:])
            x, where = self.pool(x)
            indices.append(where)
        for s in range(len(self.stages), 0, -1):
            x = self.unpool(x, indices[s - 1], output_size=sizes[s - 1])
            for k in range(len(self.stages[s - 1]), 0, -1):
                x = self.decoder[f"conv{s}_{k}_D"](x)
                if (s, k) != (1, 1):
                    x = F.relu(self.decoder[f"conv{s}_{k}_D_bn"](x))
        return {"out": x}


def segnet_vgg16_bn(num_classes: int = 11, ceil_mode: bool = True, base_width: int = 64, **_) -> SegNet:
    return SegNet(num_classes, ceil_mode, base_width)
