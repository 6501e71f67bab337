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


# ------------------------------------------------------------------------------ training-checkpoint wrappers

def _tiny_resnet18(tmp_path, wrap, name="wrapped.pth", **save_kw):
    """A resnet18 (10 classes) state_dict saved inside `wrap(state_dict)`; returns (path, state_dict)."""
    torch.manual_seed(0)
    sd = torchvision.models.resnet18(weights=None, num_classes=10).state_dict()
    path = tmp_path / name
    torch.save(wrap(sd), path, **save_kw)
    return path, sd


WRAPPERS = {
    "vainf": lambda sd: {"model_state": sd, "optimizer_state": {"state": {}, "param_groups": [{"lr": 0.01}]},
                         "scheduler_state": {"last_epoch": 3}, "cur_itrs": 30000, "best_score": np.float64(0.772)},
    "vainf_python_float": lambda sd: {"model_state": sd, "cur_itrs": 30000, "best_score": 0.772},
    "jfzhang95": lambda sd: {"epoch": 49, "state_dict": sd, "optimizer": {"state": {}}, "best_pred": np.float64(0.78)},
    "mmseg": lambda sd: {"meta": {"epoch": 4, "iter": np.int64(40000), "mmseg_version": "0.x"}, "state_dict": sd},
    "model": lambda sd: {"model": sd, "epoch": np.int32(3)},
    "dataparallel": lambda sd: {"state_dict": {"module." + k: v for k, v in sd.items()}, "loss": np.float32(0.1)},
}


@pytest.mark.parametrize("wrapper", sorted(WRAPPERS))
@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_wrapped_checkpoints_with_numpy_scalars_load_their_weights(tmp_path, wrapper, zip_format):
    path, sd = _tiny_resnet18(tmp_path, WRAPPERS[wrapper], _use_new_zipfile_serialization=zip_format)
    loaded = convert.load_state_dict(path)
    assert sorted(loaded) == sorted(sd)
    np.testing.assert_array_equal(loaded["layer4.1.conv2.weight"], sd["layer4.1.conv2.weight"].numpy())
    assert loaded["bn1.num_batches_tracked"].dtype == np.int64


def test_numpy_scalars_need_the_allowlist(tmp_path):
    """The numpy-scalar files really are refused by a plain weights-only load (so the test above tests something)."""
    path, _ = _tiny_resnet18(tmp_path, WRAPPERS["vainf"])
    with pytest.raises(Exception, match="numpy"):
        torch.load(path, weights_only=True)


def _respell_scalar_as_numpy1(src, dst):
    """A numpy 2 torch.save file rewritten as numpy 1.x pickles it: GLOBAL numpy.core.multiarray.scalar."""
    import zipfile
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("data.pkl"):
                assert b"numpy._core.multiarray\nscalar" in data  # what torch.save writes under numpy 2
                data = data.replace(b"numpy._core.multiarray\nscalar", b"numpy.core.multiarray\nscalar")
            zout.writestr(info.filename, data)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_numpy1_spelling_of_the_scalar_global_is_accepted(tmp_path, zip_format):
    path, sd = _tiny_resnet18(tmp_path, WRAPPERS["vainf"])
    old = tmp_path / "numpy1.pth"
    if zip_format:
        _respell_scalar_as_numpy1(path, old)
    else:  # the legacy format is one pickle stream followed by the raw storages: edit it in place
        torch.save(WRAPPERS["vainf"](sd), path, _use_new_zipfile_serialization=False)
        data = path.read_bytes()
        assert b"numpy._core.multiarray\nscalar" in data
        old.write_bytes(data.replace(b"numpy._core.multiarray\nscalar", b"numpy.core.multiarray\nscalar"))
    assert b"numpy.core.multiarray\nscalar" in old.read_bytes() or zip_format
    loaded = convert.load_state_dict(old)
    np.testing.assert_array_equal(loaded["fc.weight"], sd["fc.weight"].numpy())


@pytest.mark.parametrize("wrapped", [{}, {"state_dict": {}}, {"model_state": {}, "best_score": np.float64(0.5)},
                                     {"state_dict": {"meta": 1}, "epoch": 3}],
                         ids=["empty", "empty_state_dict", "empty_model_state", "no_tensors"])
def test_a_file_without_weights_is_an_error_not_an_empty_checkpoint(tmp_path, wrapped):
    path = tmp_path / "empty.pth"
    torch.save(wrapped, path)
    with pytest.raises(SegjaxError, match="empty.pth: no weights found") as info:
        convert.load_state_dict(path)
    assert "\n" not in str(info.value)


class RunsCode:
    """numpy.testing's runstring(code, dict) executes code: a numpy global that must stay refused."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        from numpy.testing._private.utils import runstring
        return runstring, (f"open({str(self.marker)!r}, 'w')", {})


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
@pytest.mark.parametrize("payload", ["runstring", "open"])
def test_hostile_pickle_inside_a_wrapper_is_refused_and_named(tmp_path, zip_format, payload):
    marker = tmp_path / "pwned"
    hostile = RunsCode(marker) if payload == "runstring" else CreatesFileWhenUnpickled(str(marker))
    path, _ = _tiny_resnet18(tmp_path, lambda sd: {"model_state": sd, "best_score": np.float64(0.7),
                                                   "optimizer_state": {"hook": hostile}},
                             _use_new_zipfile_serialization=zip_format)
    with pytest.raises(SegjaxError) as info:
        convert.load_state_dict(path)
    message = str(info.value)
    name = "numpy.testing._private.utils.runstring" if payload == "runstring" else "io.open"
    assert f"it pickles {name}, which is never loaded" in message, message
    assert "\n" not in message and "\x1b" not in message
    assert not marker.exists()


def test_refused_or_failed_conversion_writes_no_directory(tmp_path, capsys):
    from segjax import cli

    path, _ = _tiny_resnet18(tmp_path, lambda sd: {"state_dict": sd, "x": CreatesFileWhenUnpickled(str(tmp_path / "p"))})
    for args in (["resnet18", str(path)], ["resnet18", str(tmp_path / "missing.pth")],
                 ["resnet50", str(_tiny_resnet18(tmp_path, lambda sd: sd, "plain.pth")[0])]):
        out = tmp_path / "out"
        assert cli.main(["convert", *args, str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:"), err
        assert not out.exists()


def test_failed_write_removes_the_directory_it_created(tmp_path, monkeypatch):
    from segjax import checkpoint

    path, _ = _tiny_resnet18(tmp_path, lambda sd: sd)

    def half_written(out_dir, variables, meta):
        os.makedirs(os.path.join(out_dir, "variables"))
        raise RuntimeError("interrupted")

    monkeypatch.setattr(checkpoint, "save_variables", half_written)
    with pytest.raises(RuntimeError, match="interrupted"):
        convert.convert_file("resnet18", str(path), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_the_refused_global_is_named_whatever_torch_says(tmp_path, monkeypatch):
    """The name is read off the pickle, not parsed from torch's message (whose wording changes)."""
    path, _ = _tiny_resnet18(tmp_path, lambda sd: {"state_dict": sd, "x": RunsCode(tmp_path / "pwned")})

    def load(*args, **kwargs):
        raise RuntimeError("\x1b[1mWeights only load failed\x1b[0m for reasons of its own\nsee the docs")

    monkeypatch.setattr(torch, "load", load)
    with pytest.raises(SegjaxError, match=r"it pickles numpy\.testing\._private\.utils\.runstring, which is never"):
        convert.load_state_dict(path)
