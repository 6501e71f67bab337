"""Converting weights never runs pickled code, and a state_dict that doesn't fit says exactly why."""
import os
import pickle

import numpy as np
import pytest
import torch
import torchvision

from segjax import convert
from segjax.errors import SegjaxError


class CreatesFileWhenUnpickled:
    """A payload: unpickling it calls open(path, "w"), i.e. creates a file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned.txt"
    weights = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "payload": CreatesFileWhenUnpickled(str(marker))}, weights)
    assert not marker.exists()

    with pytest.raises(SegjaxError, match="evil.pth: not a plain weights file"):
        convert.load_state_dict(weights)
    assert not marker.exists()

    # The payload is live: an unsafe load would have created the file.
    torch.load(weights, weights_only=False)
    assert marker.exists()


def test_raw_pickle_with_os_system_is_refused(tmp_path):
    marker = tmp_path / "touched"

    class Touch:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    weights = tmp_path / "raw.pth"  # a legacy (non-zip) pickle file, not written by torch.save
    with open(weights, "wb") as f:  # protocol 2, torch's legacy format
        pickle.dump({"w": Touch()}, f, protocol=2)
    with pytest.raises(SegjaxError, match="raw.pth"):
        convert.load_state_dict(weights)
    assert not marker.exists()


def test_missing_file_is_a_one_line_error(tmp_path):
    with pytest.raises(SegjaxError, match="no such weights file"):
        convert.load_state_dict(tmp_path / "nope.pth")


@pytest.fixture(scope="module")
def resnet18_state_dict():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    return {k: v.numpy() for k, v in model.state_dict().items()}


def test_clean_state_dict_converts(resnet18_state_dict):
    variables = convert.from_torch("resnet18", resnet18_state_dict)
    np.testing.assert_array_equal(variables["params"]["fc"]["kernel"], resnet18_state_dict["fc.weight"].T)
    np.testing.assert_array_equal(variables["batch_stats"]["layer4"]["1"]["bn2"]["var"],
                                  resnet18_state_dict["layer4.1.bn2.running_var"])


def test_missing_and_unexpected_keys_are_listed(resnet18_state_dict):
    sd = dict(resnet18_state_dict)
    del sd["layer2.0.downsample.1.running_mean"]
    sd["layer5.0.conv1.weight"] = np.zeros((8, 8, 3, 3), np.float32)
    with pytest.raises(SegjaxError) as info:
        convert.from_torch("resnet18", sd)
    message = str(info.value)
    assert "missing 1: batch_stats/layer2/0/downsample/1/mean" in message
    assert "unexpected 1: params/layer5/0/conv1/kernel" in message
    assert "\n" not in message


def test_wrong_num_classes_names_the_shapes(resnet18_state_dict):
    with pytest.raises(SegjaxError, match=r"2 shape mismatches, e.g. params/fc/bias \(10,\) vs \(7,\)"):
        convert.from_torch("resnet18", resnet18_state_dict, num_classes=7)


def test_segmentation_checkpoint_for_the_wrong_model_is_named():
    sd = {"conv1.weight": np.zeros((64, 3, 7, 7), np.float32)}
    with pytest.raises(SegjaxError, match="no 'classifier.4.weight'"):
        convert.from_torch("fcn_resnet50", sd)
