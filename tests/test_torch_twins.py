"""tests/torch_reference.py's twins (experiments/benchmark.py's PyTorch side where torchvision has no such
model): each has segjax's parameter count, and with the same (converted) weights gives segjax's outputs at an
odd H, W: UNet (both upsamplers, eval and train mode), U2-Netp, DeepLab v3+ and FCN-8s (whose VGG body and
fc6/fc7 the FCN-16s and FCN-32s twins share; their heads are compared by size)."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch_reference

from segjax import analysis, convert, models
from segjax.nn import bilinear_upsample_kernel
from tests.parity import FCN_MEAN_BGR, caffe_input, our_input, rel_l2, randomise_batch_norm

H, W = 67, 75


def segjax_param_count(name, **kw):
    model = models.create(name, **kw)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, H, W, 3)), train=False))
    return analysis.param_count(shapes)


def twin_param_count(twin):
    return sum(p.numel() for p in twin.parameters())


@pytest.mark.parametrize("name, kw", [("deeplabv3plus_resnet50", {}), ("deeplabv3plus_resnet50", dict(aux=True)),
                                      ("deeplabv3plus_resnet50", dict(decoder_convs=1, low_level_first=True,
                                                                      align_corners=True)),
                                      ("fcn8s_vgg16", {})])
def test_twin_matches_segjax(name, kw):
    twin = getattr(torch_reference, name)(num_classes=3, **kw).eval()
    assert twin_param_count(twin) == segjax_param_count(name, num_classes=3, **kw)
    with torch.no_grad():
        out = twin(torch.randn(1, 3, H, W))
    assert out["out"].shape == (1, 3, H, W)
    assert ("aux" in out) == bool(kw.get("aux")) and out.get("aux", out["out"]).shape == (1, 3, H, W)
    assert torch.isfinite(out["out"]).all()


@pytest.mark.parametrize("name", ["fcn32s_vgg16", "fcn16s_vgg16"])
def test_fcn_vgg_heads_match_segjax(name):
    """The other two strides differ only in their score and upsampling layers: compare those alone
    (the shared VGG16 body and fc6/fc7 are counted by the fcn8s test above)."""
    twin = getattr(torch_reference, name)(num_classes=2)
    head = sum(p.numel() for n, p in twin.named_parameters() if n.startswith(("score", "upscore")))
    model = models.create(name, num_classes=2)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 5, 7, 3)), train=False))
    params = {k: v for k, v in shapes["params"].items() if k != "backbone"}
    assert head == analysis.param_count(params) > 0
    assert twin_param_count(twin) == analysis.param_count(shapes)


def test_deeplabv3plus_twin_refuses_what_it_cannot_build():
    with pytest.raises(NotImplementedError, match="multi_grid"):
        torch_reference.deeplabv3plus_resnet50(num_classes=2, multi_grid=(1, 2, 4))


def test_fcn_upsamplers_start_bilinear_as_segjax():
    """The twin's ConvTranspose2d weights (in, out, k, k) are segjax's kernels (k, k, out, in) transposed,
    and the scoring layers start at zero (so the untrained net outputs zeros)."""
    twin = torch_reference.fcn8s_vgg16(num_classes=2)
    for layer, k in (("upscore2", 4), ("upscore_pool4", 4), ("upscore8", 16)):
        weight = getattr(twin, layer).weight.detach().numpy()
        np.testing.assert_array_equal(weight, bilinear_upsample_kernel(k, 2).transpose(3, 2, 0, 1))
    assert all(not p.any() for n, p in twin.named_parameters() if n.startswith("score"))


# ------------------------------------------------------------------ outputs with converted weights

def twin_unet_key_to_milesial(key: str) -> str:
    """The UNet twin's state_dict keys in milesial/Pytorch-UNet's layout, which `from_torch("unet")` reads."""
    rules = ((r"^inc\.(\d+)\.", lambda m: f"inc.double_conv.{m[1]}."),
             (r"^downs\.(\d+)\.(\d+)\.", lambda m: f"down{int(m[1]) + 1}.maxpool_conv.1.double_conv.{m[2]}."),
             (r"^ups\.(\d+)\.up\.", lambda m: f"up{int(m[1]) + 1}.up."),
             (r"^ups\.(\d+)\.conv\.(\d+)\.", lambda m: f"up{int(m[1]) + 1}.conv.double_conv.{m[2]}."),
             (r"^outc\.", lambda m: "outc.conv."))
    for pattern, replace in rules:
        renamed = re.sub(pattern, replace, key)
        if renamed != key:
            return renamed
    raise KeyError(key)


@pytest.mark.parametrize("kw", [dict(bilinear=True, base_channels=8), dict(bilinear=False, base_channels=8)])
def test_unet_twin_gives_segjax_logits_with_the_same_weights(kw):
    """The benchmark's PyTorch UNet (tests/torch_reference.py) computes what segjax's unet computes: its own
    random weights (BatchNorm statistics away from the defaults), converted through milesial's layout, give
    the same eval and train-mode logits at an odd size."""
    torch.manual_seed(0)
    twin = torch_reference.unet(num_classes=3, **kw)
    randomise_batch_norm(twin)
    twin.eval()
    state_dict = {twin_unet_key_to_milesial(k): v.detach().numpy().copy() for k, v in twin.state_dict().items()}
    variables = convert.from_torch("unet", state_dict)
    model = models.create("unet", num_classes=3, **kw)
    x = np.random.default_rng(1).standard_normal((2, 37, 45, 3)).astype(np.float32)
    ours = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)["out"]
    with torch.no_grad():
        ref = twin(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))["out"].numpy().transpose(0, 2, 3, 1)
    assert ours.shape == ref.shape == (2, 37, 45, 3)
    err = rel_l2(ours, ref)
    # train mode too (batch statistics), as the benchmark's train step runs it
    twin.train()
    with torch.no_grad():
        ref_train = twin(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))["out"].numpy().transpose(0, 2, 3, 1)
    ours_train = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])[0])(variables, x)["out"]
    train_err = rel_l2(ours_train, ref_train)
    print("unet twin", kw, f"eval / train logits rel L2 {err:.2e} / {train_err:.2e}")
    assert err < 1e-4 and train_err < 1e-4
    assert rel_l2(ours, ref_train) > 1e-2  # train and eval differ: the comparison has teeth


def twin_u2net_key_to_original(key: str) -> str:
    """The U2-Net twin's keys in U-2-Net's own layout (stageN / stageNd of rebnconv{in,k,kd} with conv_s1 and
    bn_s1, sideN, outconv), which `from_torch("u2net")` reads."""
    encoder_heights, decoder_heights = (7, 6, 5, 4, 4, 4), (4, 4, 5, 6, 7)  # the decoder from stage5d down
    found = re.match(r"^(encoder|decoder)\.(\d+)\.(conv_in|enc\.(\d+)|dec\.(\d+))\.(\d)\.(.+)$", key)
    if found is None:
        side = re.match(r"^sides\.(\d+)\.(.+)$", key)
        if side:
            return f"side{int(side[1]) + 1}.{side[2]}"
        if key.startswith("outconv."):
            return key
        raise KeyError(key)
    part, index, block, enc, dec, layer, leaf = found.groups()
    index = int(index)
    stage = f"stage{index + 1}" if part == "encoder" else f"stage{5 - index}d"
    height = (encoder_heights if part == "encoder" else decoder_heights)[index]
    conv = ("rebnconvin" if block == "conv_in" else f"rebnconv{int(enc) + 1}" if enc is not None
            else f"rebnconv{height - 1 - int(dec)}d")
    return f"{stage}.{conv}.{'conv_s1' if layer == '0' else 'bn_s1'}.{leaf}"


@pytest.mark.parametrize("name", ["u2netp"])
def test_u2net_twin_gives_segjax_outputs_with_the_same_weights(name):
    """The benchmark's PyTorch U2-Net (u2net: the same RSUs, wider) computes segjax's fused output and side
    outputs, eval mode, with its own weights converted through U-2-Net's key layout."""
    torch.manual_seed(0)
    twin = getattr(torch_reference, name)(num_classes=1)
    randomise_batch_norm(twin)
    twin.eval()
    state_dict = {twin_u2net_key_to_original(k): v.detach().numpy().copy() for k, v in twin.state_dict().items()}
    variables = convert.from_torch(name, state_dict)
    model = models.create(name, 1)
    x = np.random.default_rng(2).standard_normal((1, 37, 45, 3)).astype(np.float32)
    ours = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    with torch.no_grad():
        ref = twin(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
    nhwc = lambda t: t.numpy().transpose(0, 2, 3, 1)  # noqa: E731
    errors = [rel_l2(ours["out"], nhwc(ref["out"]))] + [rel_l2(a, nhwc(b)) for a, b in zip(ours["sides"], ref["sides"],
                                                                                          strict=True)]
    print(name, "twin eval rel L2 (fused, sides)", [f"{e:.1e}" for e in errors])
    assert len(errors) == 7 and max(errors) < 1e-4


def twin_deeplabv3plus_key_to_segjax(key: str) -> str:
    """The DeepLab v3+ twin's keys in segjax's own layout (torchvision's backbone names; the head as segjax
    names it), which `from_torch("deeplabv3plus_resnet50")` reads with its generic rule."""
    rules = ((r"^stem\.0\.", "backbone.conv1."), (r"^stem\.1\.", "backbone.bn1."), (r"^(layer\d)\.", r"backbone.\1."),
             (r"^aspp\.branches\.(\d)\.", r"classifier.aspp.convs.\1."),
             (r"^aspp\.image_pool\.0\.", "classifier.aspp.convs.4.1."), (r"^aspp\.image_pool\.1\.", "classifier.aspp.convs.4.2."),
             (r"^aspp\.project\.", "classifier.aspp.project."), (r"^low_project\.", "classifier.project."),
             (r"^decoder\.(\d)\.", r"classifier.decoder_\1."), (r"^logits\.", "classifier.logits."),
             (r"^aux\.0\.", "aux_classifier."), (r"^aux\.2\.", "aux_classifier.4."))
    for pattern, replace in rules:
        renamed = re.sub(pattern, replace, key)
        if renamed != key:
            return renamed
    raise KeyError(key)


@pytest.mark.slow  # a full ResNet-50
def test_deeplabv3plus_twin_gives_segjax_logits_with_the_same_weights():
    """The benchmark's PyTorch DeepLab v3+ (aux) computes segjax's logits and aux logits, eval mode, with its
    own weights converted."""
    torch.manual_seed(0)
    twin = torch_reference.deeplabv3plus_resnet50(num_classes=3, aux=True)
    randomise_batch_norm(twin)
    twin.eval()
    state_dict = {twin_deeplabv3plus_key_to_segjax(k): v.detach().numpy().copy() for k, v in twin.state_dict().items()}
    variables = convert.from_torch("deeplabv3plus_resnet50", state_dict)
    model = models.create("deeplabv3plus_resnet50", num_classes=3, aux=True)
    x = np.random.default_rng(3).standard_normal((1, H, W, 3)).astype(np.float32)
    ours = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    with torch.no_grad():
        ref = twin(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
    for key in ("out", "aux"):
        err = rel_l2(ours[key], ref[key].numpy().transpose(0, 2, 3, 1))
        print("deeplabv3plus_resnet50 twin", key, f"eval rel L2 {err:.2e}")
        assert err < 1e-4


def twin_fcn_key_to_wkentaro(key: str) -> str:
    """The FCN-VGG16 twin's keys in wkentaro/pytorch-fcn's layout (conv1_1 ... conv5_3, fc6, fc7, score_*,
    upscore*), which `convert_state_dict("fcn8s_vgg16")` reads."""
    stage = re.match(r"^stages\.(\d)\.(\d+)\.(weight|bias)$", key)
    if stage:
        return f"conv{int(stage[1]) + 1}_{int(stage[2]) // 2 + 1}.{stage[3]}"
    return re.sub(r"^fc\.0\.", "fc6.", re.sub(r"^fc\.3\.", "fc7.", key))


@pytest.mark.slow  # full-width FCN-8s, both sides
def test_fcn8s_twin_gives_segjax_logits_with_the_same_weights():
    """The benchmark's PyTorch FCN-8s (caffe geometry: pad 100, ceil pools, fixed crops) computes what segjax's
    fcn8s_vgg16 computes: its weights, score layers drawn away from their zero start, converted through
    wkentaro's layout (BGR, caffe mean folded into the card), give the same logits at an odd size."""
    torch.manual_seed(0)
    twin = torch_reference.fcn8s_vgg16(num_classes=3).eval()
    with torch.no_grad():
        for name, p in twin.named_parameters():
            if name.startswith("score"):
                p.normal_(0, 0.01)
    state_dict = {twin_fcn_key_to_wkentaro(k): v.detach().numpy().copy() for k, v in twin.state_dict().items()}
    variables, meta = convert.convert_state_dict("fcn8s_vgg16", state_dict)
    assert meta["layout"] == "wkentaro/pytorch-fcn"
    image = np.random.RandomState(2).randint(0, 256, (23, 29, 3)).astype(np.float32)
    with torch.no_grad():
        ref = twin(caffe_input(image, FCN_MEAN_BGR))["out"].numpy().transpose(0, 2, 3, 1)
    model = models.create("fcn8s_vgg16", **meta["model_kwargs"])
    ours = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, our_input(image, meta))["out"]
    assert ours.shape == ref.shape == (1, 23, 29, 3)
    err = rel_l2(ours, ref)
    print(f"fcn8s twin: eval logits rel L2 {err:.2e}")
    assert err < 1e-4 and np.abs(ref).max() > 1e-3  # logits away from zero: the comparison has teeth
