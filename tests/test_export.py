"""segjax.export: a StableHLO artifact that runs with jax alone, model.json, ONNX through jax2onnx.

Parity figures are relative max-abs differences: max |artifact - segjax apply| / max |segjax apply|.
The full per-model table (every registered model) is in docs/export.md, with the command behind it.
"""
import json
import os
import subprocess
import sys
import textwrap

import flax.linen
import jax
import numpy as np
import pytest

from segjax import export as E
from segjax import models
from segjax import nn as snn
from segjax.analysis import init_variables
from segjax.data import synthetic
from segjax.card import ModelCard
from segjax.errors import SegjaxError

UNET_KW = dict(base_channels=8)


@pytest.fixture(scope="module")
def unet():
    m = models.create("unet", num_classes=5, **UNET_KW)
    return m, init_variables(m, (64, 64))


@pytest.fixture(scope="module")
def unet_export(unet, tmp_path_factory):
    m, v = unet
    out = str(tmp_path_factory.mktemp("unet") / "export")
    meta = {"model": "unet", "model_kwargs": UNET_KW, "num_classes": 5, "task": "segmentation",
            "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "dataset": "synthetic"}
    return out, E.export(ModelCard.from_meta(meta), v, out, model=m, example_size=(64, 64))


def _rel(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(np.asarray(b, np.float64)).max())


# A runtime that has jax and numpy, and no segjax: the artifact alone reproduces the model.
RUNNER = textwrap.dedent("""
    import sys
    import jax, numpy as np
    exported = jax.export.deserialize(open(sys.argv[1], "rb").read())
    y = np.asarray(exported.call(np.load(sys.argv[2])))
    np.save(sys.argv[3], y)
    assert not any(m == "segjax" or m.startswith("segjax.") for m in sys.modules), "segjax was imported"
    print(exported.in_avals[0].shape, exported.out_avals[0].shape)
""")


@pytest.mark.e2e  # a subprocess without segjax
def test_stablehlo_runs_without_segjax_at_another_size_and_batch(unet, unet_export, tmp_path):
    m, v = unet
    out, manifest = unet_export
    # H, W symbolic (multiples of UNet's stride 16), batch symbolic: run batch 2 at 48x80, not 64x64.
    x = np.random.RandomState(0).standard_normal((2, 48, 80, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    script = tmp_path / "run.py"
    script.write_text(RUNNER)
    env = {k: val for k, val in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, str(script), os.path.join(out, "model.stablehlo"), str(tmp_path / "x.npy"),
                          str(tmp_path / "y.npy")], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    y = np.load(tmp_path / "y.npy")
    ref = np.asarray(jax.jit(lambda x: m.apply(v, x, train=False)["out"])(x))
    assert y.shape == ref.shape == (2, 48, 80, 5)
    assert _rel(y, ref) <= 1e-5


def test_manifest(unet_export):
    out, manifest = unet_export
    assert sorted(os.listdir(out)) == ["model.json", "model.stablehlo"]
    with open(os.path.join(out, "model.json")) as f:
        on_disk = json.load(f)
    assert on_disk == json.loads(json.dumps(manifest))
    assert manifest["input"]["layout"] == "NHWC" and manifest["input"]["channels"] == "RGB"
    assert manifest["input"]["mean"] == [0.5] * 3 and manifest["input"]["std"] == [0.25] * 3
    assert manifest["input"]["symbolic_dims"] == ["batch", "height", "width"]
    assert manifest["input"]["constraints"] == "H a multiple of 16, W a multiple of 16"
    assert manifest["input"]["shape"] == ["b", "16*h", "16*w", 3]
    assert manifest["output"]["kind"] == "logits" and manifest["output"]["activation"] == "softmax"
    assert manifest["class_names"] == list(synthetic.CLASS_NAMES)
    pal = synthetic.voc_palette()
    assert manifest["palette"] == [pal[3 * i: 3 * i + 3] for i in range(5)]
    assert manifest["output_stride"] == 16
    assert manifest["segjax_version"] and manifest["onnx"] is None
    assert set(manifest["stablehlo"]["platforms"]) == {"cpu", "cuda"}
    assert manifest["checks"]["stablehlo_rel_max_abs_diff"] <= 1e-5


class ReadsItsSize(flax.linen.Module):
    """A model that needs concrete sizes: it turns its input height into a Python number."""
    @flax.linen.compact
    def __call__(self, x, train=False):
        return {"out": flax.linen.Conv(3, (1, 1))(x) * (int(x.shape[1]) / 64.0)}


def test_fixed_size_model_refuses_symbolic_and_writes_nothing(tmp_path):
    m = ReadsItsSize()
    v = init_variables(m, (64, 64))
    meta = {"model": "reads_its_size", "num_classes": 3, "dataset": "no_such_data"}
    out = tmp_path / "export"
    with pytest.raises(SegjaxError, match="symbolic height/width.*symbolic=False") as e:
        E.export(ModelCard.from_meta(meta), v, str(out), model=m)
    assert "\n" not in str(e.value) and "test_export.py" not in str(e.value)
    assert os.listdir(tmp_path) == []  # no export folder, no temporary one
    # A fixed size keeps the batch symbolic, with probabilities on request.
    manifest = E.export(ModelCard.from_meta(meta), v, str(out), model=m, symbolic=False, probabilities=True, example_size=(64, 64))
    assert manifest["input"]["shape"] == ["b", 64, 64, 3] and manifest["input"]["symbolic_dims"] == ["batch"]
    assert manifest["class_names"] == ["0", "1", "2"]  # an unknown data set: numbers
    assert manifest["output"]["kind"] == "probabilities"
    exported = jax.export.deserialize((out / "model.stablehlo").read_bytes())
    x = np.random.RandomState(0).standard_normal((3, 64, 64, 3)).astype(np.float32)
    p = np.asarray(exported.call(x))
    ref = np.asarray(jax.nn.softmax(m.apply(v, x, train=False)["out"], -1))
    assert p.shape == (3, 64, 64, 3) and np.allclose(p.sum(-1), 1, atol=1e-5)
    assert np.abs(p - ref).max() <= 1e-5
    assert sorted(os.listdir(tmp_path)) == ["export"]


class StridedWithGlobalPool(flax.linen.Module):
    """LR-ASPP's shape in miniature: stride 2 conv, ceil-mode pool, a global-pool gate, bilinear
    resize of the logits to the input."""
    @flax.linen.compact
    def __call__(self, x, train=False):
        size = x.shape[1:3]
        y = jax.nn.relu(flax.linen.Conv(8, (3, 3), strides=2, padding=1)(x))
        y = snn.max_pool2d(y, 2, 2, ceil_mode=True)
        y = y * jax.nn.sigmoid(y.mean(axis=(1, 2), keepdims=True))
        return {"out": snn.resize(flax.linen.Conv(3, (1, 1))(y), size)}


def test_a_resizing_model_exports_free_height_and_width(tmp_path):
    m = StridedWithGlobalPool()
    v = init_variables(m, (64, 64))
    manifest = E.export(ModelCard.from_meta({"model": "strided", "num_classes": 3}), v, str(tmp_path / "x"), model=m, example_size=(64, 64))
    assert manifest["input"]["symbolic_dims"] == ["batch", "height", "width"]
    assert manifest["input"]["constraints"] is None and manifest["input"]["shape"] == ["b", "h", "w", 3]
    exported = jax.export.deserialize((tmp_path / "x" / "model.stablehlo").read_bytes())
    x = np.random.RandomState(2).standard_normal((2, 37, 50, 3)).astype(np.float32)  # odd, not the traced 64x64
    ref = np.asarray(jax.jit(lambda x: m.apply(v, x, train=False)["out"])(x))
    y = np.asarray(exported.call(x))
    assert y.shape == ref.shape == (2, 37, 50, 3) and _rel(y, ref) <= 1e-5


@pytest.mark.onnx
def test_onnx_at_a_fixed_size_beside_a_symbolic_stablehlo(tmp_path):
    import onnxruntime as ort

    m = StridedWithGlobalPool()
    v = init_variables(m, (64, 64))
    manifest = E.export(ModelCard.from_meta({"model": "strided", "num_classes": 3}), v, str(tmp_path / "x"), model=m, onnx=True,
                        onnx_symbolic_hw=False, example_size=(40, 56))
    assert manifest["input"]["symbolic_dims"] == ["batch", "height", "width"]
    assert manifest["onnx"]["symbolic_dims"] == ["batch"] and manifest["checks"]["onnx_rel_max_abs_diff"] <= 1e-4
    sess = ort.InferenceSession(str(tmp_path / "x" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].shape[1:] == [40, 56, 3]
    # The test's own comparison, not the exporter's reported figure: onnxruntime at the fixed size, a batch
    # of 3 (the symbolic batch), against the model's apply.
    x = np.random.RandomState(4).standard_normal((3, 40, 56, 3)).astype(np.float32)
    y = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    ref = np.asarray(m.apply(v, x, train=False)["out"])
    assert y.shape == ref.shape == (3, 40, 56, 3) and _rel(y, ref) <= 1e-4


def test_onnx_missing_says_how_to_install(unet, tmp_path, monkeypatch):
    m, v = unet
    monkeypatch.setitem(sys.modules, "jax2onnx", None)  # import fails
    with pytest.raises(SegjaxError, match=r'pip install "segjax\[export\]"') as e:
        E.export(ModelCard.from_meta({"model": "unet", "num_classes": 5}), v, str(tmp_path / "x"), model=m, onnx=True)
    assert "\n" not in str(e.value) and not os.path.exists(tmp_path / "x")


@pytest.mark.onnx
def test_onnx_matches_jax_with_symbolic_batch_height_and_width(unet, tmp_path):
    import onnxruntime as ort

    m, v = unet
    out = tmp_path / "export"
    manifest = E.export(ModelCard.from_meta({"model": "unet", "num_classes": 5}), v, str(out), model=m, onnx=True, example_size=(64, 64))
    assert sorted(os.listdir(out)) == ["model.json", "model.onnx", "model.stablehlo"]
    assert manifest["onnx"]["file"] == "model.onnx" and manifest["checks"]["onnx_rel_max_abs_diff"] <= 1e-4
    # UNet pads each upsampled map to its skip (lax.pad, replayed through jnp.pad for jax2onnx).
    assert manifest["onnx"]["symbolic_dims"] == ["batch", "height", "width"] and "fallbacks" not in manifest["onnx"]
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    x = np.random.RandomState(3).standard_normal((3, 48, 80, 3)).astype(np.float32)  # not the traced size
    y = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    ref = np.asarray(m.apply(v, x, train=False)["out"])
    assert y.shape == ref.shape and _rel(y, ref) <= 1e-4


@pytest.mark.slow  # a UNet exported with symbolic H, W
def test_a_four_band_checkpoint_exports_with_four_input_channels(tmp_path):
    m = models.create("unet", num_classes=3, **UNET_KW)
    v = init_variables(m, (32, 32), channels=4)
    meta = {"model": "unet", "model_kwargs": UNET_KW, "num_classes": 3, "in_channels": 4,
            "mean": [0.5] * 4, "std": [0.25] * 4}
    manifest = E.export(ModelCard.from_meta(meta), v, str(tmp_path / "bands"), model=m, example_size=(32, 32))
    assert manifest["input"]["shape"][-1] == 4 and manifest["input"]["channels"] == "4 bands"
    exported = jax.export.deserialize((tmp_path / "bands" / "model.stablehlo").read_bytes())
    x = np.random.RandomState(1).standard_normal((2, 48, 32, 4)).astype(np.float32)
    assert _rel(exported.call(x), np.asarray(m.apply(v, x, train=False)["out"])) <= 1e-5
