"""experiments/benchmark.py runs end to end on CPU at a tiny size and writes what it promises."""
import importlib.util
import json
import math
import os
import re
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


@pytest.mark.e2e  # the benchmark end to end, with its PyTorch side and loader
def test_benchmark_smoke(tmp_path, capsys, monkeypatch):
    bench = load_benchmark()
    name = registered("unet")
    model_kw = ["--model-kw", "base_channels=4"] if name == "unet" else []
    monkeypatch.setenv("SEGJAX_CONV", "auto")
    # builder options are part of the file name (unet and unet bilinear=True must not overwrite each other)
    stem = f"{name}{'-base_channels=4' if model_kw else ''}_32x48_b2_float32_cpu"
    on_disk = []  # the JSON as bench_torch starts and after each variant's mode: saved as it goes, "partial"
    real_bench_torch = bench.bench_torch

    def bench_torch(args, flops, peak, on_variant=None):
        on_disk.append(json.loads((tmp_path / f"{stem}.json").read_text()))

        def saved(results):
            on_variant(results)
            on_disk.append(json.loads((tmp_path / f"{stem}.json").read_text()))
        return real_bench_torch(args, flops, peak, saved)

    monkeypatch.setattr(bench, "bench_torch", bench_torch)
    # --max-load -1: any load is "busy", so --allow-busy's path and the BUSY flags run whatever the CI load
    result = bench.main(["--model", name, *model_kw, "--size", "32", "48", "--batch", "2", "--num-classes", "3",
                         "--warmup", "0", "--iters", "1", "--repeats", "3", "--torch", "--eval", "--loader",
                         "--conv", "native", "--max-load", "-1", "--allow-busy", "--out", str(tmp_path)])
    captured = capsys.readouterr()
    printed = captured.out
    assert os.environ["SEGJAX_CONV"] == "auto"  # --conv is set for the run only, then restored

    written = json.loads((tmp_path / f"{stem}.json").read_text())
    assert written == json.loads(json.dumps(result)) and "partial" not in written
    assert [d["partial"] for d in on_disk] == [True] * 3 and "torch" not in on_disk[0]
    assert on_disk[0]["jax"]["train"]["step_s"] == written["jax"]["train"]["step_s"]
    assert list(on_disk[1]["torch"]["eager"]) == ["infer"] and on_disk[2]["torch"]["eager"] == written["torch"]["eager"]

    # conditions of the run: processor, load before/after, busy flag, convolution lowering
    cpu = written["processor"]
    assert isinstance(cpu["model"], str) and cpu["model"] and cpu["cores"] == os.cpu_count()
    if Path("/proc/cpuinfo").exists():
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
        assert cpu["avx512"] is ("avx512f" in flags.split())
    for key in ("load_average_before", "load_average_after"):
        assert len(written[key]) == 3 and all(v >= 0 for v in written[key])
    assert written["load_average"] == written["load_average_after"]
    assert written["busy"] is True and written["max_load"] == -1 and "BUSY" in captured.err
    assert written["conv_method"] == "native"
    assert written["conv_plan"] is None or set(written["conv_plan"].values()) == {"native"}
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

    # UNet has a PyTorch twin (tests/torch_reference.py) and experiments/bench_loader.py is committed: both
    # must have run. A failure inside either is written as {"skipped": ...} and would fail here.
    assert not isinstance(bench.torch_reference(name, 3, {}), str)
    assert "skipped" not in written["torch"], written["torch"]
    for mode in ("train", "infer"):
        check_timing(written["torch"]["eager"][mode], 2, 3)
        assert written["ratio"][f"{mode}_eager"] > 0
    loader = written["loader"]
    assert "skipped" not in loader, loader
    assert any(k.endswith("images_per_s") and loader[k] > 0 for k in loader), loader

    table = (tmp_path / f"{stem}.md").read_text()
    assert table in printed and "| jax | train |" in table and "| jax | eval |" in table
    assert "**BUSY**" in table and "SEGJAX_CONV=native" in table and cpu["model"] in table
    assert f"{written['load_average_before'][0]:.2f} before, {written['load_average_after'][0]:.2f} after" in table
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
    assert row.endswith("**BUSY** |") and f"**BUSY**: {name} started on a busy machine" in text
    assert "as each run started" in text and "SEGJAX_CONV: native." in text
    readme.write_text("no markers\n")
    with pytest.raises(Exception, match="bench-table"):
        bench.main(["--readme", str(readme), "--results", str(tmp_path)])


@pytest.mark.slow
def test_benchmark_against_torchvision(tmp_path):
    bench = load_benchmark()
    name = registered("lraspp_mobilenet_v3_large", "fcn_resnet50")
    assert name in bench.TORCHVISION_SEGMENTATION
    result = bench.main(["--model", name, "--size", "32", "--batch", "1", "--num-classes", "3", "--warmup", "0",
                         "--iters", "1", "--repeats", "1", "--torch", "--peak-tflops", "1.5", "--allow-busy"])
    jax_side, torch_side = result["jax"], result["torch"]
    assert torch_side["device"] == "cpu"
    for mode in ("train", "infer"):
        check_timing(torch_side["eager"][mode], 1, 1)
        assert math.isclose(result["ratio"][f"{mode}_eager"],
                            jax_side[mode]["images_per_s"] / torch_side["eager"][mode]["images_per_s"])
        assert math.isclose(jax_side[mode]["mfu_model"], jax_side[mode]["tflops_model"] / 1.5)


