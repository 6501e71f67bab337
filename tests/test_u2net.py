"""U2-Net / U2-NetP: parameter counts, odd-size shapes, original checkpoint import, parity with PyTorch.

The PyTorch side is a compact functional forward written here from the architecture (a recursive
RSU), driven by a state dict with the original's key names and shapes
(tests/fixtures/u2net_state_dict_shapes.json, generated from xuebinqin's U-2-Net model/u2net.py).
"""
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segjax import analysis, convert, models
from segjax.errors import SegjaxError
from tests.parity import random_state_dict, rel_l2

# Scaling this BN's gain below 1 keeps a deep random net in train mode from amplifying fp32 rounding
# ~1.3x per BatchNorm (100 of them), which would make any fp32 implementation, PyTorch's included,
# differ from exact arithmetic by ~1e-4.
RSU_LAST_BN = ".rebnconv1d.bn_s1.weight"

TABLES = json.loads((pathlib.Path(__file__).parent / "fixtures" / "u2net_state_dict_shapes.json").read_text())
DILATED = {"stage5", "stage6", "stage5d"}  # the RSU-4F stages


# ------------------------------------------------------------------------- reference forward (torch)

def torch_u2net(sd: dict, x: torch.Tensor, train: bool) -> list[torch.Tensor]:
    """[fused, side1..side6] logits of U^2-Net from its state dict; updates `sd`'s running stats in train mode."""
    def rebnconv(prefix, h, dilation):
        h = F.conv2d(h, sd[f"{prefix}.conv_s1.weight"], sd.get(f"{prefix}.conv_s1.bias"),
                     padding=dilation, dilation=dilation)
        p = f"{prefix}.bn_s1"
        return F.relu(F.batch_norm(h, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"],
                                   sd[f"{p}.bias"], training=train, momentum=0.1, eps=1e-5))

    def resize(h, like):
        return F.interpolate(h, size=like.shape[2:], mode="bilinear", align_corners=False)

    def rsu(stage, h):
        height = sum(f"{stage}.rebnconv{i}.conv_s1.weight" in sd for i in range(1, 9))
        dilated = stage in DILATED

        def level(h, i):  # the inner U from level i down: encoder conv, deeper levels, decoder conv
            dilation = 2 ** (i - 1) if dilated else 1
            enc = rebnconv(f"{stage}.rebnconv{i}", h, dilation)
            if i == height - 1:
                deeper = rebnconv(f"{stage}.rebnconv{height}", enc, 2 ** i if dilated else 2)
            else:
                deeper = level(enc if dilated else F.max_pool2d(enc, 2, 2, ceil_mode=True), i + 1)
            return rebnconv(f"{stage}.rebnconv{i}d", torch.cat([resize(deeper, enc), enc], 1), dilation)

        h_in = rebnconv(f"{stage}.rebnconvin", h, 1)
        return level(h_in, 1) + h_in

    encoder = [rsu("stage1", x)]
    for i in range(2, 7):
        encoder.append(rsu(f"stage{i}", F.max_pool2d(encoder[-1], 2, 2, ceil_mode=True)))
    levels = {6: encoder[5]}
    for i in range(5, 0, -1):
        skip = encoder[i - 1]
        levels[i] = rsu(f"stage{i}d", torch.cat([resize(levels[i + 1], skip), skip], 1))
    sides = [resize(F.conv2d(levels[i], sd[f"side{i}.weight"], sd[f"side{i}.bias"], padding=1), x)
             for i in range(1, 7)]
    return [F.conv2d(torch.cat(sides, 1), sd["outconv.weight"], sd["outconv.bias"]), *sides]


# ------------------------------------------------------------------------- tests

def count_params(model) -> int:
    return analysis.param_count(convert.model_shapes(model))


@pytest.mark.parametrize("name, conv_bias, expected", [
    ("u2net", True, 44_009_869), ("u2netp", True, 1_131_181),
    ("u2net", False, 43_995_469), ("u2netp", False, 1_128_333),
])
def test_parameter_counts(name, conv_bias, expected):
    assert count_params(models.create(name, 1, conv_bias=conv_bias)) == expected


@pytest.mark.parametrize("name", ["u2net", "u2netp"])
@pytest.mark.parametrize("size", [(161, 97), (67, 45), (17, 9)])
def test_output_shapes_at_odd_sizes(name, size):
    model = models.create(name, 2)
    x = jax.ShapeDtypeStruct((2, *size, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), x)
    out = jax.eval_shape(lambda v, x: model.apply(v, x), variables, x)
    assert out["out"].shape == (2, *size, 2)
    assert [s.shape for s in out["sides"]] == [(2, *size, 2)] * 6


