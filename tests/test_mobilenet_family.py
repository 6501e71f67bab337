"""MobileNetV3 family against torchvision: random torchvision weights converted with `from_torch`.

Each parity test jits one function that runs the model in eval mode and in train mode, and compares
eval logits, train logits and the BatchNorm running-statistic updates with torchvision's, at an odd
input size (97x131) so every stride-2 conv and every resize sees odd shapes.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

from segjax import analysis, models
from segjax.convert import from_torch, layout_for, load_backbone, model_shapes, torch_to_flax
from segjax.errors import SegjaxError
from segjax.models.mobilenetv3 import MobileNetV3Features
from tests.parity import rel_l2

H, W = 97, 131
RTOL = 1e-4


def randomize_batchnorm(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial affine parameters and running statistics, so a mis-mapped BN leaf shows up."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(0.5 + torch.rand(c, generator=g))
                m.bias.copy_(0.1 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))


def numpy_state_dict(model: torch.nn.Module) -> dict:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def count_params(model) -> int:
    return analysis.param_count(model_shapes(model))


def images(n=2, seed=0):
    return np.random.default_rng(seed).standard_normal((n, H, W, 3)).astype(np.float32)


def to_nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1) if t.ndim == 4 else t.detach().numpy()


def check_parity(name: str, torch_model: torch.nn.Module, keys=("out",), **kw) -> dict:
    """Converts torch_model's weights, then compares eval logits, train logits and BN running-stat updates."""
    randomize_batchnorm(torch_model)
    state_dict = numpy_state_dict(torch_model)
    variables = from_torch(name, state_dict, **kw)
    model = models.create(name, **{**layout_for(name).infer_kwargs(state_dict), **kw})
    x = images()

    @jax.jit
    def eval_and_train(variables, x):
        eval_out = model.apply(variables, x, train=False)
        train_out, updates = model.apply(variables, x, train=True, mutable=["batch_stats"],
                                         rngs={"dropout": jax.random.PRNGKey(0)})
        return eval_out, train_out, updates["batch_stats"]

    eval_out, train_out, new_stats = eval_and_train(variables, x)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    torch_model.eval()
    with torch.no_grad():
        ref_eval = torch_model(xt)
    torch_model.train()
    with torch.no_grad():
        ref_train = torch_model(xt)
    as_dict = lambda r: r if isinstance(r, dict) else {"out": r}  # noqa: E731
    ref_eval, ref_train = as_dict(ref_eval), as_dict(ref_train)

    errors = {}
    for key in keys:
        assert eval_out[key].shape == to_nhwc(ref_eval[key]).shape
        errors[f"eval/{key}"] = rel_l2(eval_out[key], to_nhwc(ref_eval[key]))
        errors[f"train/{key}"] = rel_l2(train_out[key], to_nhwc(ref_train[key]))
    # Running statistics: compare the update (new - old), so a wrong momentum cannot hide behind the old value.
    old = jax.tree.leaves(variables["batch_stats"])
    ref_new = jax.tree.leaves(torch_to_flax(numpy_state_dict(torch_model))["batch_stats"])
    ours_new = jax.tree.leaves(new_stats)
    assert len(old) == len(ref_new) == len(ours_new)
    ours_delta = np.concatenate([np.ravel(n - o) for n, o in zip(ours_new, old)])
    ref_delta = np.concatenate([np.ravel(n - o) for n, o in zip(ref_new, old)])
    errors["train/running_stats_update"] = rel_l2(ours_delta, ref_delta)
    print(name, {k: f"{v:.2e}" for k, v in errors.items()})
    assert max(errors.values()) < RTOL, errors
    return variables


@pytest.mark.slow
def test_mobilenet_v3_large_classifier_matches_torchvision():
    torch.manual_seed(0)
    ref = torchvision.models.mobilenet_v3_large(weights=None, dropout=0.0)
    ours = models.create("mobilenet_v3_large", 1000, dropout_rate=0.0)
    assert count_params(ours) == sum(p.numel() for p in ref.parameters()) == 5_483_032
    variables = check_parity("mobilenet_v3_large", ref, dropout_rate=0.0)
    assert variables["params"]["classifier"]["3"]["kernel"].shape == (1280, 1000)


