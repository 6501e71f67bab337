"""experiments/benchmark.py runs end to end on CPU at a tiny size and writes what it promises."""
import importlib.util
import json
import math
import statistics
from pathlib import Path

import pytest

from segjax import models

BENCHMARK = Path(__file__).resolve().parent.parent / "experiments" / "benchmark.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("segjax_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def registered(*candidates):
    for name in (*candidates, *models.names()):
        if name in models.names():
            return name
    raise AssertionError(f"none of {candidates} is registered")


def check_timing(r, batch, repeats):
    assert len(r["step_s_runs"]) == repeats and r["step_s"] == statistics.median(r["step_s_runs"])
    assert math.isclose(r["images_per_s"], batch / r["step_s"])


def test_benchmark_smoke(tmp_path, capsys):
    bench = load_benchmark()
    name = registered("unet")
    model_kw = ["--model-kw", "base_channels=4"] if name == "unet" else []
    result = bench.main(["--model", name, *model_kw, "--size", "32", "48", "--batch", "2", "--num-classes", "3",
                         "--warmup", "0", "--iters", "1", "--repeats", "3", "--torch", "--eval", "--loader",
                         "--out", str(tmp_path)])
    printed = capsys.readouterr().out

    stem = f"{name}_32x48_b2_float32_cpu"
    written = json.loads((tmp_path / f"{stem}.json").read_text())
    assert written == json.loads(json.dumps(result))
    assert written["model"] == name and written["size"] == [32, 48] and written["batch"] == 2
    assert written["params"] > 0 and written["forward_gflop_per_image"] > 0

    for mode in ("train", "infer", "eval"):
        check_timing(written["jax"][mode], 2, 3)
        assert written["jax"][mode]["compile_s"] > 0
    train, infer = written["jax"]["train"], written["jax"]["infer"]
    assert math.isfinite(train["final_loss"]) and train["final_loss"] > 0
    # A train step does the forward's work and a backward on top, by either count.
    for kind in ("xla", "model"):
        assert train["flops_per_step"][kind] > 2 * infer["flops_per_step"][kind] > 0
        assert math.isclose(train[f"tflops_{kind}"], train["flops_per_step"][kind] / train["step_s"] / 1e12)
    assert train["mfu_xla"] is None  # no known peak for a CPU unless --peak-tflops is given

    if not isinstance(bench.torch_reference(name, 3, {}), str):  # torchvision or tests/torch_reference.py
        assert "eager" in written["torch"] and written["ratio"]["train_eager"] > 0
    else:
        assert "no PyTorch reference" in written["torch"]["skipped"]
    loader = written["loader"]
    assert "skipped" in loader or any(k.endswith("images_per_s") for k in loader), loader

    table = (tmp_path / f"{stem}.md").read_text()
    assert table in printed and "| jax | train |" in table and "| jax | eval |" in table
    ev = written["jax"]["eval"]  # the share itself is noise at this size; its definition is checked
    assert math.isclose(ev["confusion_share"], 1 - ev["predict_step_s"] / ev["step_s"]) and "confusion matrix:" in table

    # --readme rewrites only the marked block, from the JSON results
    readme = tmp_path / "README.md"
    readme.write_text("# title\n\n<!-- bench-table -->\nold table\n<!-- /bench-table -->\n\ntail\n")
    bench.main(["--readme", str(readme), "--results", str(tmp_path)])
    text = readme.read_text()
    assert text.startswith("# title\n\n<!-- bench-table -->\n") and text.endswith("<!-- /bench-table -->\n\ntail\n")
    assert "old table" not in text and "GPU figures are unmeasured" in text
    row = next(line for line in text.splitlines() if line.startswith(f"| {name} "))
    assert f"| {train['images_per_s']:.2f} | {infer['images_per_s']:.2f} |" in row and written["card"] in row
    readme.write_text("no markers\n")
    with pytest.raises(Exception, match="bench-table"):
        bench.main(["--readme", str(readme), "--results", str(tmp_path)])


@pytest.mark.slow
def test_benchmark_against_torchvision(tmp_path):
    bench = load_benchmark()
    name = registered("lraspp_mobilenet_v3_large", "fcn_resnet50")
    assert name in bench.TORCHVISION_SEGMENTATION
    result = bench.main(["--model", name, "--size", "32", "--batch", "1", "--num-classes", "3", "--warmup", "0",
                         "--iters", "1", "--repeats", "1", "--torch", "--peak-tflops", "1.5"])
    jax_side, torch_side = result["jax"], result["torch"]
    assert torch_side["device"] == "cpu"
    for mode in ("train", "infer"):
        check_timing(torch_side["eager"][mode], 1, 1)
        assert math.isclose(result["ratio"][f"{mode}_eager"],
                            jax_side[mode]["images_per_s"] / torch_side["eager"][mode]["images_per_s"])
        assert math.isclose(jax_side[mode]["mfu_model"], jax_side[mode]["tflops_model"] / 1.5)


def test_known_device_peaks():
    bench = load_benchmark()
    assert bench.default_peak("NVIDIA H100 80GB HBM3", "bfloat16") == 989.4
    assert bench.default_peak("NVIDIA H100 80GB HBM3", "float32") == 494.7
    assert bench.default_peak("cpu", "float32") is None


