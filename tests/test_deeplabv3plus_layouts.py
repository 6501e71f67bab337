"""DeepLab v3+ checkpoints of VainF/DeepLabV3Plus-Pytorch: its training-checkpoint wrapper, key names
(table recorded from its code in tests/fixtures) and decoder variant (one 3x3 conv on [low-level, ASPP]).

The backbone and ASPP are torchvision's (checked against torchvision in test_resnet_family); the
decoder variant is checked here against a functional forward of the head written from its definition.
"""
import json
import pathlib

import jax
import numpy as np
import pytest
import torch

from segjax import cli, convert, models
from segjax.models.deeplab import DeepLabV3PlusHead
from tests.parity import random_state_dict, rel_l2

F = torch.nn.functional
TABLES = json.loads((pathlib.Path(__file__).parent / "fixtures" / "deeplabv3plus_vainf_state_dict_shapes.json").read_text())


def t(sd, key):
    return torch.from_numpy(np.ascontiguousarray(sd[key]))


def vainf_head_forward(sd, high, low, rates=(6, 12, 18)):
    """ASPP (1x1, three 3x3 atrous, image pooling; 1x1 projection), 48-ch low-level projection,
    concat [low, ASPP upsampled], one 3x3 conv + BN + ReLU, 1x1 classifier. Eval-mode BN, NCHW."""
    def bn(h, p):
        return F.batch_norm(h, t(sd, p + ".running_mean"), t(sd, p + ".running_var"), t(sd, p + ".weight"),
                            t(sd, p + ".bias"), False, 0.0, 1e-5)

    def cbr(h, conv, norm, pad=0, dil=1):
        return F.relu(bn(F.conv2d(h, t(sd, conv + ".weight"), None, 1, pad, dil), norm))

    a = "classifier.aspp.convs"
    branches = [cbr(high, f"{a}.0.0", f"{a}.0.1")]
    branches += [cbr(high, f"{a}.{i}.0", f"{a}.{i}.1", r, r) for i, r in enumerate(rates, 1)]
    pooled = cbr(high.mean(dim=(2, 3), keepdim=True), f"{a}.4.1", f"{a}.4.2")
    branches.append(pooled.expand(-1, -1, *high.shape[2:]))
    aspp = cbr(torch.cat(branches, 1), "classifier.aspp.project.0", "classifier.aspp.project.1")
    low = cbr(low, "classifier.project.0", "classifier.project.1")
    aspp = F.interpolate(aspp, size=low.shape[2:], mode="bilinear", align_corners=False)
    x = cbr(torch.cat([low, aspp], 1), "classifier.classifier.0", "classifier.classifier.1", pad=1)
    return F.conv2d(x, t(sd, "classifier.classifier.3.weight"), t(sd, "classifier.classifier.3.bias"))


@pytest.mark.parametrize("depth", [50, 101])
def test_vainf_published_format_converts_through_the_cli(depth, tmp_path):
    name = f"deeplabv3plus_resnet{depth}"
    sd = {k: torch.zeros(v) for k, v in TABLES[name].items()}  # names and shapes are what is checked here
    path = tmp_path / f"best_{name}_voc_os16.pth"
    torch.save({"cur_itrs": 30000, "model_state": sd, "optimizer_state": {"state": {}, "param_groups": [{"lr": 0.01}]},
                "scheduler_state": {"last_epoch": 30000}, "best_score": np.float64(0.772)}, path)
    assert cli.main(["convert", name, str(path), str(tmp_path / "out")]) == 0
    meta = json.loads((tmp_path / "out" / "segjax.json").read_text())
    assert meta["model_kwargs"] == {"num_classes": 21, "aux": False, "output_stride": 16, "decoder_convs": 1,
                                    "low_level_first": True}
    assert meta["mean"] == [0.485, 0.456, 0.406] and meta["std"] == [0.229, 0.224, 0.225]
    assert meta["layout"] == "VainF/DeepLabV3Plus-Pytorch"