def test_mobilenet_v3_small_matches_torchvision_and_unknown_arch_fails():
    torch.manual_seed(4)
    ref = torchvision.models.mobilenet_v3_small(weights=None, num_classes=10).eval()
    randomize_batchnorm(ref, seed=4)
    ours = models.create("mobilenet_v3_small", 10)
    assert count_params(ours) == sum(p.numel() for p in ref.parameters())
    variables = from_torch("mobilenet_v3_small", numpy_state_dict(ref))  # num_classes=10 read off the state_dict
    x = images(1, seed=5)[:, :45, :37]
    with torch.no_grad():
        expected = ref(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    assert rel_l2(jax.jit(ours.apply)(variables, x)["out"], expected) < RTOL
    with pytest.raises(SegjaxError, match="tiny"):
        count_params(MobileNetV3Features(arch="tiny"))


@pytest.mark.slow
def test_lraspp_mobilenet_v3_large_matches_torchvision():
    assert count_params(models.create("lraspp_mobilenet_v3_large", 21)) == 3_221_538
    torch.manual_seed(1)
    ref = torchvision.models.segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                                    num_classes=5)
    variables = check_parity("lraspp_mobilenet_v3_large", ref)  # num_classes=5 read off the state_dict

    # bf16 compute, fp32 params: finite and close to the fp32 logits.
    x = images(1, seed=3)[:, :41, :57]  # small: XLA's CPU bf16 convolutions are slow
    fp32 = jax.jit(models.create("lraspp_mobilenet_v3_large", 5).apply)(variables, x)["out"]
    bf16 = jax.jit(models.create("lraspp_mobilenet_v3_large", 5, dtype=jnp.bfloat16).apply)(variables, x)["out"]
    assert bf16.dtype == jnp.bfloat16 and bool(jnp.isfinite(bf16).all())
    err = rel_l2(bf16.astype(jnp.float32), fp32)
    print("lraspp_mobilenet_v3_large bf16 vs fp32 rel L2", f"{err:.2e}")
    assert err < 0.05


@pytest.mark.slow
def test_deeplabv3_mobilenet_v3_large_matches_torchvision():
    if "deeplabv3_mobilenet_v3_large" not in models.names():
        pytest.fail("deeplabv3_mobilenet_v3_large is not registered (segjax/models/deeplab.py)")
    assert count_params(models.create("deeplabv3_mobilenet_v3_large", 21, aux=True)) == 11_029_328
    torch.manual_seed(2)
    ref = torchvision.models.segmentation.deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                                       num_classes=4, aux_loss=True)
    for m in ref.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    check_parity("deeplabv3_mobilenet_v3_large", ref, keys=("out", "aux"), dropout_rate=0.0)


def test_backbone_import_from_mobilenet_v3_large_classifier():
    torch.manual_seed(3)
    imagenet = torchvision.models.mobilenet_v3_large(weights=None)
    randomize_batchnorm(imagenet, seed=3)
    state_dict = numpy_state_dict(imagenet)
    segmentation = torchvision.models.segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                                             num_classes=3)
    variables = from_torch("lraspp_mobilenet_v3_large", numpy_state_dict(segmentation))
    loaded = load_backbone("lraspp_mobilenet_v3_large", variables, state_dict)

    assert jax.tree.structure(loaded) == jax.tree.structure(variables)
    np.testing.assert_array_equal(loaded["params"]["classifier"]["low_classifier"]["kernel"],
                                  variables["params"]["classifier"]["low_classifier"]["kernel"])
    np.testing.assert_array_equal(loaded["params"]["backbone"]["4"]["block"]["2"]["fc1"]["kernel"],
                                  state_dict["features.4.block.2.fc1.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(loaded["batch_stats"]["backbone"]["16"]["1"]["var"],
                                  state_dict["features.16.1.running_var"])

    # The loaded backbone computes torchvision's dilated features (same weights fit dilated and not).
    dilated = torchvision.models.mobilenet_v3_large(weights=None, dilated=True).eval()
    dilated.load_state_dict(imagenet.state_dict())
    x = images(1, seed=4)
    with torch.no_grad():
        ref_high = dilated.features(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy().transpose(0, 2, 3, 1)
    backbone_vars = {c: loaded[c]["backbone"] for c in ("params", "batch_stats")}
    high = jax.jit(MobileNetV3Features("large", dilated=True).apply)(backbone_vars, x)["high"]
    assert high.shape == (1, 7, 9, 960)  # output stride 16
    assert rel_l2(high, ref_high) < RTOL

    small = numpy_state_dict(torchvision.models.mobilenet_v3_small(weights=None))
    with pytest.raises(SegjaxError, match="backbone weights for lraspp_mobilenet_v3_large"):
        load_backbone("lraspp_mobilenet_v3_large", variables, small)
