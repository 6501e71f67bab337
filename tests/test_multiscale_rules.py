"""Multi-scale inference rules: DeepLab v3's averaged softmax and DeepLab v2's max of logits."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax import cli, evaluate, inference
from segjax import nn as snn


def fake_model(variables, x, train=False, upsample=True):
    """Logits at output stride 2 that depend on the input's scale: a linear map of 2x2-mean-pooled
    pixels, plus the input height; upsampled to the input size unless upsample=False."""
    n, h, w, c = x.shape
    pooled = x[:, : h // 2 * 2, : w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2, c).mean((2, 4))
    logits = pooled @ variables["w"] + h * variables["b"]
    return {"out": snn.resize(logits, (h, w), "bilinear") if upsample else logits}


def _torch_max_logits(x, w, b, scales):
    """The reference's rule (deeplab-pytorch's MSC and its eval), written with torch's own ops."""
    import torch
    F = torch.nn.functional

    def base(t):
        return torch.einsum("nchw,ck->nkhw", F.avg_pool2d(t, 2), w) + t.shape[2] * b[None, :, None, None]

    t = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())
    w, b = torch.from_numpy(np.asarray(w)), torch.from_numpy(np.asarray(b))
    logits = base(t)
    pyramid = [logits] + [F.interpolate(base(F.interpolate(t, scale_factor=p, mode="bilinear", align_corners=False)),
                                        size=logits.shape[2:], mode="bilinear", align_corners=False)
                          for p in scales if p != 1]
    best = torch.max(torch.stack(pyramid), dim=0)[0]
    up = F.interpolate(best, size=t.shape[2:], mode="bilinear", align_corners=False)
    return F.softmax(up, 1).numpy().transpose(0, 2, 3, 1)


def test_max_logits_is_deeplab_v2s_reference_rule_and_differs_from_mean_probs():
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.randn(2, 23, 19, 3).astype(np.float32))  # 23 * 0.75 is not whole: floor and 1/p sampling
    variables = {"w": jnp.asarray(rng.randn(3, 4).astype(np.float32)), "b": jnp.asarray(rng.randn(4).astype(np.float32) / 8)}
    scales = (0.5, 0.75, 1.0)
    got = jax.jit(lambda v, x: inference.predict_probs(fake_model, v, x, scales, rule="max-logits"))(variables, x)
    want = _torch_max_logits(x, variables["w"], variables["b"], scales)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    mean = inference.predict_probs(fake_model, variables, x, scales, rule="mean-probs")
    assert float(jnp.abs(got - mean).max()) > 1e-2  # the rules differ
    with pytest.raises(ValueError, match="max-logit"):
        inference.predict_probs(fake_model, variables, x, scales, rule="max-logit")


def test_resize_with_a_scale_factor_is_torchs():
    import torch
    x = np.random.RandomState(1).randn(1, 23, 19, 2).astype(np.float32)
    for p in (0.5, 0.75, 0.3):
        want = torch.nn.functional.interpolate(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), scale_factor=p,
                                               mode="bilinear", align_corners=False).numpy().transpose(0, 2, 3, 1)
        got = snn.resize(jnp.asarray(x), None, scale_factor=p)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)  # torch computes the weights in fp32


def test_only_models_with_an_upsample_switch_take_max_logits():
    from segjax import models
    assert inference.supports_max_logits(models.create("deeplabv2_resnet101", num_classes=3))
    assert inference.supports_max_logits(models.create("deeplabv1_largefov_vgg16", num_classes=3))
    assert not inference.supports_max_logits(models.create("unet", num_classes=3))


def test_eval_takes_the_rule_and_deeplab_v2_scales():
    assert evaluate.MS_SCALES["max-logits"] == (0.5, 0.75, 1.0)
    args = cli.build_parser().parse_args(["eval", "--checkpoint", "ckpt", "--multi-scale", "--ms-rule", "max-logits"])
    assert args.ms_rule == "max-logits" and args.multi_scale
    assert cli.build_parser().parse_args(["eval", "--checkpoint", "ckpt"]).ms_rule == "mean-probs"
