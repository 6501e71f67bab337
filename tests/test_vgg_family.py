"""VGG classifiers against torchvision; FCN-32s/16s/8s and DeepLab-LargeFOV against their papers.

Full-width VGG is heavy for CPU CI: shapes and parameter counts use jax.eval_shape (no FLOPs, no
memory), forwards use small images (32x45 reaches pool5 at 1x1; the adaptive pool does the rest).
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch
import torchvision
F = torch.nn.functional

from segjax import analysis, models, nn as snn  # noqa: E402
from segjax.convert import from_torch, load_backbone, model_shapes  # noqa: E402
from segjax.errors import SegjaxError  # noqa: E402
from segjax.models import fcn_vgg  # noqa: E402
from tests.parity import rel_l2, randomise_batch_norm

VGG_ARCHS = ["vgg11", "vgg13", "vgg16", "vgg19"]
SEG_NAMES = ["fcn32s_vgg16", "fcn16s_vgg16", "fcn8s_vgg16", "deeplabv1_largefov_vgg16"]


def torch_numpy(module):
    # Copies: torch updates BN buffers in place, and converted arrays may share this memory.
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


# ------------------------------------------------------------------------------ VGG classifiers

@pytest.fixture(scope="module")
def vgg16_bn_pair():
    """torchvision vgg16_bn (dropout off) with non-trivial BN parameters and statistics, and our conversion."""
    torch.manual_seed(0)
    ref = torchvision.models.vgg16_bn(weights=None, num_classes=10, dropout=0.0)
    randomise_batch_norm(ref)
    variables = from_torch("vgg16_bn", torch_numpy(ref), dropout_rate=0.0)  # num_classes read off classifier.6
    return ref, models.create("vgg16_bn", num_classes=10, dropout_rate=0.0), variables


def test_vgg16_bn_eval_matches_torchvision(vgg16_bn_pair):
    ref, model, variables = vgg16_bn_pair
    x = np.random.RandomState(0).randn(2, 32, 45, 3).astype(np.float32)
    with torch.no_grad():
        want = ref.eval()(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    got = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)["out"]
    assert got.shape == (2, 10)
    err = rel_l2(got, want)
    print(f"vgg16_bn eval logits rel L2 = {err:.2e}")
    assert err < 1e-4


def test_vgg16_bn_train_step_matches_torchvision(vgg16_bn_pair):
    ref, model, variables = vgg16_bn_pair
    x = np.random.RandomState(1).randn(2, 32, 45, 3).astype(np.float32)
    ref.train()
    with torch.no_grad():
        want = ref(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    ref.eval()
    got, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)
    err = rel_l2(got["out"], want)
    print(f"vgg16_bn train logits rel L2 = {err:.2e}")
    assert err < 1e-4
    worst = 0.0
    for key, value in ref.state_dict().items():
        if key.endswith(("running_mean", "running_var")):
            _, index, leaf = key.split(".")
            ours = updates["batch_stats"]["features"][index]["mean" if leaf == "running_mean" else "var"]
            worst = max(worst, rel_l2(ours, value.numpy()))
            # The update really moved the statistics (so this compares something).
            assert not np.allclose(ours, variables["batch_stats"]["features"][index][leaf[len("running_"):]])
    print(f"vgg16_bn running stats worst rel L2 = {worst:.2e}")
    assert worst < 1e-4


def test_vgg16_has_138_357_544_parameters():
    shapes = model_shapes(models.create("vgg16", num_classes=1000))
    assert analysis.param_count(shapes["params"]) == 138_357_544
    assert "batch_stats" not in shapes


@pytest.mark.parametrize("arch", VGG_ARCHS)
@pytest.mark.parametrize("batch_norm", [False, True])
def test_vgg_variants_convert_from_torchvision_state_dicts(arch, batch_norm):
    """Every torchvision key lands on one of our variables with the right shape, and the counts agree."""
    name = arch + ("_bn" if batch_norm else "")
    with torch.device("meta"):  # shapes only: no memory, no init cost
        ref = getattr(torchvision.models, name)(weights=None)
    ref_params = sum(p.numel() for p in ref.parameters())
    # Zero-stride views stand in for the weights: the converter checks names and shapes.
    state_dict = {k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in ref.state_dict().items()}
    variables = from_torch(name, state_dict)
    assert analysis.param_count(variables["params"]) == ref_params
    assert ("batch_stats" in variables and len(variables["batch_stats"]) > 0) == batch_norm
    assert variables["params"]["classifier"]["6"]["kernel"].shape == (4096, 1000)


def test_vgg_classifier_is_registered_as_classification_and_takes_dtypes():
    assert set(models.names(kind=None)) >= {a + s for a in VGG_ARCHS for s in ("", "_bn")}
    assert "vgg16" not in models.names()
    model = models.create("vgg11_bn", num_classes=7, dtype=jnp.bfloat16)
    x = jax.ShapeDtypeStruct((1, 32, 33, 3), jnp.float32)
    out, variables = jax.eval_shape(lambda x: model.init_with_output(jax.random.PRNGKey(0), x), x)
    assert out["out"].shape == (1, 7) and out["out"].dtype == jnp.bfloat16
    assert {leaf.dtype for leaf in jax.tree.leaves(variables["params"])} == {jnp.dtype(jnp.float32)}
    with pytest.raises(SegjaxError, match="too small"):
        jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), jax.ShapeDtypeStruct((1, 16, 33, 3), jnp.float32))


# ------------------------------------------------------------------------------ FCN / DeepLab-LargeFOV

def _vgg16_conv_params():
    widths = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256),
              (256, 512), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512)]
    return sum(3 * 3 * i * o + o for i, o in widths)


def _paper_param_count(name, c):
    """From the papers' layer tables, independently of our module code."""
    conv = _vgg16_conv_params()
    if name == "deeplabv1_largefov_vgg16":  # fc6 3x3 rate 12 -> 1024, fc7 1x1 1024, fc8 1x1 -> C
        return conv + (3 * 3 * 512 * 1024 + 1024) + (1024 * 1024 + 1024) + (1024 * c + c)
    fc = (7 * 7 * 512 * 4096 + 4096) + (4096 * 4096 + 4096) + (4096 * c + c)  # fc6, fc7, score_fr
    upscore = lambda k: k * k * c * c  # noqa: E731  bias-free transposed convs, C -> C
    return conv + fc + {
        "fcn32s_vgg16": upscore(64),
        "fcn16s_vgg16": (512 * c + c) + upscore(4) + upscore(32),
        "fcn8s_vgg16": (512 * c + c) + (256 * c + c) + upscore(4) * 2 + upscore(16),
    }[name]


