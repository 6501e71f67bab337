"""The model registry's contract and `segjax convert --set` for options a state_dict can't tell."""
import json

import pytest
import torch
import torchvision

from segjax import cli, models
from segjax.errors import SegjaxError


def test_names_and_create_follow_the_contract():
    names = models.names()
    assert {"fcn_resnet50", "deeplabv3_resnet50", "lraspp_mobilenet_v3_large", "unet", "u2net"} <= set(names)
    assert "resnet50" not in names and "resnet50" in models.names(kind=None)  # backbones listed apart
    with pytest.raises(SegjaxError, match="unknown model 'fcn_resnet5'.*fcn_resnet50"):
        models.create("fcn_resnet5", 21)
    with pytest.raises(SegjaxError, match="no option output_strid;.*output_stride"):
        models.create("deeplabv3_resnet50", 21, output_strid=16)


def test_convert_sets_options_the_weights_cannot_tell(tmp_path, capsys):
    torch.manual_seed(0)
    ref = torchvision.models.segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=3)
    torch.save(ref.state_dict(), tmp_path / "w.pth")
    out = tmp_path / "ckpt"
    assert cli.main(["convert", "deeplabv3_resnet50", str(tmp_path / "w.pth"), str(out), "--set", "output_stride=16"]) == 0
    meta = json.loads((out / "segjax.json").read_text())
    assert meta["model_kwargs"]["output_stride"] == 16 and meta["model_kwargs"]["num_classes"] == 3

    capsys.readouterr()
    assert cli.main(["convert", "deeplabv3_resnet50", str(tmp_path / "w.pth"), str(tmp_path / "b"),
                     "--set", "stride=16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "stride" in err[0] and "output_stride" in err[0]
    assert not (tmp_path / "b" / "segjax.json").exists()
