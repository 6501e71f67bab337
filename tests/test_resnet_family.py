"""ResNet, FCN and DeepLab v2/v3/v3+ against torchvision (random weights, converted with from_torch).

Parity: eval logits (and aux) and train-mode logits + updated BN running statistics, at an odd size,
fp32, within 1e-4 relative L2: every family at reduced depth (torchvision's ResNet class with fewer blocks
per stage), DeepLab v3-ResNet-50 at full depth; every full-depth size against torchvision's. Where torchvision lacks the model (DeepLab v2, v3+), output shapes,
output strides and parameter counts worked out here from the papers' layer tables.
"""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.segmentation.deeplabv3 import DeepLabHead
from torchvision.models.segmentation.fcn import FCNHead

from segjax import checkpoint, cli, convert, models
from segjax.models import resnet as resnet_module
from segjax.errors import SegjaxError
from tests.parity import rel_l2

H, W = 97, 131  # odd on purpose
NUM_CLASSES = 5
TORCHVISION_CLASSES = 21  # the published parameter counts are for VOC's 21 classes
TOL = 1e-4


def n_params(variables) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(variables["params"]))


def to_nhwc(t):
    return t.detach().permute(0, 2, 3, 1).numpy() if t.ndim == 4 else t.detach().numpy()


def state_dict_numpy(module) -> dict:
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def randomise_batchnorm_and_disable_dropout(module, seed=0):
    """Default BN (mean 0, var 1, weight 1, bias 0) would hide a mixed-up statistic; dropout p=0 makes
    train mode deterministic (our side runs with dropout_rate=0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.2, 0.2, generator=g)
            elif isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        # Residual branches end in a small gain, as in trained ResNets (cf. zero_init_residual): with
        # gains ~1 a train-mode BN net at random init amplifies rounding ~3x per stage (ResNet-101
        # train logits then differ by ~1e-4 between any two fp32 implementations).
        for m in module.modules():
            if isinstance(m, torchvision.models.resnet.Bottleneck):
                m.bn3.weight.uniform_(0.2, 0.5, generator=g)
            elif isinstance(m, torchvision.models.resnet.BasicBlock):
                m.bn2.weight.uniform_(0.2, 0.5, generator=g)
    return module


@pytest.fixture(scope="module")
def images():
    # Batch 2: torchvision's ASPP pooling BN cannot train on one value per channel.
    return np.random.default_rng(0).standard_normal((2, H, W, 3)).astype(np.float32)


# Reduced depth: torchvision's own ResNet class with fewer blocks per stage against ours with the same
# stage sizes (segjax.models.resnet.STAGE_SIZES patched for the build). Same module code as the full-depth
# networks; two blocks in each dilated stage, so both the first block's (previous) dilation and the
# others' (new) dilation are compared. Full depth: one parity run (deeplabv3_resnet50, slow) and every
# full-depth parameter count against torchvision's (jax.eval_shape, no FLOPs).
REDUCED = (1, 1, 2, 2)


def tv_resnet(block, dilate=(False, False, False)):
    return torchvision.models.resnet.ResNet(block, list(REDUCED), replace_stride_with_dilation=list(dilate))


def tv_segmentation(kind, dilate, rates=(12, 24, 36)):
    backbone = IntermediateLayerGetter(tv_resnet(torchvision.models.resnet.Bottleneck, dilate),
                                       {"layer4": "out", "layer3": "aux"})
    head = FCNHead(2048, TORCHVISION_CLASSES) if kind == "fcn" else DeepLabHead(2048, TORCHVISION_CLASSES, rates)
    wrapper = torchvision.models.segmentation.FCN if kind == "fcn" else torchvision.models.segmentation.DeepLabV3
    return wrapper(backbone, head, FCNHead(1024, TORCHVISION_CLASSES))


# name -> (torchvision model, our model name, our extra kwargs, stage sizes of ours or None for full depth)
TORCHVISION = {
    "deeplabv3_resnet50": (lambda: torchvision.models.segmentation.deeplabv3_resnet50(
        weights=None, weights_backbone=None, num_classes=TORCHVISION_CLASSES, aux_loss=True),
        "deeplabv3_resnet50", {}, None),
    "fcn_resnet@1122": (lambda: tv_segmentation("fcn", (False, True, True)), "fcn_resnet50", {}, REDUCED),
    "deeplabv3_resnet@1122": (lambda: tv_segmentation("deeplabv3", (False, True, True)),
                              "deeplabv3_resnet50", {}, REDUCED),
    # Output stride 16: only layer4 dilated (its first block keeps dilation 1), ASPP rates 6/12/18.
    "deeplabv3_resnet@1122_os16": (lambda: tv_segmentation("deeplabv3", (False, False, True), (6, 12, 18)),
                                   "deeplabv3_resnet50", {"output_stride": 16}, REDUCED),
    "resnet_bottleneck@1122": (lambda: tv_resnet(torchvision.models.resnet.Bottleneck), "resnet50", {}, REDUCED),
    "resnet_basicblock@1122": (lambda: tv_resnet(torchvision.models.resnet.BasicBlock), "resnet18", {}, REDUCED),
}
# torchvision's published sizes (with aux where the model has one; classifiers with their 1000-way fc),
# of the full-depth networks; ours are counted by jax.eval_shape.
TORCHVISION_PARAMS = {"fcn_resnet50": 35_322_218, "fcn_resnet101": 54_314_346, "deeplabv3_resnet50": 42_004_074,
                      "deeplabv3_resnet101": 60_996_202, "resnet50": 25_557_032, "resnet18": 11_689_512}


@functools.lru_cache(maxsize=None)
def parity_run(key: str, images_bytes: bytes):
    """Builds the torchvision model once, converts it, runs eval + train on both sides.

    Returns the measured errors and (for reuse by other tests) our variables, eval logits and the
    torch state_dict. Cached so each network is built and compiled once per session.
    """
    make_reference, name, extra, stage_sizes = TORCHVISION[key]
    with pytest.MonkeyPatch.context() as patch:
        if stage_sizes is not None:
            depth = int(name.rsplit("resnet", 1)[1])
            patch.setitem(resnet_module.STAGE_SIZES, depth, stage_sizes)
        return _parity_run(make_reference, name, extra, images_bytes)


def _parity_run(make_reference, name, extra, images_bytes):
    images = np.frombuffer(images_bytes, np.float32).reshape(2, H, W, 3)
    torch.manual_seed(0)
    ref_model = randomise_batchnorm_and_disable_dropout(make_reference())
    state_dict = state_dict_numpy(ref_model)
    segmentation = not name.startswith("resnet")
    kw = {"dropout_rate": 0.0, **extra} if segmentation else {}
    variables = convert.from_torch(name, state_dict, **kw)
    model = models.create(name, **convert.layout_for(name).infer_kwargs(state_dict), **kw)
    # The reference runs in float64, so the measured error is ours alone (not torch's fp32 rounding too).
    ref_model = ref_model.double()
    x_torch = torch.from_numpy(images.astype(np.float64)).permute(0, 3, 1, 2)

    def as_dict(out):
        return out if isinstance(out, dict) else {"out": out}

    ref_model.eval()
    with torch.no_grad():
        ref_eval = {k: to_nhwc(v) for k, v in as_dict(ref_model(x_torch)).items()}
    ours_eval = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)

    ref_model.train()
    with torch.no_grad():
        ref_train = {k: to_nhwc(v) for k, v in as_dict(ref_model(x_torch)).items()}
    ref_stats = convert.from_torch(name, state_dict_numpy(ref_model), **kw)["batch_stats"]
    ours_train, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
        variables, images)

    errors = {}
    for key in ref_eval:
        assert ours_eval[key].shape == ref_eval[key].shape
        errors[f"eval/{key}"] = rel_l2(ours_eval[key], ref_eval[key])
        errors[f"train/{key}"] = rel_l2(ours_train[key], ref_train[key])
    ours_stats = jax.tree_util.tree_leaves_with_path(updates["batch_stats"])
    ref_stats_flat = dict(jax.tree_util.tree_leaves_with_path(ref_stats))
    assert len(ours_stats) == len(ref_stats_flat)
    errors["train/batch_stats(max)"] = max(rel_l2(v, ref_stats_flat[p]) for p, v in ours_stats)
    # The updated statistics must differ from the starting ones, or the comparison proves nothing.
    start = dict(jax.tree_util.tree_leaves_with_path(variables["batch_stats"]))
    assert min(rel_l2(v, start[p]) for p, v in ours_stats) > 1e-3
    return {"errors": errors, "variables": variables, "eval": ours_eval, "model_kw": kw,
            "state_dict": state_dict, "params": n_params(variables),
            "reference_params": sum(int(np.prod(v.shape)) for k, v in state_dict.items()
                                    if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))}


def _check_parity(key, images):
    run = parity_run(key, images.tobytes())
    print(key, {k: f"{v:.2e}" for k, v in run["errors"].items()}, f"params={run['params']:,}")
    expected_keys = {"eval/out", "train/out", "train/batch_stats(max)"}
    if not key.startswith("resnet"):
        expected_keys |= {"eval/aux", "train/aux"}
    assert set(run["errors"]) == expected_keys
    for name, err in run["errors"].items():
        assert err < TOL, f"{key} {name}: relative L2 {err:.2e}"
    assert run["params"] == run["reference_params"]
    return run


@pytest.mark.parametrize("key", [pytest.param(k, marks=pytest.mark.slow) if k.endswith("_os16") else k
                                 for k in TORCHVISION if "@" in k])  # output stride 16: the os8 case's code
def test_reduced_depth_matches_torchvision(key, images):
    _check_parity(key, images)


@pytest.mark.slow
def test_full_depth_deeplabv3_resnet50_matches_torchvision(images):
    run = _check_parity("deeplabv3_resnet50", images)
    assert run["params"] == TORCHVISION_PARAMS["deeplabv3_resnet50"]


@pytest.mark.parametrize("name", sorted(TORCHVISION_PARAMS))
def test_full_depth_parameter_counts_match_torchvision(name):
    kw = {"num_classes": 1000} if name.startswith("resnet") else {"num_classes": TORCHVISION_CLASSES, "aux": True}
    assert model_params(name, **kw) == TORCHVISION_PARAMS[name]


# ------------------------------------------------------------- parameter counts from the papers' tables

def conv(cin, cout, k, bias=False):
    return cin * cout * k * k + (cout if bias else 0)


def bn(c):
    return 2 * c  # scale + bias (running statistics are not parameters)


def resnet_bottleneck_params(blocks_per_stage):
    """He et al. 2016, Table 1: 7x7/64 stem, stages of [1x1 w, 3x3 w, 1x1 4w] with w = 64..512; the
    first block of each stage has a 1x1 projection shortcut (+BN)."""
    total, cin = conv(3, 64, 7) + bn(64), 64
    for width, blocks in zip((64, 128, 256, 512), blocks_per_stage):
        cout = 4 * width
        for i in range(blocks):
            total += conv(cin, width, 1) + bn(width) + conv(width, width, 3) + bn(width) + conv(width, cout, 1) + bn(cout)
            if i == 0:
                total += conv(cin, cout, 1) + bn(cout)
            cin = cout
    return total


def aspp_params(cin, branches_3x3=3, width=256):
    """DeepLab v3 ASPP: 1x1 branch, 3x3 atrous branches, image-pooling 1x1 branch, 1x1 projection (all + BN)."""
    per_branch = [conv(cin, width, 1)] + [conv(cin, width, 3)] * branches_3x3 + [conv(cin, width, 1)]
    return sum(p + bn(width) for p in per_branch) + conv(width * len(per_branch), width, 1) + bn(width)


def fcn_head_params(cin, classes):
    return conv(cin, cin // 4, 3) + bn(cin // 4) + conv(cin // 4, classes, 1, bias=True)


def test_paper_table_counts_agree_with_torchvision_published_sizes():
    # Checks the table arithmetic itself against independently published numbers.
    assert resnet_bottleneck_params((3, 4, 6, 3)) + 2048 * 1000 + 1000 == 25_557_032  # torchvision resnet50
    assert resnet_bottleneck_params((3, 4, 23, 3)) + 2048 * 1000 + 1000 == 44_549_160  # torchvision resnet101
    deeplabv3 = resnet_bottleneck_params((3, 4, 6, 3)) + aspp_params(2048) + conv(256, 256, 3) + bn(256) \
        + conv(256, 21, 1, bias=True) + fcn_head_params(1024, 21)
    assert deeplabv3 == 42_004_074


def model_params(name, **kw):
    model = models.create(name, **kw)
    shapes = convert.model_shapes(model, image_size=33)
    return n_params(shapes)


@pytest.mark.parametrize("depth,blocks", [(50, (3, 4, 6, 3)), (101, (3, 4, 23, 3))])
@pytest.mark.parametrize("aux", [False, True])
def test_deeplabv3plus_parameter_count(depth, blocks, aux):
    # Chen et al. 2018: ASPP encoder; decoder = 1x1/48 (+BN) on low-level features, two 3x3/256 (+BN), 1x1 classes.
    expected = resnet_bottleneck_params(blocks) + aspp_params(2048) + conv(256, 48, 1) + bn(48) \
        + conv(256 + 48, 256, 3) + bn(256) + conv(256, 256, 3) + bn(256) + conv(256, NUM_CLASSES, 1, bias=True)
    if aux:
        expected += fcn_head_params(1024, NUM_CLASSES)
    assert model_params(f"deeplabv3plus_resnet{depth}", num_classes=NUM_CLASSES, aux=aux) == expected


def test_deeplabv2_parameter_count():
    # Chen et al. 2017 (TPAMI), ASPP-L: four 3x3 convs with bias, 2048 -> classes, at rates 6/12/18/24.
    expected = resnet_bottleneck_params((3, 4, 23, 3)) + 4 * conv(2048, NUM_CLASSES, 3, bias=True)
    assert model_params("deeplabv2_resnet101", num_classes=NUM_CLASSES) == expected


# ------------------------------------------------------------- shapes and output strides (no FLOPs: eval_shape)

def ceil_halvings(n, times):
    for _ in range(times):
        n = -(-n // 2)
    return n


def backbone_feature_shapes(name, size, **kw):
    model = models.create(name, num_classes=NUM_CLASSES, **kw)
    x = jax.ShapeDtypeStruct((1, *size, 3), jnp.float32)

    def run(x):
        variables = model.init(jax.random.PRNGKey(0), x)
        out, state = model.apply(variables, x, capture_intermediates=lambda m, _: m.name == "backbone",
                                 mutable=["intermediates"])
        return out, state["intermediates"]["backbone"]["__call__"][0]

    return jax.eval_shape(run, x)


@pytest.mark.parametrize("name,kw,output_stride", [
    ("deeplabv3plus_resnet50", {}, 16), ("deeplabv3plus_resnet101", {"output_stride": 8}, 8),
    ("deeplabv2_resnet101", {}, 8), ("deeplabv3_resnet50", {"output_stride": 16}, 16),
    ("deeplabv3_resnet50", {}, 8), ("fcn_resnet50", {}, 8)])
@pytest.mark.parametrize("size", [(97, 131), (65, 33)])
def test_output_shape_and_stride(name, kw, output_stride, size):
    out, features = backbone_feature_shapes(name, size, **kw)
    assert out["out"].shape == (1, *size, NUM_CLASSES)
    halvings = int(np.log2(output_stride))
    assert features["layer4"].shape[1:3] == tuple(ceil_halvings(s, halvings) for s in size)
    assert features["layer1"].shape[1:3] == tuple(ceil_halvings(s, 2) for s in size)  # v3+ low-level: stride 4


def test_bad_output_stride_is_a_segjax_error():
    with pytest.raises(SegjaxError, match="output_stride=32"):
        models.create("deeplabv3_resnet50", num_classes=3, output_stride=32)


# ------------------------------------------------------------- dtype, axis_name, backbone import, CLI

@pytest.mark.slow
def test_bfloat16_compute_close_to_float32(images):
    run = parity_run("deeplabv3_resnet50", images.tobytes())
    model = models.create("deeplabv3_resnet50", num_classes=TORCHVISION_CLASSES, aux=True, dtype=jnp.bfloat16)
    out = jax.jit(lambda v, x: model.apply(v, x, train=False))(run["variables"], images)
    assert out["out"].dtype == jnp.bfloat16
    assert jax.tree_util.tree_leaves(run["variables"]["params"])[0].dtype == np.float32
    for key in ("out", "aux"):
        logits = np.asarray(out[key], np.float32)
        assert np.isfinite(logits).all()
        err = rel_l2(logits, run["eval"][key])
        print(f"bf16 vs fp32 {key}: rel L2 {err:.3e}")
        assert err < 0.1


@pytest.mark.slow  # full-width DeepLab v3+ at reduced depth, compiled three ways
def test_axis_name_batch_statistics_across_replicas(monkeypatch):
    """Two replicas of one image each under vmap(axis_name) == one batch of two without it (at reduced depth:
    every BatchNorm of the network takes the axis, however many blocks there are)."""
    monkeypatch.setitem(resnet_module.STAGE_SIZES, 50, REDUCED)
    size = (33, 47)
    kw = dict(num_classes=NUM_CLASSES, aux=True, dropout_rate=0.0)
    plain = models.create("deeplabv3plus_resnet50", **kw)
    mapped = models.create("deeplabv3plus_resnet50", axis_name="batch", **kw)
    x = np.random.default_rng(1).standard_normal((2, *size, 3)).astype(np.float32)
    variables = jax.jit(plain.init)(jax.random.PRNGKey(0), x[:1])

    ref, ref_state = jax.jit(lambda v, x: plain.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)

    def replica(v, xi):
        return mapped.apply(v, xi, train=True, mutable=["batch_stats"])

    out, state = jax.jit(jax.vmap(replica, in_axes=(None, 0), axis_name="batch"))(variables, x[:, None])
    # Same maths, different float32 reduction order (per replica, then pmean), amplified through a
    # freshly initialised train-mode BN net: 1e-3 here; the control below differs by O(1).
    for key in ("out", "aux"):
        assert rel_l2(out[key][:, 0], ref[key]) < 1e-3
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(state["batch_stats"]),
                                 jax.tree_util.tree_leaves(ref_state["batch_stats"])):
        np.testing.assert_allclose(got[0], got[1], err_msg=str(path))  # replicas agree
        assert rel_l2(got[0], want) < 1e-3, path
    # Without the axis each replica would normalise its own single image: a real difference.
    single = jax.jit(lambda v, x: plain.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x[:1])[0]
    assert rel_l2(single["out"], ref["out"][:1]) > 0.1


@pytest.mark.slow
def test_backbone_only_import_from_resnet50_classifier(images):
    run = parity_run("deeplabv3_resnet50", images.tobytes())
    torch.manual_seed(3)
    imagenet = state_dict_numpy(randomise_batchnorm_and_disable_dropout(torchvision.models.resnet50(weights=None), 3))
    loaded = convert.load_backbone("deeplabv3_resnet50", run["variables"], imagenet)
    backbone = loaded["params"]["backbone"]
    np.testing.assert_array_equal(backbone["layer3"]["5"]["conv2"]["kernel"],
                                  imagenet["layer3.5.conv2.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(backbone["layer2"]["0"]["downsample"]["1"]["scale"],
                                  imagenet["layer2.0.downsample.1.weight"])
    np.testing.assert_array_equal(loaded["batch_stats"]["backbone"]["bn1"]["var"], imagenet["bn1.running_var"])
    for part in ("classifier", "aux_classifier"):  # heads untouched
        for a, b in zip(jax.tree_util.tree_leaves(loaded["params"][part]),
                        jax.tree_util.tree_leaves(run["variables"]["params"][part])):
            np.testing.assert_array_equal(a, b)
    # A resnet101 state_dict does not fit a resnet50 backbone: one error naming what is wrong.
    imagenet["layer3.6.conv1.weight"] = imagenet["layer3.5.conv1.weight"]
    with pytest.raises(SegjaxError, match="unexpected 1: layer3/6/conv1/kernel"):
        convert.load_backbone("deeplabv3_resnet50", run["variables"], imagenet)


@pytest.mark.slow
def test_cli_convert_writes_a_checkpoint_that_reads_back(images, tmp_path, capsys):
    run = parity_run("deeplabv3_resnet50", images.tobytes())
    weights = tmp_path / "deeplabv3.pth"
    torch.save({k: torch.from_numpy(v) for k, v in run["state_dict"].items()}, weights)
    out_dir = tmp_path / "converted"
    assert cli.main(["convert", "deeplabv3_resnet50", str(weights), str(out_dir)]) == 0
    assert "42,004,074 parameters" in capsys.readouterr().out
    variables, meta = checkpoint.load_variables(str(out_dir))
    assert meta["model"] == "deeplabv3_resnet50"
    assert meta["model_kwargs"] == {"num_classes": TORCHVISION_CLASSES, "aux": True}
    want = jax.tree_util.tree_leaves_with_path(convert.from_torch("deeplabv3_resnet50", run["state_dict"]))
    got = dict(jax.tree_util.tree_leaves_with_path(variables))
    assert len(got) == len(want)
    for path, value in want:
        np.testing.assert_array_equal(np.asarray(got[path]), value)
    assert os.path.isfile(out_dir / "segjax.json")


@pytest.mark.parametrize("name,count", [("resnet18", 11_689_512), ("resnet34", 21_797_672),
                                        ("resnet101", 44_549_160), ("resnet152", 60_192_808)])
def test_classifier_parameter_counts_match_torchvision(name, count):
    assert model_params(name, num_classes=1000) == count
