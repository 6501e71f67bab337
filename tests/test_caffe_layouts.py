"""Caffe-trained VGG checkpoints in their PyTorch reproductions' layouts: FCN-32s/16s/8s (and 8s at-once)
from wkentaro/pytorch-fcn, DeepLab v1 LargeFOV from wangleihitcs/DeepLab-V1-PyTorch.

The key/shape tables in tests/fixtures were recorded from the reference code; the numerics are checked
against functional forwards written here from the caffe nets' definitions (BGR 0-255 input minus the
mean, as the references feed them), on the reference-layout state dicts, while our models take
(x_rgb01 - mean) / std with the mean/std the conversion records.
"""
import json
import pathlib

import jax
import numpy as np
import pytest
import torch
from flax.traverse_util import flatten_dict, unflatten_dict
from PIL import Image

from segjax import convert, models
from segjax.errors import SegjaxError
from tests.parity import FCN_MEAN_BGR, caffe_input, our_input, random_state_dict, rel_l2

F = torch.nn.functional
FIXTURES = pathlib.Path(__file__).parent / "fixtures"
FCN_TABLES = json.loads((FIXTURES / "fcn_wkentaro_state_dict_shapes.json").read_text())
V1_TABLE = json.loads((FIXTURES / "deeplabv1_port_state_dict_shapes.json").read_text())["largefov"]
V1_MEAN_BGR = (104.008, 116.669, 122.675)
VGG16_STAGES = (2, 2, 3, 3, 3)


def t(sd, key):
    return torch.from_numpy(np.ascontiguousarray(sd[key]))


def fcn_forward(sd, x, stride, atonce=False):
    """voc-fcn{32,16,8}s: conv1_1 pad 100, 2x2/2 ceil max-pools, fc6 7x7 unpadded, fc7, score_fr, then
    2x transposed-conv upsampling fused with cropped pool4/pool3 scores (at-once: pool4 x 0.01, pool3 x 1e-4)."""
    conv = lambda h, name, pad=0: F.conv2d(h, t(sd, name + ".weight"), t(sd, name + ".bias"), padding=pad)  # noqa: E731
    up = lambda h, name, s: F.conv_transpose2d(h, t(sd, name + ".weight"), stride=s)  # noqa: E731
    h, pools = x, {}
    for s, n in enumerate(VGG16_STAGES, 1):
        for k in range(1, n + 1):
            h = F.relu(conv(h, f"conv{s}_{k}", 100 if (s, k) == (1, 1) else 1))
        h = pools[s] = F.max_pool2d(h, 2, 2, ceil_mode=True)
    h = conv(F.relu(conv(F.relu(conv(h, "fc6")), "fc7")), "score_fr")
    H, W = x.shape[2:]
    if stride == 32:
        return up(h, "upscore", 32)[:, :, 19:19 + H, 19:19 + W]
    h = up(h, "upscore2", 2)
    h = h + conv(pools[4] * (0.01 if atonce else 1.0), "score_pool4")[:, :, 5:5 + h.shape[2], 5:5 + h.shape[3]]
    if stride == 16:
        return up(h, "upscore16", 16)[:, :, 27:27 + H, 27:27 + W]
    h = up(h, "upscore_pool4", 2)
    h = h + conv(pools[3] * (1e-4 if atonce else 1.0), "score_pool3")[:, :, 9:9 + h.shape[2], 9:9 + h.shape[3]]
    return up(h, "upscore8", 8)[:, :, 31:31 + H, 31:31 + W]


def largefov_forward(sd, x):
    """DeepLab-LargeFOV as the PyTorch port runs it: 3x3 floor max-pools (stride 2, 2, 2, 1, 1, pad 1), conv5
    dilated 2, pool5a 3x3/1 average (padding counted), fc6 3x3 rate 12, fc7, fc8, align_corners=True resize."""
    idx = iter([0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28])
    conv = lambda h, i, pad=1, dil=1: F.conv2d(h, t(sd, f"features.{i}.weight"), t(sd, f"features.{i}.bias"),  # noqa: E731
                                               padding=pad, dilation=dil)
    h = x
    for s, n in enumerate(VGG16_STAGES, 1):
        for _ in range(n):
            h = F.relu(conv(h, next(idx), pad=2 if s == 5 else 1, dil=2 if s == 5 else 1))
        h = F.max_pool2d(h, 3, 2 if s <= 3 else 1, 1)
    h = F.avg_pool2d(h, 3, 1, 1, count_include_pad=True)
    h = conv(F.relu(conv(F.relu(conv(h, 32, pad=12, dil=12)), 35, pad=0)), 38, pad=0)
    return F.interpolate(h, size=x.shape[2:], mode="bilinear", align_corners=True)