def test_busy_machine_is_refused_in_one_line(tmp_path, capsys):
    """Above --max-load the run stops before building anything: exit status 2, one line naming the load
    and why (PyTorch's OpenMP threads under load fake a JAX win), nothing written."""
    bench = load_benchmark()
    with pytest.raises(SystemExit) as stopped:
        bench.main(["--model", "unet", "--size", "16", "--batch", "1", "--max-load", "-1", "--out", str(tmp_path)])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: refusing")
    assert re.search(r"the 1-minute load average is \d+\.\d\d, above --max-load -1 ", err), err
    assert "6-12x" in err and "OpenMP" in err and "--allow-busy" in err
    assert not list(tmp_path.iterdir())


def test_busy_threshold_and_conv_method(monkeypatch):
    bench = load_benchmark()
    args = bench.parse_args([])
    assert args.max_load is None and not args.allow_busy and args.conv is None
    # CPU, by default: cores busy now (a 1-second sample), not the lagging 1-minute average
    monkeypatch.setattr(bench, "cpu_busy", lambda seconds=1.0: 0.05)
    assert bench.busy_check(args, "cpu", [1.9, 3.0, 3.0]) == {"max_load": 0.5, "cpu_busy_before": 0.05, "busy": False}
    monkeypatch.setattr(bench, "cpu_busy", lambda seconds=1.0: 0.6)
    with pytest.raises(SystemExit):
        bench.busy_check(args, "cpu", [0.0, 0.0, 0.0])
    # --max-load: the load-average rule, whatever the sample says
    monkeypatch.setattr(bench, "cpu_busy", lambda seconds=1.0: 0.0)
    with pytest.raises(SystemExit):
        bench.busy_check(bench.parse_args(["--max-load", "0.5"]), "cpu", [0.6, 0.0, 0.0])
    assert bench.busy_check(bench.parse_args(["--max-load", "0.5"]), "cpu", [0.4, 0.0, 0.0])["busy"] is False
    # on an accelerator the host only launches kernels: the default allows a load up to its core count
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert bench.busy_check(args, "gpu", [15.9, 0, 0]) == {"max_load": 16.0, "cpu_busy_before": None, "busy": False}
    assert bench.busy_check(bench.parse_args(["--allow-busy"]), "gpu", [16.1, 0, 0]) == {
        "max_load": 16.0, "cpu_busy_before": None, "busy": True}
    monkeypatch.setattr(bench, "cpu_busy", lambda seconds=1.0: None)
    assert bench.busy_check(args, "cpu", None)["busy"] is False  # neither /proc/stat nor a load average: nothing to refuse
    with pytest.raises(SystemExit):
        bench.parse_args(["--conv", "fast"])

    # --conv is in the environment when the model is built (segjax reads SEGJAX_CONV), and only then
    monkeypatch.delenv("SEGJAX_CONV", raising=False)
    seen = []

    def create(name, **kw):
        seen.append(os.environ.get("SEGJAX_CONV"))
        raise KeyboardInterrupt  # stop before any compilation

    monkeypatch.setattr(bench.models, "create", create)
    for method in bench.CONV_METHODS:
        with pytest.raises(KeyboardInterrupt):
            bench.main(["--model", "unet", "--size", "16", "--batch", "1", "--conv", method, "--allow-busy"])
    assert seen == list(bench.CONV_METHODS) and "SEGJAX_CONV" not in os.environ


def test_new_twins_are_found_by_name():
    bench = load_benchmark()
    net = bench.torch_reference("deeplabv3plus_resnet50", 2, {"aux": True})
    assert not isinstance(net, str) and net.aux is not None
    assert "no PyTorch reference" in bench.torch_reference("not_a_model", 2, {})


def test_known_device_peaks():
    bench = load_benchmark()
    assert bench.default_peak("NVIDIA H100 80GB HBM3", "bfloat16") == 989.4
    assert bench.default_peak("NVIDIA H100 80GB HBM3", "float32") == 494.7
    assert bench.default_peak("cpu", "float32") is None


def test_normalize_table_matches_arithmetic():
    """The table lookup (the loader's speed-up) equals (x / 255 - mean) / std, computed here directly in
    float64, to float32 rounding; on a flipped view, with a row count that does not divide the height, for
    other mean/std. Every one of the 256 values is looked up."""
    import numpy as np

    from segjax.data import transforms

    image = np.arange(37 * 21 * 3).reshape(37, 21, 3).astype(np.uint8)  # 0..255, each many times, per channel
    assert all(len(np.unique(image[..., c])) == 256 for c in range(3))
    for mean, std in ((transforms.IMAGENET_MEAN, transforms.IMAGENET_STD), ((0.5, 0.25, 0.0), (0.5, 2.0, 1.0))):
        for view in (image, image[:, ::-1], image[::-1]):
            expected = (view.astype(np.float64) / 255.0 - np.asarray(mean, np.float64)) / np.asarray(std, np.float64)
            got = transforms.normalize(view, mean, std, rows=5)
            assert got.dtype == np.float32 and got.flags.c_contiguous and got.shape == view.shape
            # float32 keeps 24 bits: a few units in the last place of the largest value
            np.testing.assert_allclose(got, expected, rtol=0, atol=4 * np.finfo(np.float32).eps * np.abs(expected).max())


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


@pytest.mark.e2e  # two training runs
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
