"""UNet: parameter counts, odd-size shapes, milesial checkpoint import, parity with a PyTorch forward.

The PyTorch side is a compact functional forward written here from the architecture (F.conv2d,
F.batch_norm, ...), driven by a state dict with the reference's exact key names and shapes
(tests/fixtures/unet_state_dict_shapes.json, generated from milesial's Pytorch-UNet).
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
from segjax import nn as snn
from segjax.errors import SegjaxError
from segjax.models.unet import pad_to
from tests.parity import random_state_dict, rel_l2, eval_and_train_forward

TABLES = json.loads((pathlib.Path(__file__).parent / "fixtures" / "unet_state_dict_shapes.json").read_text())


# ------------------------------------------------------------------------- reference forward (torch)

def torch_unet(sd: dict, x: torch.Tensor, train: bool) -> torch.Tensor:
    """milesial's UNet forward from its state dict; updates the running statistics in `sd` when training."""
    def double_conv(prefix, h):
        for conv, norm in ((0, 1), (3, 4)):
            h = F.conv2d(h, sd[f"{prefix}.double_conv.{conv}.weight"], padding=1)
            p = f"{prefix}.double_conv.{norm}"
            h = F.relu(F.batch_norm(h, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"],
                                    sd[f"{p}.bias"], training=train, momentum=0.1, eps=1e-5))
        return h

    features = [double_conv("inc", x)]
    for i in range(1, 5):
        features.append(double_conv(f"down{i}.maxpool_conv.1", F.max_pool2d(features[-1], 2)))
    y = features.pop()
    for i in range(1, 5):
        skip = features.pop()
        if f"up{i}.up.weight" in sd:
            y = F.conv_transpose2d(y, sd[f"up{i}.up.weight"], sd[f"up{i}.up.bias"], stride=2)
        else:
            y = F.interpolate(y, scale_factor=2, mode="bilinear", align_corners=True)
        dy, dx = skip.shape[2] - y.shape[2], skip.shape[3] - y.shape[3]
        y = F.pad(y, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])
        y = double_conv(f"up{i}.conv", torch.cat([skip, y], 1))
    return F.conv2d(y, sd["outc.conv.weight"], sd["outc.conv.bias"])


# ------------------------------------------------------------------------- tests

def count_params(model) -> int:
    return analysis.param_count(convert.model_shapes(model))


@pytest.mark.parametrize("kw, expected", [
    (dict(bilinear=False, base_channels=64), 31_037_698),
    (dict(bilinear=True, base_channels=64), 17_263_042),
    (dict(bilinear=True, base_channels=32), 4_318_434),
])
def test_parameter_counts(kw, expected):
    assert count_params(models.create("unet", 2, **kw)) == expected


@pytest.mark.parametrize("bilinear", [False, True])
@pytest.mark.parametrize("size", [(161, 97), (33, 18)])
def test_output_shape_at_odd_sizes(bilinear, size):
    model = models.create("unet", 5, bilinear=bilinear, base_channels=8)
    x = jax.ShapeDtypeStruct((2, *size, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), x)
    out = jax.eval_shape(lambda v, x: model.apply(v, x), variables, x)
    assert set(out) == {"out"}
    assert out["out"].shape == (2, *size, 5)


def test_align_corners_upsample_and_pad_match_torch():
    x = np.random.default_rng(1).standard_normal((2, 5, 7, 3)).astype(np.float32)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2)
    ours = snn.resize(jnp.asarray(x), (10, 14), align_corners=True)
    ref = F.interpolate(xt, scale_factor=2, mode="bilinear", align_corners=True).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.asarray(ours), ref, atol=2e-6)
    padded = pad_to(jnp.asarray(ref), (11, 15))  # one short in both axes: the extra row/column goes after
    ref_pad = F.pad(torch.from_numpy(ref).permute(0, 3, 1, 2), [0, 1, 0, 1]).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(np.asarray(padded), ref_pad)
    assert np.asarray(pad_to(ours, (13, 14)))[:, 0].sum() == 0  # diff 3: one row before, two after