@pytest.mark.parametrize("name", SEG_NAMES)
def test_segmentation_nets_parameter_counts_match_papers(name):
    params = model_shapes(models.create(name, num_classes=21))["params"]
    assert analysis.param_count(params) == _paper_param_count(name, 21)
    # The papers' rounded figures: DeepLab-LargeFOV 20.5M; FCN-VGG16 134M, which leaves out the
    # upsamplers (fixed bilinear in the reference FCN-32s).
    if name.startswith("deeplab"):
        assert round(analysis.param_count(params) / 1e5) / 10 == 20.5
    else:
        assert round(analysis.param_count({k: v for k, v in params.items() if not k.startswith("upscore")}) / 1e6) == 134


def _caffe_pool(n, k, s, p):
    out = math.ceil((n + 2 * p - k) / s) + 1
    return out - 1 if (out - 1) * s >= n + p else out


@pytest.mark.parametrize("name", SEG_NAMES)
@pytest.mark.parametrize("hw", [(67, 93), (64, 64), (1, 5)])
def test_segmentation_nets_output_input_size_and_stride(name, hw):
    model = models.create(name, num_classes=5)
    x = jax.ShapeDtypeStruct((2, *hw, 3), jnp.float32)
    out, state = jax.eval_shape(
        lambda x: model.init_with_output(jax.random.PRNGKey(0), x, capture_intermediates=True), x)
    assert out["out"].shape == (2, *hw, 5)
    coarse_name = "fc8" if name.startswith("deeplab") else "score_fr"
    coarse = state["intermediates"][coarse_name]["__call__"][0].shape[1:3]
    if name.startswith("deeplab"):  # three caffe 3x3/2 pad-1 pools: output stride 8
        want = hw
        for _ in range(3):
            want = tuple(_caffe_pool(n, 3, 2, 1) for n in want)
        assert coarse == tuple(math.ceil((n - 1) / 8) + 1 for n in hw) == want
    else:  # pad 100, five 2x2/2 caffe pools (output stride 32), then fc6 7x7 unpadded
        assert coarse == tuple(math.ceil((n + 198) / 32) - 6 for n in hw)


