"""Multi-scale inference rules: DeepLab v3's averaged softmax and DeepLab v2's max of logits."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax import cli, evaluate, inference
from segjax import nn as snn


def fake_model(variables, x, train=False):
    """Logits that depend on the input's scale: a per-pixel linear map of the image, plus its height."""
    return {"out": x @ variables["w"] + x.shape[1] * variables["b"]}


def test_max_logits_is_the_softmax_of_the_elementwise_max_over_scales():
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.randn(2, 12, 10, 3).astype(np.float32))
    variables = {"w": jnp.asarray(rng.randn(3, 4).astype(np.float32)), "b": jnp.asarray(rng.randn(4).astype(np.float32) / 4)}
    scales = (0.5, 0.75, 1.0)
    got = jax.jit(lambda v, x: inference.predict_probs(fake_model, v, x, scales, rule="max-logits"))(variables, x)
    per_scale = []
    for s in scales:
        size = (round(12 * s), round(10 * s))
        xi = x if size == (12, 10) else snn.resize(x, size, "bilinear", align_corners=False)
        logits = fake_model(variables, xi)["out"]
        per_scale.append(logits if size == (12, 10) else snn.resize(logits, (12, 10), "bilinear", align_corners=False))
    want = jax.nn.softmax(jnp.max(jnp.stack(per_scale), axis=0), axis=-1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    mean = inference.predict_probs(fake_model, variables, x, scales, rule="mean-probs")
    np.testing.assert_allclose(mean, jnp.mean(jnp.stack([jax.nn.softmax(z, -1) for z in per_scale]), 0), rtol=1e-5,
                               atol=1e-6)
    assert float(jnp.abs(got - mean).max()) > 1e-2  # the rules differ
    with pytest.raises(ValueError, match="max-logit"):
        inference.predict_probs(fake_model, variables, x, scales, rule="max-logit")


def test_eval_takes_the_rule_and_deeplab_v2_scales():
    assert evaluate.MS_SCALES["max-logits"] == (0.5, 0.75, 1.0)
    args = cli.build_parser().parse_args(["eval", "--checkpoint", "ckpt", "--multi-scale", "--ms-rule", "max-logits"])
    assert args.ms_rule == "max-logits" and args.multi_scale
    assert cli.build_parser().parse_args(["eval", "--checkpoint", "ckpt"]).ms_rule == "mean-probs"