def test_vainf_decoder_variant_matches_its_forward():
    table = {k: tuple(v) for k, v in TABLES["deeplabv3plus_resnet50"].items() if k.startswith("classifier.")}
    sd = random_state_dict(table, seed=0)
    variables = convert.torch_to_flax(sd, convert.layout_for("deeplabv3plus_resnet50", TABLES["deeplabv3plus_resnet50"]).rename)
    rng = np.random.RandomState(1)
    high, low = rng.randn(1, 5, 6, 2048).astype(np.float32), rng.randn(1, 17, 21, 256).astype(np.float32)
    with torch.no_grad():
        want = vainf_head_forward(sd, torch.from_numpy(high.transpose(0, 3, 1, 2)),
                                  torch.from_numpy(low.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
    head_variables = {c: variables[c]["classifier"] for c in ("params", "batch_stats")}
    got = {order: jax.jit(lambda v, h, lo, head=DeepLabV3PlusHead(21, (6, 12, 18), decoder_convs=1,
                                                                  low_level_first=order):
                          head.apply(v, h, lo, train=False))(head_variables, high, low) for order in (True, False)}
    err = rel_l2(got[True], want)
    print(f"VainF decoder vs its forward: rel L2 {err:.2e}")
    assert err < 1e-5
    assert rel_l2(got[False], want) > 1e-2  # the concat order matters
    # The default (paper) head has two decoder convs: the VainF file does not fit it.
    with pytest.raises(Exception, match="does not fit"):
        convert.from_torch("deeplabv3plus_resnet50", {k: np.broadcast_to(np.float32(0), v) for k, v in
                                                      TABLES["deeplabv3plus_resnet50"].items()}, decoder_convs=2)


# ------------------------------------------------------------------------------ jfzhang95/pytorch-deeplab-xception

JF_TABLE = json.loads((pathlib.Path(__file__).parent / "fixtures" /
                       "deeplabv3plus_jfzhang95_state_dict_shapes.json").read_text())["deeplabv3plus_resnet101"]


def jfzhang95_head_forward(sd, high, low, rates=(6, 12, 18)):
    """Its ASPP (aspp1..4, global_avg_pool, conv1/bn1), decoder (conv1/bn1 48-ch projection, ASPP upsampled
    with align_corners=True, concat [ASPP, low], last_conv: two 3x3 conv + BN + ReLU, 1x1 classifier)."""
    def cbr(h, conv, norm, pad=0, dil=1):
        h = F.conv2d(h, t(sd, conv + ".weight"), None, 1, pad, dil)
        return F.relu(F.batch_norm(h, t(sd, norm + ".running_mean"), t(sd, norm + ".running_var"),
                                   t(sd, norm + ".weight"), t(sd, norm + ".bias"), False, 0.0, 1e-5))

    branches = [cbr(high, "aspp.aspp1.atrous_conv", "aspp.aspp1.bn")]
    branches += [cbr(high, f"aspp.aspp{i}.atrous_conv", f"aspp.aspp{i}.bn", r, r) for i, r in enumerate(rates, 2)]
    pooled = cbr(high.mean(dim=(2, 3), keepdim=True), "aspp.global_avg_pool.1", "aspp.global_avg_pool.2")
    branches.append(pooled.expand(-1, -1, *high.shape[2:]))
    aspp = cbr(torch.cat(branches, 1), "aspp.conv1", "aspp.bn1")
    low = cbr(low, "decoder.conv1", "decoder.bn1")
    aspp = F.interpolate(aspp, size=low.shape[2:], mode="bilinear", align_corners=True)
    x = cbr(torch.cat([aspp, low], 1), "decoder.last_conv.0", "decoder.last_conv.1", pad=1)
    x = cbr(x, "decoder.last_conv.4", "decoder.last_conv.5", pad=1)
    return F.conv2d(x, t(sd, "decoder.last_conv.8.weight"), t(sd, "decoder.last_conv.8.bias"))


def test_jfzhang95_published_format_converts_with_multi_grid_and_align_corners(tmp_path):
    sd = {k: torch.zeros(v) for k, v in JF_TABLE.items()}
    path = tmp_path / "deeplab-resnet.pth.tar"
    torch.save({"epoch": 49, "state_dict": sd, "optimizer": {"state": {}}, "best_pred": np.float64(0.7843)}, path)
    assert cli.main(["convert", "deeplabv3plus_resnet101", str(path), str(tmp_path / "out")]) == 0
    meta = json.loads((tmp_path / "out" / "segjax.json").read_text())
    assert meta["model_kwargs"] == {"num_classes": 21, "aux": False, "output_stride": 16, "multi_grid": [1, 2, 4],
                                    "align_corners": True}  # the tuple comes back from JSON as a list
    assert meta["layout"] == "jfzhang95/pytorch-deeplab-xception"
    model = models.create("deeplabv3plus_resnet101", **meta["model_kwargs"])  # builders take the list
    assert model.backbone.multi_grid == (1, 2, 4) and model.align_corners


def test_multi_grid_dilates_every_layer4_block():
    from segjax.models.resnet import stage_plan

    layer4 = stage_plan((3, 4, 23, 3), 4, (False, False, True), multi_grid=(1, 2, 4))[3][1]
    assert layer4 == [(1, 2, True), (1, 4, False), (1, 8, False)]
    assert stage_plan((3, 4, 23, 3), 4, (False, False, True))[3][1] == [(1, 1, True), (1, 2, False), (1, 2, False)]


def test_jfzhang95_head_matches_its_forward():
    table = {k: tuple(v) for k, v in JF_TABLE.items() if k.startswith(("aspp.", "decoder."))}
    sd = random_state_dict(table, seed=3)
    variables = convert.torch_to_flax(sd, convert.layout_for("deeplabv3plus_resnet101", JF_TABLE).rename)
    rng = np.random.RandomState(2)
    high, low = rng.randn(1, 5, 6, 2048).astype(np.float32), rng.randn(1, 17, 21, 256).astype(np.float32)
    with torch.no_grad():
        want = jfzhang95_head_forward(sd, torch.from_numpy(high.transpose(0, 3, 1, 2)),
                                      torch.from_numpy(low.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
    head_variables = {c: variables[c]["classifier"] for c in ("params", "batch_stats")}
    got = {ac: jax.jit(lambda v, h, lo, head=DeepLabV3PlusHead(21, (6, 12, 18), align_corners=ac):
                       head.apply(v, h, lo, train=False))(head_variables, high, low) for ac in (True, False)}
    err = rel_l2(got[True], want)
    print(f"jfzhang95 head vs its forward: rel L2 {err:.2e}")
    assert err < 1e-5
    assert rel_l2(got[False], want) > 1e-3  # align_corners matters