def test_fcn_crop_offsets_follow_from_the_layer_geometry():
    """Derive caffe's crop offsets by composing each layer's coordinate map x_in = a * x_out + b."""
    def through(layers):
        a, b = 1.0, 0.0
        for kind, k, s, p in layers:
            if kind == "conv":  # conv or pool: x_in = s * x_out + (k - 1) / 2 - p
                a, b = a * s, b + a * ((k - 1) / 2 - p)
            else:  # transposed conv: the inverse map
                a, b = a / s, b - a * ((k - 1) / 2 - p) / s
        return a, b

    def offset(coarse, fine):
        """Index in `fine` of the pixel under `coarse`'s first one (what caffe's Crop takes)."""
        (a_coarse, b_coarse), (a_fine, b_fine) = through(coarse), through(fine)
        assert a_coarse == a_fine
        return (b_coarse - b_fine) / a_fine

    def stage(convs, first_pad=1):
        return [("conv", 3, 1, first_pad)] + [("conv", 3, 1, 1)] * (convs - 1) + [("conv", 2, 2, 0)]

    pool3 = stage(2, first_pad=100) + stage(2) + stage(3)
    pool4 = pool3 + stage(3)
    score_fr = pool4 + stage(3) + [("conv", 7, 1, 0), ("conv", 1, 1, 0), ("conv", 1, 1, 0)]
    upscore2 = score_fr + [("deconv", 4, 2, 0)]
    upscore_pool4 = upscore2 + [("deconv", 4, 2, 0)]
    assert offset(upscore2, pool4) == fcn_vgg.SCORE_POOL4_OFFSET
    assert offset(upscore_pool4, pool3) == fcn_vgg.SCORE_POOL3_OFFSET
    data = []
    assert offset(data, score_fr + [("deconv", 64, 32, 0)]) == fcn_vgg.FINAL_OFFSET[32]
    assert offset(data, upscore2 + [("deconv", 32, 16, 0)]) == fcn_vgg.FINAL_OFFSET[16]
    assert offset(data, upscore_pool4 + [("deconv", 16, 8, 0)]) == fcn_vgg.FINAL_OFFSET[8]