def to_nhwc(y: torch.Tensor) -> np.ndarray:
    return y.numpy().transpose(0, 2, 3, 1)


# ------------------------------------------------------------------------------ FCN (wkentaro/pytorch-fcn)

@pytest.fixture(scope="module")
def fcn8s_state_dict():
    table = {k: tuple(v) for k, v in FCN_TABLES["fcn8s"].items()}
    sd = random_state_dict(table, seed=0)
    for key in ("upscore2.weight", "upscore_pool4.weight", "upscore8.weight"):
        sd[key] = sd[key] * 0.3  # keep the summed upsamplings of order one
    return sd


@pytest.mark.slow  # full-width FCN-8s, both sides
def test_fcn8s_at_once_wkentaro_layout_matches_the_caffe_forward(fcn8s_state_dict):
    """One forward (full-width VGG16 is slow on CPU): FCN-8s at-once, whose conversion is FCN-8s's plus
    the folded scales, checked leaf by leaf below."""
    sd = fcn8s_state_dict
    image = np.random.RandomState(1).randint(0, 256, (29, 34, 3)).astype(np.float32)
    with torch.no_grad():
        want = to_nhwc(fcn_forward(sd, caffe_input(image, FCN_MEAN_BGR), 8, atonce=True))
        plain = to_nhwc(fcn_forward(sd, caffe_input(image, FCN_MEAN_BGR), 8, atonce=False))
    assert rel_l2(plain, want) > 1e-2  # the at-once scaling matters at these weights
    variables, meta = convert.convert_state_dict("fcn8s_vgg16", sd, atonce=True)
    assert meta["layout"] == "wkentaro/pytorch-fcn" and meta["model_kwargs"] == {"num_classes": 21}
    assert meta["conversion"] == {"atonce": True}
    np.testing.assert_allclose(meta["mean"], np.array(FCN_MEAN_BGR[::-1]) / 255)
    np.testing.assert_allclose(meta["std"], [1 / 255] * 3)
    # conv1_1 reads RGB: its input channels are the file's reversed.
    np.testing.assert_array_equal(variables["params"]["backbone"]["conv1_1"]["kernel"],
                                  sd["conv1_1.weight"][:, ::-1].transpose(2, 3, 1, 0))
    model = models.create("fcn8s_vgg16", **meta["model_kwargs"])
    got = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, our_input(image, meta))["out"]
    err = rel_l2(got, want)
    print(f"fcn8s at once vs caffe forward: rel L2 {err:.2e}")
    assert got.shape == (1, 29, 34, 21) and err < 1e-4

    plain_vars, plain_meta = convert.convert_state_dict("fcn8s_vgg16", sd)
    assert "conversion" not in plain_meta
    flat, plain_flat = flatten_dict(variables["params"]), flatten_dict(plain_vars["params"])
    assert flat.keys() == plain_flat.keys()
    scaled = {("score_pool4", "kernel"): 0.01, ("score_pool3", "kernel"): 1e-4}
    for path, value in plain_flat.items():
        if path in scaled:
            np.testing.assert_allclose(flat[path], value * np.float32(scaled[path]), rtol=1e-6)
        else:
            assert np.array_equal(flat[path], value), path
    with pytest.raises(SegjaxError, match="atonce='yes': expected True or False"):
        convert.convert_state_dict("fcn8s_vgg16", sd, atonce="yes")


@pytest.mark.parametrize("stride", [32, 16])
def test_fcn32s_fcn16s_wkentaro_tables_convert(stride):
    table = FCN_TABLES[f"fcn{stride}s"]
    sd = {k: np.broadcast_to(np.float32(1), tuple(v)) for k, v in table.items()}  # shapes only
    sd["conv1_1.weight"] = np.arange(64 * 3 * 9, dtype=np.float32).reshape(64, 3, 3, 3)
    variables, meta = convert.convert_state_dict(f"fcn{stride}s_vgg16", sd)
    assert meta["num_classes"] == 21 and meta["layout"] == "wkentaro/pytorch-fcn"
    assert variables["params"]["backbone"]["conv1_1"]["kernel"][0, 0, 0, 0] == sd["conv1_1.weight"][0, 2, 0, 0]
    assert variables["params"]["backbone"]["fc6"]["kernel"].shape == (7, 7, 512, 4096)
    with pytest.raises(SegjaxError, match="no option atonce"):  # at-once is FCN-8s only
        convert.convert_state_dict(f"fcn{stride}s_vgg16", sd, atonce=True)
    with pytest.raises(SegjaxError, match="does not fit"):  # an FCN-32s file is no FCN-8s
        convert.convert_state_dict("fcn8s_vgg16", sd)