@pytest.mark.parametrize("table, bilinear, base, classes", [
    ("transposed_base64_classes2", False, 64, 2),
    ("bilinear_base64_classes2", True, 64, 2),
])
def test_imports_reference_state_dict(table, bilinear, base, classes):
    sd = random_state_dict(TABLES[table])
    assert convert.layout_for("unet").infer_kwargs(sd) == {
        "num_classes": classes, "base_channels": base, "bilinear": bilinear}
    variables = convert.from_torch("unet", sd)  # checked against the model's own shapes inside
    p, s = variables["params"], variables["batch_stats"]
    np.testing.assert_array_equal(p["inc"]["0"]["kernel"], sd["inc.double_conv.0.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(p["down4"]["4"]["scale"], sd["down4.maxpool_conv.1.double_conv.4.weight"])
    np.testing.assert_array_equal(s["up2"]["conv"]["1"]["var"], sd["up2.conv.double_conv.1.running_var"])
    np.testing.assert_array_equal(p["outc"]["bias"], sd["outc.conv.bias"])
    if not bilinear:
        np.testing.assert_array_equal(p["up1"]["up"]["kernel"], sd["up1.up.weight"].transpose(2, 3, 1, 0))
    n_params = sum(v.size for k, v in sd.items() if not k.endswith(("running_mean", "running_var", "tracked")))
    assert sum(v.size for v in jax.tree_util.tree_leaves(p)) == n_params


def test_import_rejects_a_mismatched_checkpoint():
    sd = random_state_dict(TABLES["bilinear_base16_classes3"])
    with pytest.raises(SegjaxError, match="does not fit"):
        convert.from_torch("unet", sd, bilinear=False)
    with pytest.raises(SegjaxError, match="not a milesial UNet"):
        convert.from_torch("unet", {"stage1.rebnconvin.conv_s1.weight": np.zeros((64, 3, 3, 3), np.float32)})


def test_convert_file_writes_a_checkpoint(tmp_path):
    from segjax import checkpoint

    sd = random_state_dict(TABLES["transposed_base16_classes3"])
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, tmp_path / "unet.pth")
    convert.convert_file("unet", str(tmp_path / "unet.pth"), str(tmp_path / "ckpt"))
    variables, meta = checkpoint.load_variables(str(tmp_path / "ckpt"))
    assert meta["model"] == "unet" and meta["model_kwargs"] == {"num_classes": 3, "base_channels": 16,
                                                                "bilinear": False}
    np.testing.assert_array_equal(np.asarray(variables["params"]["up4"]["conv"]["3"]["kernel"]),
                                  sd["up4.conv.double_conv.3.weight"].transpose(2, 3, 1, 0))


@pytest.mark.parametrize("table", ["transposed_base16_classes3", "bilinear_base16_classes3"])
def test_parity_with_torch_eval_and_train(table):
    sd = random_state_dict(TABLES[table], seed=3)
    variables = convert.from_torch("unet", sd)
    model = models.create("unet", **convert.layout_for("unet").infer_kwargs(sd))
    x = np.random.default_rng(4).standard_normal((2, 45, 37, 3)).astype(np.float32)

    forward = eval_and_train_forward(model)

    ours_eval, ours_train, new_stats = forward(variables, x)

    ref_sd = {k: torch.from_numpy(v.astype(np.float64) if v.dtype == np.float32 else v) for k, v in sd.items()}
    xt = torch.from_numpy(x.astype(np.float64)).permute(0, 3, 1, 2)
    with torch.no_grad():
        ref_eval = torch_unet(ref_sd, xt, train=False).permute(0, 2, 3, 1).numpy()
        ref_train = torch_unet(ref_sd, xt, train=True).permute(0, 2, 3, 1).numpy()
    assert rel_l2(ours_eval, ref_eval) < 1e-4
    assert rel_l2(ours_train, ref_train) < 1e-4
    assert rel_l2(ours_eval, ref_train) > 1e-2  # train and eval really differ: the check above has teeth

    ref_stats = convert.torch_to_flax({k: v.numpy() for k, v in ref_sd.items()},
                                      convert.layout_for("unet").rename)["batch_stats"]
    ours_flat = dict(jax.tree_util.tree_leaves_with_path(new_stats))
    ref_flat = dict(jax.tree_util.tree_leaves_with_path(ref_stats))
    assert ours_flat.keys() == ref_flat.keys()
    assert max(rel_l2(ours_flat[k], ref_flat[k]) for k in ref_flat) < 1e-4


def test_imports_a_single_channel_checkpoint():
    """Grayscale UNets (DRIVE's green channel, CT slices) convert: input channels come from `inc`."""
    table = dict(TABLES["bilinear_base16_classes3"])
    table["inc.double_conv.0.weight"] = [16, 1, 3, 3]
    sd = random_state_dict(table)
    variables = convert.from_torch("unet", sd)
    assert variables["params"]["inc"]["0"]["kernel"].shape == (3, 3, 1, 16)