def test_normalize_table_matches_arithmetic():
    """The table lookup (the loader's speed-up) is bit-identical to (x / 255 - mean) / std in float32,
    on a flipped view, with a row count that does not divide the height, for other mean/std."""
    import numpy as np

    from segjax.data import transforms

    image = np.random.default_rng(0).integers(0, 256, (37, 21, 3), dtype=np.uint8)
    image[0, 0], image[0, 1] = 0, 255
    for mean, std in ((transforms.IMAGENET_MEAN, transforms.IMAGENET_STD), ((0.5, 0.25, 0.0), (0.5, 2.0, 1.0))):
        for view in (image, image[:, ::-1], image[::-1]):
            expected = (view.astype(np.float32) * (1.0 / (255.0 * np.asarray(std, np.float32))).astype(np.float32)
                        - (np.asarray(mean, np.float32) / np.asarray(std, np.float32)).astype(np.float32))
            got = transforms.normalize(view, mean, std, rows=5)
            assert got.dtype == np.float32 and got.flags.c_contiguous and np.array_equal(got, expected)


def test_device_prefetch_keeps_the_stream_and_resumes_exactly(tmp_path):
    """The trainer's look-ahead changes no batch, and its state is that of the first unconsumed batch."""
    import numpy as np

    from segjax import data
    from segjax.data.pipeline import DevicePrefetch

    data.prepare("synthetic", str(tmp_path), image_size=16, num_train=12, num_val=1, progress=False)
    source = data.open_source("synthetic", "train", str(tmp_path))

    def loader():
        return iter(data.make_train_loader(source, batch_size=2, crop_size=8, base_size=16, shard_index=0,
                                           shard_count=1, read_threads=1))

    plain = [next(it) for it in [loader()] for _ in range(9)]
    placed = []
    ahead = DevicePrefetch(loader(), lambda b: placed.append(1) or {k: b[k] + 0 for k in ("image", "mask")}, depth=2)
    got = [next(ahead) for _ in range(4)]
    assert len(placed) == 6  # 4 consumed + 2 ahead
    state = ahead.get_state()
    resumed = DevicePrefetch(loader(), lambda b: b, depth=2)
    resumed.set_state(state)
    got += [next(resumed) for _ in range(5)]  # crosses the 6-batch epoch boundary
    for a, b in zip(plain, got, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["mask"], b["mask"])


@pytest.mark.parametrize("name, kw", [("unet", dict(bilinear=True, base_channels=8)), ("unet", dict(base_channels=8)),
                                      ("u2netp", {}), ("u2netp", dict(conv_bias=False))])
def test_torch_twins_match_segjax(name, kw):
    """tests/torch_reference.py's twins have segjax's parameter count and output shapes (odd input size)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import torch_reference

    model = models.create(name, num_classes=2, **kw)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 37, 45, 3)), train=False))
    twin = getattr(torch_reference, name)(num_classes=2, **kw).eval()
    assert sum(p.numel() for p in twin.parameters()) == sum(
        int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes["params"]))
    with torch.no_grad():
        out = twin(torch.zeros(1, 3, 37, 45))
    assert out["out"].shape == (1, 2, 37, 45)
    assert len(out.get("sides", ())) == (6 if name.startswith("u2net") else 0)


def test_uint8_batches_normalised_on_device_match_the_host_path(tmp_path):
    """make_train_loader(uint8_images=True) + normalize_on_device gives the float32 batches (to rounding),
    and a tiny training with config.uint8_batches ends where the float32 one does."""
    import jax
    import numpy as np

    import tiny_model
    from segjax import checkpoint, data
    from segjax import config as config_lib
    from segjax.data.pipeline import normalize_on_device
    from segjax.train import train_and_evaluate

    data.prepare("synthetic", str(tmp_path / "data"), image_size=24, num_train=16, num_val=8, progress=False)
    source = data.open_source("synthetic", "train", str(tmp_path / "data"))
    kw = dict(batch_size=4, crop_size=16, base_size=24, shard_index=0, shard_count=1, read_threads=1)
    floats, uint8s = (iter(data.make_train_loader(source, uint8_images=u, **kw)) for u in (False, True))
    normalize = jax.jit(normalize_on_device)
    for _ in range(3):
        a, b = next(floats), next(uint8s)
        assert b["image"].dtype == np.uint8 and a["image"].dtype == np.float32
        np.testing.assert_array_equal(a["mask"], b["mask"])
        np.testing.assert_allclose(np.asarray(normalize(b)["image"]), a["image"], rtol=0, atol=1e-6)

    def run(uint8, workdir):
        c = config_lib.load_config("synthetic_unet")
        c.model, c.model_kwargs = tiny_model.NAME, {"features": 4}
        c.data_dir, c.data_options = str(tmp_path / "data"), {"image_size": 24, "num_train": 16, "num_val": 8}
        c.base_size, c.crop_size, c.batch_size, c.eval_batch_size = 24, 16, 4, 8
        c.num_steps, c.eval_every_steps, c.log_every_steps, c.uint8_batches = 4, 4, 2, uint8
        train_and_evaluate(c, str(tmp_path / workdir))
        return jax.tree_util.tree_leaves(checkpoint.load_variables(str(tmp_path / workdir / "checkpoints" / "4"))[0])

    for x, y in zip(run(False, "f32"), run(True, "u8"), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5)