# ------------------------------------------------------------------------------ DeepLab v1 (wangleihitcs port)

@pytest.fixture(scope="module")
def largefov_file(tmp_path_factory):
    """The port's published format: torch.save of a DataParallel model's state_dict ('module.' keys)."""
    sd = random_state_dict({k: tuple(v) for k, v in V1_TABLE.items()}, seed=2)
    path = tmp_path_factory.mktemp("v1") / "model_last_20000_poly2.pth"
    torch.save({"module." + k: torch.from_numpy(v) for k, v in sd.items()}, path)
    return path, sd


def test_deeplabv1_port_converts_through_the_cli_and_predicts_its_labels(largefov_file, tmp_path, capsys):
    from segjax import checkpoint, cli, predict
    from segjax.inference import load_for_inference

    path, sd = largefov_file
    out = tmp_path / "largefov"
    assert cli.main(["convert", "deeplabv1_largefov_vgg16", str(path), str(out)]) == 0
    meta = json.loads((out / "segjax.json").read_text())
    assert meta["model_kwargs"] == {"num_classes": 21, "align_corners": True, "ceil_mode": False}
    assert meta["crf"] == {"iterations": 10, "pos_w": 3, "pos_xy_std": 3, "bi_w": 5, "bi_xy_std": 140, "bi_rgb_std": 5}
    np.testing.assert_allclose(meta["mean"], np.array(V1_MEAN_BGR[::-1]) / 255)
    np.testing.assert_allclose(meta["std"], [1 / 255] * 3)

    # Even sizes: floor and ceil pooling differ there, and so do the align_corners modes.
    image = np.random.RandomState(3).randint(0, 256, (40, 46, 3)).astype(np.uint8)
    with torch.no_grad():
        want = to_nhwc(largefov_forward(sd, caffe_input(image.astype(np.float32), V1_MEAN_BGR)))
    state = load_for_inference(str(out))
    x = state.card.normalise(image)[None]  # the card's normalisation is the port's caffe one
    np.testing.assert_allclose(x, our_input(image, meta), rtol=1e-5, atol=1e-3)
    got = jax.jit(lambda v, x: state.apply_fn(v, x, train=False))(state.variables, x)["out"]
    err = rel_l2(got, want)
    print(f"deeplabv1 port vs its forward: rel L2 {err:.2e}")
    assert err < 1e-4
    variables, _ = checkpoint.load_variables(str(out))
    default = models.create("deeplabv1_largefov_vgg16", num_classes=21)  # caffe's ceil pools, align_corners=False
    assert rel_l2(default.apply(variables, our_input(image, meta))["out"], want) > 1e-2

    # `segjax predict` normalises with the checkpoint's mean/std: its labels are the reference's argmax.
    Image.fromarray(image).save(tmp_path / "img.png")
    predict.predict(str(out), [str(tmp_path / "img.png")], str(tmp_path / "pred"))
    labels = np.asarray(Image.open(tmp_path / "pred" / "img.png"))
    assert (labels == want[0].argmax(-1)).mean() > 0.99


def test_pool5a_is_an_average_pool_counting_the_padding():
    """Constant features through pool5a: interior stays, edges x 6/9, corners x 4/9 (count_include_pad)."""
    model = models.create("deeplabv1_largefov_vgg16", num_classes=2)
    x = jax.ShapeDtypeStruct((1, 17, 17, 3), np.float32)
    shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), x)
    # Zero kernels; biases 1 on channel 0: every conv up to conv5_3 outputs 1 on channel 0, and so does pool5.
    # fc6 keeps only its centre tap from channel 0, without bias: it reads pool5a's output.
    variables = {p: np.zeros(s.shape, np.float32) for p, s in flatten_dict(shapes["params"]).items()}
    for p, v in variables.items():
        if p[-1] == "bias" and p[0] == "backbone":
            v[0] = 1.0
    variables[("fc6", "kernel")][1, 1, 0, 0] = 1.0
    variables = unflatten_dict(variables)
    _, state = model.apply({"params": variables}, np.zeros((1, 17, 17, 3), np.float32), capture_intermediates=True,
                           mutable=["intermediates"])
    fc6 = np.asarray(state["intermediates"]["fc6"]["__call__"][0])[0, :, :, 0]
    assert fc6.shape == (3, 3)
    np.testing.assert_allclose(fc6, [[4 / 9, 6 / 9, 4 / 9], [6 / 9, 1, 6 / 9], [4 / 9, 6 / 9, 4 / 9]], rtol=1e-6)


