"""tests/torch_reference.py's DeepLab v3+ and FCN-VGG16 twins (experiments/benchmark.py's PyTorch side where
torchvision has no such model) have segjax's parameter count and give logits at the input's odd H, W."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch_reference

from segjax import analysis, models
from segjax.nn import bilinear_upsample_kernel

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