@pytest.mark.parametrize("name", ["u2net", "u2netp"])
def test_imports_original_state_dict(name):
    sd = random_state_dict(TABLES[name])
    assert convert.layout_for(name).infer_kwargs(sd) == {"num_classes": 1, "conv_bias": True}
    variables = convert.from_torch(name, sd)  # checked against the model's own shapes inside
    p, s = variables["params"], variables["batch_stats"]
    np.testing.assert_array_equal(p["stage1"]["rebnconvin"]["conv_s1"]["kernel"],
                                  sd["stage1.rebnconvin.conv_s1.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(p["stage5d"]["rebnconv3d"]["bn_s1"]["scale"], sd["stage5d.rebnconv3d.bn_s1.weight"])
    np.testing.assert_array_equal(s["stage6"]["rebnconv4"]["bn_s1"]["mean"], sd["stage6.rebnconv4.bn_s1.running_mean"])
    np.testing.assert_array_equal(p["side6"]["bias"], sd["side6.bias"])
    np.testing.assert_array_equal(p["outconv"]["kernel"], sd["outconv.weight"].transpose(2, 3, 1, 0))
    n_params = sum(v.size for k, v in sd.items() if not k.endswith(("running_mean", "running_var", "tracked")))
    assert sum(v.size for v in jax.tree_util.tree_leaves(p)) == n_params


def test_import_without_conv_biases_and_mismatches():
    sd = {k: v for k, v in random_state_dict(TABLES["u2netp"]).items() if not k.endswith("conv_s1.bias")}
    assert convert.layout_for("u2netp").infer_kwargs(sd)["conv_bias"] is False
    variables = convert.from_torch("u2netp", sd)
    assert "bias" not in variables["params"]["stage3"]["rebnconv2"]["conv_s1"]
    with pytest.raises(SegjaxError, match="does not fit"):
        convert.from_torch("u2net", sd)  # a u2netp checkpoint under the full model's name
    with pytest.raises(SegjaxError, match="not a U-2-Net"):
        convert.from_torch("u2net", {"inc.double_conv.0.weight": np.zeros((64, 3, 3, 3), np.float32)})


# U2-Net and U2-Netp run the same RSU code at the same depth and differ only in widths: the narrow one's parity
# proves the code, and the full one's widths are proved by its parameter count and its state-dict import above.
@pytest.mark.parametrize("name", ["u2netp"])
def test_parity_with_torch_eval_and_train(name):
    sd = random_state_dict(TABLES[name], seed=5, gain=0.1, gain_key=RSU_LAST_BN)
    variables = convert.from_torch(name, sd)
    model = models.create(name, 1)
    x = np.random.default_rng(6).standard_normal((2, 67, 45, 3)).astype(np.float32)

    @jax.jit
    def forward(variables, x):
        evaluated = model.apply(variables, x, train=False)
        trained, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
        as_list = lambda o: [o["out"], *o["sides"]]  # noqa: E731
        return as_list(evaluated), as_list(trained), updates["batch_stats"]

    ours_eval, ours_train, new_stats = forward(variables, x)

    ref_sd = {k: torch.from_numpy(v.astype(np.float64) if v.dtype == np.float32 else v) for k, v in sd.items()}
    xt = torch.from_numpy(x.astype(np.float64)).permute(0, 3, 1, 2)
    with torch.no_grad():
        ref_eval = [t.permute(0, 2, 3, 1).numpy() for t in torch_u2net(ref_sd, xt, train=False)]
        ref_train = [t.permute(0, 2, 3, 1).numpy() for t in torch_u2net(ref_sd, xt, train=True)]
    assert max(rel_l2(a, b) for a, b in zip(ours_eval, ref_eval)) < 1e-4
    assert max(rel_l2(a, b) for a, b in zip(ours_train, ref_train)) < 1e-4
    assert rel_l2(ours_eval[0], ref_train[0]) > 1e-2  # train and eval really differ: the check above has teeth

    ref_stats = convert.torch_to_flax({k: v.numpy() for k, v in ref_sd.items()})["batch_stats"]
    ours_flat = dict(jax.tree_util.tree_leaves_with_path(new_stats))
    ref_flat = dict(jax.tree_util.tree_leaves_with_path(ref_stats))
    assert ours_flat.keys() == ref_flat.keys()
    assert max(rel_l2(ours_flat[k], ref_flat[k]) for k in ref_flat) < 1e-4