# ------------------------------------------------------------------------------ DeepLab v2 (kazuto1011/deeplab-pytorch)

V2_TABLE = json.loads((FIXTURES / "deeplabv2_kazuto_state_dict_shapes.json").read_text())["deeplabv2_msc"]
V2_MEAN_BGR = (104.008, 116.669, 122.675)


def msra_deeplabv2_forward(sd, x):
    """DeepLab v2 on caffe's MSRA ResNet-101: stride on each stage's first 1x1 ("reduce"), ceil-mode stem
    pool, res4/res5 at dilation 2/4 in every block, ASPP-L (3x3 rates 6/12/18/24, summed), bilinear resize."""
    def cbr(h, p, stride=1, pad=0, dil=1, relu=True):
        h = F.conv2d(h, t(sd, p + ".conv.weight"), None, stride, pad, dil)
        h = F.batch_norm(h, t(sd, p + ".bn.running_mean"), t(sd, p + ".bn.running_var"), t(sd, p + ".bn.weight"),
                         t(sd, p + ".bn.bias"), False, 0.0, 1e-5)
        return F.relu(h) if relu else h

    h = F.max_pool2d(cbr(x, "base.layer1.conv1", 2, 3), 3, 2, 1, ceil_mode=True)
    for layer, blocks, stride, dil in ((2, 3, 1, 1), (3, 4, 2, 1), (4, 23, 1, 2), (5, 3, 1, 4)):
        for j in range(1, blocks + 1):
            p, s = f"base.layer{layer}.block{j}", stride if j == 1 else 1
            y = cbr(cbr(cbr(h, p + ".reduce", s), p + ".conv3x3", 1, dil, dil), p + ".increase", relu=False)
            h = F.relu(y + (cbr(h, p + ".shortcut", s, relu=False) if j == 1 else h))
    out = sum(F.conv2d(h, t(sd, f"base.aspp.c{i}.weight"), t(sd, f"base.aspp.c{i}.bias"), padding=r, dilation=r)
              for i, r in enumerate((6, 12, 18, 24)))
    return F.interpolate(out, size=x.shape[2:], mode="bilinear", align_corners=False)


@pytest.mark.slow  # full-width caffe ResNet
def test_deeplabv2_kazuto_layout_is_a_caffe_resnet_and_matches_its_forward():
    table = {k: tuple(v) for k, v in V2_TABLE.items()}
    sd = random_state_dict(table, seed=4, gain=0.2, gain_key="increase.bn")  # small last BN gain per block
    for i in range(4):
        sd[f"base.aspp.c{i}.weight"] = sd[f"base.aspp.c{i}.weight"] * 0.1
    variables, meta = convert.convert_state_dict("deeplabv2_resnet101", sd)
    assert meta["model_kwargs"] == {"num_classes": 21, "resnet_style": "caffe"}
    assert meta["layout"] == "kazuto1011/deeplab-pytorch"
    assert meta["crf"] == {"iterations": 10, "pos_w": 3, "pos_xy_std": 1, "bi_w": 4, "bi_xy_std": 67, "bi_rgb_std": 3}
    np.testing.assert_allclose(meta["mean"], np.array(V2_MEAN_BGR[::-1]) / 255)
    np.testing.assert_array_equal(variables["batch_stats"]["backbone"]["layer3"]["22"]["bn3"]["var"],
                                  sd["base.layer4.block23.increase.bn.running_var"])
    image = np.random.RandomState(5).randint(0, 256, (26, 31, 3)).astype(np.float32)  # even: ceil stem pool matters
    with torch.no_grad():
        want = to_nhwc(msra_deeplabv2_forward(sd, caffe_input(image, V2_MEAN_BGR)))
    apply = jax.jit(lambda model, v, x: model.apply(v, x, train=False)["out"], static_argnums=0)
    got = apply(models.create("deeplabv2_resnet101", **meta["model_kwargs"]), variables, our_input(image, meta))
    err = rel_l2(got, want)
    print(f"deeplabv2 (kazuto layout) vs MSRA forward: rel L2 {err:.2e}")
    assert err < 1e-4
    # torchvision's ResNet on the same weights is another network.
    assert rel_l2(apply(models.create("deeplabv2_resnet101", num_classes=21), variables, our_input(image, meta)),
                  want) > 1e-3