@pytest.mark.parametrize("factor", [2, 32])
def test_bilinear_initialised_upscore_equals_bilinear_interpolation(factor):
    """A 2f x 2f stride-f transposed conv at init, cropped by f/2, is F.interpolate(align_corners=False) inside."""
    c, h, w = 3, 5, 6
    x = np.random.RandomState(factor).randn(1, h, w, c).astype(np.float32)
    up = snn.ConvTranspose(c, 2 * factor, factor, use_bias=False, kernel_init=snn.bilinear_kernel_init)
    y = up.apply(up.init(jax.random.PRNGKey(0), x), x)
    y = fcn_vgg.crop(y, factor // 2, (h * factor, w * factor))
    ours = snn.resize(jnp.asarray(x), (h * factor, w * factor), "bilinear", align_corners=False)
    with torch.no_grad():
        ref = F.interpolate(torch.from_numpy(x.transpose(0, 3, 1, 2)), scale_factor=factor, mode="bilinear",
                            align_corners=False).numpy().transpose(0, 2, 3, 1)
    inner = (slice(None), slice(factor, (h - 1) * factor), slice(factor, (w - 1) * factor))
    np.testing.assert_allclose(np.asarray(y)[inner], ref[inner], atol=1e-5)
    np.testing.assert_allclose(np.asarray(ours)[inner], ref[inner], atol=1e-5)
    assert np.abs(np.asarray(y)[inner]).max() > 0.1


@pytest.fixture(scope="module")
def vgg16_state_dict():
    torch.manual_seed(0)
    return torch_numpy(torchvision.models.vgg16(weights=None))


@pytest.mark.parametrize("name", ["fcn8s_vgg16", "deeplabv1_largefov_vgg16"])
def test_backbone_import_from_torchvision_vgg16(name, vgg16_state_dict):
    sd = vgg16_state_dict
    target = model_shapes(models.create(name, num_classes=21))
    variables = load_backbone(name, target, sd)
    backbone = variables["params"]["backbone"]
    np.testing.assert_array_equal(backbone["conv1_1"]["kernel"], sd["features.0.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(backbone["conv3_3"]["bias"], sd["features.14.bias"])
    np.testing.assert_array_equal(backbone["conv5_3"]["kernel"], sd["features.28.weight"].transpose(2, 3, 1, 0))
    if name.startswith("fcn"):
        assert backbone["fc6"]["kernel"].shape == (7, 7, 512, 4096)
        some = [0, 1, 2049, 4095]  # exact on a few filters (the full 100M-entry compare costs ~1 min on CI)
        fc6 = sd["classifier.0.weight"][some].reshape(len(some), 512, 7, 7).transpose(2, 3, 1, 0)
        np.testing.assert_array_equal(backbone["fc6"]["kernel"][..., some], fc6)
        np.testing.assert_array_equal(backbone["fc6"]["bias"], sd["classifier.0.bias"])
        np.testing.assert_array_equal(backbone["fc7"]["kernel"][0, 0], sd["classifier.3.weight"].T)
        np.testing.assert_array_equal(backbone["fc7"]["bias"], sd["classifier.3.bias"])
        # All of fc6: as a conv on a 7x7 pool5 it is VGG's Linear on torch's (C, H, W) flattening.
        pool5 = np.random.RandomState(0).randn(7, 7, 512).astype(np.float32)
        linear = sd["classifier.0.weight"] @ pool5.transpose(2, 0, 1).reshape(-1)
        np.testing.assert_allclose(np.einsum("hwc,hwco->o", pool5, backbone["fc6"]["kernel"]), linear,
                                   rtol=1e-4, atol=1e-4)
    else:  # LargeFOV's fc6/fc7 have other shapes: heads keep their initialisation
        assert isinstance(variables["params"]["fc6"]["kernel"], jax.ShapeDtypeStruct)
        with pytest.raises(SegjaxError, match="unexpected"):  # a vgg16_bn checkpoint has BatchNorm keys
            load_backbone(name, target, {**sd, "features.1.weight": np.ones(64, np.float32)})


def test_deeplab_largefov_forward_and_dropout():
    model = models.create("deeplabv1_largefov_vgg16", num_classes=4)
    x = jnp.asarray(np.random.RandomState(0).randn(1, 33, 47, 3).astype(np.float32))
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
    apply = jax.jit(lambda v, x, key: (model.apply(v, x, train=False)["out"],
                                       model.apply(v, x, train=True, rngs={"dropout": key})["out"]))
    eval_out, train_a = apply(variables, x, jax.random.PRNGKey(1))
    _, train_b = apply(variables, x, jax.random.PRNGKey(2))
    assert eval_out.shape == (1, 33, 47, 4) and bool(jnp.isfinite(eval_out).all())
    assert float(jnp.abs(eval_out).max()) > 0
    assert not np.allclose(train_a, train_b)  # dropout is live in training, keyed by the "dropout" stream
