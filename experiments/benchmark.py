"""Throughput of a segjax model, JAX beside PyTorch: train step and inference in images/s (issue 7).

    python experiments/benchmark.py --model lraspp_mobilenet_v3_large --size 64 --batch 2 --torch --out /tmp/bench

The train step is the whole thing: forward, loss (cross-entropy, 255 ignored, 0.5 x aux; BCE for
one-class saliency models, over every side output), backward, SGD with momentum and weight decay
(optax; PyTorch's coupled decay), BatchNorm statistics update, with the state donated under jit.
It is local on purpose: it measures the model, not `segjax.train`'s bookkeeping.

Timing: the first call is compiled ahead of time and reported as compile time; `--warmup` calls
follow and are not timed; then `--repeats` timings of `--iters` calls each, ending in
`jax.block_until_ready` (torch: `cuda.synchronize`); we report the median. FLOPs come from XLA's
cost analysis of the compiled step (a multiply-add counts 2; padding taps are not counted), the
achieved TFLOP/s from those over the median time, and MFU against `--peak-tflops` (by default the
dense peak of a known device kind for the compute dtype; TF32 for float32, as XLA and cuDNN use on
GPUs; none on CPU). PyTorch runs in the same process on the same kind of device: eager, and
torch.compile with `--torch-compile`; bf16 there is autocast + channels_last.

Load: every result records the processor (model name, AVX-512 or not) and the load averages before
and after the run. A run that starts while the machine is busy is refused: PyTorch's OpenMP threads
slow 6-12x under load and XLA's far less, which fakes a JAX win. Busy means, on the CPU backend, more
than 15% of the cores busy in a 1-second sample taken before the run (the 1-minute load average lags:
it stays ~1.5 for a minute after the previous benchmark ended), or a 1-minute load average above
`--max-load` when that is given; on an accelerator, where the host only launches kernels, a load
average above the host's core count (so one model's compile workers in a suite do not count against the next).
`--allow-busy` runs anyway and flags the result and its table rows BUSY.

`--conv native|dense|auto` sets SEGJAX_CONV (segjax's convolution lowering) before the models are
built, and the result records it as "conv_method". With `--out`, the JSON is written after the JAX
part and after each PyTorch variant and mode ("partial": true until the run completes), so a run killed by
a timeout keeps what it measured. On a GPU, JAX runs without preallocating the device's memory
(XLA_PYTHON_CLIENT_PREALLOCATE=false unless set), so PyTorch in the same process finds room.
"""
from __future__ import annotations

import argparse
import ast
import importlib.util
import inspect
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

# JAX and PyTorch share the device: JAX must not grab most of its memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from segjax import analysis, losses, models  # noqa: E402

# Dense peak TFLOP/s per device kind substring: (float32 as TF32, bfloat16).
PEAK_TFLOPS = {"H200": (494.7, 989.4), "H100": (494.7, 989.4), "A100": (156.0, 312.0), "L4": (60.0, 121.0)}
TORCHVISION_SEGMENTATION = ("fcn_resnet50", "fcn_resnet101", "deeplabv3_resnet50", "deeplabv3_resnet101",
                            "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large")
CONV_METHODS = ("native", "dense", "auto")  # SEGJAX_CONV values
CPU_MAX_LOAD = 0.5
CPU_MAX_BUSY = 0.15  # share of the cores other processes may use in the 1-second sample before a CPU run


# ------------------------------------------------------------------------------------------ timing

def time_calls(call, sync, warmup: int, iters: int, repeats: int) -> dict:
    """Median seconds per call over `repeats` runs of `iters` calls, after `warmup` untimed calls."""
    for _ in range(warmup):
        sync(call())
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            out = call()
        sync(out)
        runs.append((time.perf_counter() - start) / iters)
    return {"step_s": statistics.median(runs), "step_s_runs": runs}


def throughput(timing: dict, batch: int, flops: dict | None, peak: float | None) -> dict:
    """images/s, and per FLOP count ("xla", "model") the achieved TFLOP/s and MFU."""
    result = dict(timing, images_per_s=batch / timing["step_s"])
    for kind, count in (flops or {}).items():
        if count:
            result[f"tflops_{kind}"] = count / timing["step_s"] / 1e12
            result[f"mfu_{kind}"] = result[f"tflops_{kind}"] / peak if peak else None
    return result


# ------------------------------------------------------------------------------------------ JAX side

def make_jax_steps(model, tx, num_classes: int):
    # The training recipes' own loss: CE + 0.5 aux CE, or U-2-Net's fused + side BCE for saliency.
    total_loss = losses.make_loss("u2net_bce" if num_classes == 1 else "ce", num_classes)

    def loss_fn(params, batch_stats, x, y, rng):
        out, updates = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                   mutable=["batch_stats"], rngs={"dropout": rng})
        return total_loss(out, y), updates.get("batch_stats", batch_stats)

    def train_step(state, x, y):
        params, batch_stats, opt_state, rng = state
        rng, dropout_rng = jax.random.split(rng)
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats, x, y, dropout_rng)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), batch_stats, opt_state, rng), loss

    def infer_step(variables, x):
        return model.apply(variables, x, train=False)["out"]

    def predict(variables, x):
        logits = model.apply(variables, x, train=False)["out"]
        return (logits[..., 0] > 0).astype(jnp.int32) if num_classes == 1 else logits.argmax(-1).astype(jnp.int32)

    def eval_step(variables, x, y):
        from segjax.metrics import confusion_matrix  # imported only when asked for
        return confusion_matrix(predict(variables, x), y, max(num_classes, 2))

    return jax.jit(train_step, donate_argnums=0), jax.jit(infer_step), jax.jit(eval_step), jax.jit(predict)


def time_interleaved(calls: dict, sync, warmup: int, iters: int, repeats: int) -> dict:
    """time_calls for several calls, one repeat of each in turn, so a changing load hits them alike."""
    runs = {k: [] for k in calls}
    for r in range(repeats):
        for k, call in calls.items():
            runs[k] += time_calls(call, sync, warmup if r == 0 else 0, iters, 1)["step_s_runs"]
    return {k: {"step_s": statistics.median(v), "step_s_runs": v} for k, v in runs.items()}


def compile_timed(jitted, *args):
    """(compiled, compile seconds, {"xla": cost-analysis FLOPs, "model": 2 x conv/matmul MACs}).

    XLA's cost analysis counts the weight gradient of a depthwise conv as if it were dense (C times
    too many FLOPs on MobileNet's depthwise layers), so the train step's "xla" count overstates the
    work there; "model" counts the jaxpr's convolutions and matmuls as written (forward and backward).
    """
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    seconds = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
    return compiled, seconds, {"xla": float(cost.get("flops", 0.0)) or None,
                               "model": analysis.analytic_flops(jitted, *args)}


def bench_jax(args, model, x, y, peak) -> dict:
    variables = jax.jit(lambda key, x: model.init(key, x, train=False))(jax.random.key(0), x)
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    tx = optax.chain(optax.add_decayed_weights(args.weight_decay), optax.sgd(args.lr, momentum=0.9))
    train_step, infer_step, eval_step, predict_step = make_jax_steps(model, tx, args.num_classes)
    sync = jax.block_until_ready
    result = {"params": analysis.param_count(variables)}

    fwd, fwd_compile, fwd_flops = compile_timed(infer_step, variables, x)
    result["infer"] = dict(throughput(time_calls(lambda: fwd(variables, x), sync, args.warmup, args.iters, args.repeats),
                                      args.batch, fwd_flops, peak), compile_s=fwd_compile, flops_per_step=fwd_flops)

    if args.eval:
        try:
            ev, ev_compile, _ = compile_timed(eval_step, variables, x, y)
        except ImportError as e:
            result["eval"] = {"skipped": f"segjax.metrics unavailable ({e})"}
        else:  # the confusion matrix's share: the eval step beside the same forward + argmax without it
            pred, _, _ = compile_timed(predict_step, variables, x)
            timed = time_interleaved({"eval": lambda: ev(variables, x, y), "predict": lambda: pred(variables, x)},
                                     sync, args.warmup, args.iters, args.repeats)
            share = 1 - timed["predict"]["step_s"] / timed["eval"]["step_s"]
            result["eval"] = dict(throughput(timed["eval"], args.batch, None, None), compile_s=ev_compile,
                                  predict_step_s=timed["predict"]["step_s"], confusion_share=share)

    # The train step donates its state (sharing arrays with `variables`): everything else runs first.
    state = (params, batch_stats, tx.init(params), jax.random.key(1))
    step, step_compile, step_flops = compile_timed(train_step, state, x, y)
    holder = [state]

    def one_train_step():
        holder[0], loss = step(holder[0], x, y)  # state is donated: always pass the newest
        return loss

    timing = time_calls(one_train_step, sync, args.warmup, args.iters, args.repeats)
    loss = float(one_train_step())
    result["train"] = dict(throughput(timing, args.batch, step_flops, peak), compile_s=step_compile,
                           flops_per_step=step_flops, final_loss=loss)
    if not np.isfinite(loss):
        print(f"warning: train loss is {loss}", file=sys.stderr)

    return result


# ------------------------------------------------------------------------------------------ PyTorch side

def torch_reference(name: str, num_classes: int, model_kw: dict):
    """The equivalent PyTorch module, or a string saying why there is none."""
    import torchvision

    if name in TORCHVISION_SEGMENTATION:
        kw = {"aux_loss": True} if model_kw.get("aux") else {}
        return getattr(torchvision.models.segmentation, name)(weights=None, weights_backbone=None,
                                                              num_classes=num_classes, **kw)
    if name in torchvision.models.list_models(module=torchvision.models):
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    reference = Path(__file__).resolve().parent.parent / "tests" / "torch_reference.py"
    if reference.exists():  # optional local ports of the original UNet / U-2-Net code, for parity tests
        spec = importlib.util.spec_from_file_location("segjax_torch_reference", reference)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if hasattr(module, name):
            return getattr(module, name)(num_classes=num_classes, **model_kw)
    return f"no PyTorch reference for {name!r} (torchvision has none and tests/torch_reference.py lacks it)"


def bench_torch(args, flops: dict, peak, on_variant=None) -> dict:
    """PyTorch eager (and torch.compile): {"device", "eager": {"train", "infer"}, "compile": ...}.
    `on_variant(results)` is called after each variant's mode, so a caller can save what is measured so far."""
    import torch

    device = torch.device("cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu")
    net = torch_reference(args.model, args.num_classes, args.model_kw)
    if isinstance(net, str):
        return {"skipped": net}
    bf16 = args.dtype == "bfloat16"
    memory_format = torch.channels_last if bf16 and device.type == "cuda" else torch.contiguous_format
    net = net.to(device, memory_format=memory_format)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((args.batch, 3, *args.size), dtype=np.float32)).to(device)
    x = x.contiguous(memory_format=memory_format)
    y = torch.from_numpy(labels_for(args, rng)).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    sync = (lambda _: torch.cuda.synchronize()) if device.type == "cuda" else (lambda _: None)

    def logits_dict(out):
        return out if isinstance(out, dict) else {"out": out}

    def loss_of(out):
        def one(logits):
            logits = logits.float()
            if logits.shape[1] == 1:
                valid = (y != 255).float()
                per = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 0], (y == 1).float(), reduction="none")
                return (per * valid).sum() / valid.sum().clamp(min=1)
            return torch.nn.functional.cross_entropy(logits, y, ignore_index=255)
        out = logits_dict(out)
        loss = one(out["out"]) + (0.5 * one(out["aux"]) if "aux" in out else 0)
        return loss + sum(one(s) for s in out.get("sides", ()))

    results = {"device": str(device)}
    variants = [("eager", net)]
    if args.torch_compile:
        variants.append(("compile", torch.compile(net)))
    for label, module in variants:
        def train_call():
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = loss_of(module(x))
            loss.backward()
            opt.step()
            return loss

        def infer_call():
            with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                return logits_dict(module(x))["out"]

        entry = results[label] = {}
        for mode, call in (("infer", infer_call), ("train", train_call)):  # the cheaper compilation first
            module.train(mode == "train")
            start = time.perf_counter()
            sync(call())  # first call: includes torch.compile's compilation
            first = time.perf_counter() - start
            timing = time_calls(call, sync, args.warmup, args.iters, args.repeats)
            entry[mode] = dict(throughput(timing, args.batch, flops[mode], peak), first_call_s=first)
            if on_variant is not None:
                on_variant(results)
    return results


# ------------------------------------------------------------------------------------------ loader hook

def _sibling(name: str):
    """experiments/<name>.py as a module (experiments/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench_loader(args) -> dict:
    path = Path(__file__).resolve().parent / "bench_loader.py"
    if not path.exists():
        return {"skipped": "experiments/bench_loader.py not found"}
    spec = importlib.util.spec_from_file_location("bench_loader", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        fn = module.loader_throughput
    except Exception as e:  # an optional neighbour: report, don't fail the benchmark
        return {"skipped": f"bench_loader unusable: {type(e).__name__}: {e}"}
    crop = min(args.size)  # square training crops of the benchmarked size, from VOC-sized JPEGs
    offered = {"batch_size": args.batch, "crop_size": crop, "base_size": crop * 520 // 480,
               "num_images": max(8, args.batch * args.iters * args.repeats), "batches": args.iters * args.repeats}
    accepted = inspect.signature(fn).parameters
    kw = {k: v for k, v in offered.items() if k in accepted}
    try:
        out = fn(**kw)
    except Exception as e:
        return {"skipped": f"loader_throughput({', '.join(kw)}) failed: {type(e).__name__}: {e}"}
    return out if isinstance(out, dict) else {"images_per_s": float(out)}


# ------------------------------------------------------------------------------------------ report

def labels_for(args, rng) -> np.ndarray:
    labels = rng.integers(0, max(args.num_classes, 2), (args.batch, *args.size)).astype(np.int64)
    labels[:, : max(1, args.size[0] // 16)] = 255  # a void band, as VOC borders
    return labels


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="lraspp_mobilenet_v3_large", help=f"one of: {', '.join(models.names(None))}")
    p.add_argument("--model-kw", nargs="*", default=[], metavar="KEY=VALUE", help="builder kwargs, e.g. base_channels=16")
    p.add_argument("--size", nargs="+", type=int, default=[512, 512], help="H [W]")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--num-classes", type=int, default=21)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype; params stay fp32")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5, help="calls per timed repeat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: by device kind)")
    p.add_argument("--torch", action="store_true", help="also time the PyTorch reference, same process and device")
    p.add_argument("--torch-compile", action="store_true", help="also time torch.compile (slow to compile on CPU)")
    p.add_argument("--eval", action="store_true", help="also time the eval step with segjax.metrics.confusion_matrix")
    p.add_argument("--loader", action="store_true", help="also time experiments/bench_loader.py's loader_throughput")
    p.add_argument("--conv", choices=CONV_METHODS, default=None, metavar="METHOD",
                   help="segjax's convolution lowering, set as SEGJAX_CONV before the models are built: "
                        f"{'|'.join(CONV_METHODS)} (default: SEGJAX_CONV as set, else segjax's default, auto)")
    p.add_argument("--max-load", type=float, default=None, metavar="LOAD",
                   help="refuse to run when the 1-minute load average is above LOAD (default on the CPU backend: "
                        f"refuse when over {CPU_MAX_BUSY:.0%}% of the cores are busy in a 1-second sample; on an "
                        "accelerator: load above the host's core count)")
    p.add_argument("--allow-busy", action="store_true",
                   help="run even above --max-load; the result and its table rows are flagged BUSY")
    p.add_argument("--out", default=None, help="directory for the JSON and Markdown results")
    p.add_argument("--card", default=None,
                   help='device name for the README table (default: e.g. "NVIDIA H200", "CPU AMD EPYC, no AVX-512, 2 cores")')
    p.add_argument("--readme", default=None, metavar="README.md",
                   help="rewrite the table between <!-- bench-table --> markers from --results DIR's JSON files "
                        "(no benchmark runs)")
    p.add_argument("--results", default=None, metavar="DIR", help="JSON results for --readme (default: --out)")
    args = p.parse_args(argv)
    if len(args.size) not in (1, 2):
        p.error("--size takes H or H W")
    args.size = [args.size[0]] * 2 if len(args.size) == 1 else args.size
    args.model_kw = {k: ast.literal_eval(v) for k, v in (kv.split("=", 1) for kv in args.model_kw)}
    return args


def default_card(device) -> str:
    if device.platform == "cpu":
        cpu = processor()
        avx = {True: ", AVX-512", False: ", no AVX-512"}.get(cpu["avx512"], "")
        return f"CPU {cpu['model']}{avx}, {cpu['cores']} cores"
    return f"{device.device_kind} x{jax.device_count()}" if jax.device_count() > 1 else device.device_kind


def load_average():
    """The 1/5/15-minute load averages (None where the OS has none): CPU figures mean little without them."""
    try:
        return list(os.getloadavg())
    except (AttributeError, OSError):
        return None


def processor() -> dict:
    """The host CPU: {"model": name, "avx512": whether it has AVX-512 (the avx512f flag; None where
    unknown), "cores": logical cores}. Read from /proc/cpuinfo, else from the platform module."""
    model, avx512 = None, None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "Processor", "cpu model") and model is None:
                    model = value.strip()
                elif key in ("flags", "Features") and avx512 is None:
                    avx512 = "avx512f" in value.split()
                if model is not None and avx512 is not None:
                    break
    except OSError:
        pass
    return {"model": model or platform.processor() or platform.machine() or "unknown", "avx512": avx512,
            "cores": os.cpu_count()}


def conv_lowering() -> dict:
    """{"conv_method": SEGJAX_CONV as the models see it, "conv_plan": what segjax lowers each kind of conv to
    under it on this backend (when segjax.nn can say)}."""
    from segjax import nn as segjax_nn

    method = os.environ.get("SEGJAX_CONV") or "auto"
    plan = getattr(segjax_nn, "conv_plan", None)
    try:
        return {"conv_method": method, "conv_plan": plan(method) if plan else None}
    except ValueError as e:  # a value segjax does not know: the models would refuse it too
        raise SystemExit(f"error: {e}")


def max_load(args, platform_name: str) -> float:
    if args.max_load is not None:
        return args.max_load
    return CPU_MAX_LOAD if platform_name == "cpu" else float(os.cpu_count() or 1)


def cpu_busy(seconds: float = 1.0):
    """Fraction of all cores busy over the last `seconds` (from /proc/stat; None where there is none).

    The 1-minute load average lags by about a minute: after one benchmark ends it still reads ~1.5
    on an idle machine. This sample says whether anything is running now.
    """
    def sample():
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        return sum(fields), fields[3] + (fields[4] if len(fields) > 4 else 0)  # total, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return 1.0 - (idle1 - idle0) / max(total1 - total0, 1)


def busy_check(args, platform_name: str, load) -> dict:
    """{"max_load", "cpu_busy_before", "busy"}; raises SystemExit(2) with a one-line message when busy and
    not --allow-busy. Busy: the 1-minute load average above --max-load when given, or, by default on the CPU
    backend, more than CPU_MAX_BUSY of the cores busy in a 1-second sample (whatever the lagging average says)."""
    limit = max_load(args, platform_name)
    now = cpu_busy() if platform_name == "cpu" else None
    if args.max_load is not None or now is None:
        busy, why = bool(load) and load[0] > limit, f"the 1-minute load average is {load[0]:.2f}, above --max-load {limit:g}" if load else ""
    else:
        busy, why = now > CPU_MAX_BUSY, f"{now:.0%} of the cores were busy in the last second (limit {CPU_MAX_BUSY:.0%})"
    if busy and not args.allow_busy:
        print(f"error: refusing to benchmark: {why} ({os.cpu_count()} cores); PyTorch's OpenMP threads slow 6-12x "
              "under load and XLA's far less, which fakes a JAX win: wait for an idle machine, or pass --allow-busy "
              "(results flagged BUSY)", file=sys.stderr)
        raise SystemExit(2)
    if busy:
        print(f"warning: BUSY: {why}; this run's ratios to PyTorch are not trustworthy", file=sys.stderr)
    return {"max_load": limit, "cpu_busy_before": now, "busy": busy}


def default_peak(device_kind: str, dtype: str):
    for key, (fp32, bf16) in PEAK_TFLOPS.items():
        if key in device_kind:
            return bf16 if dtype == "bfloat16" else fp32
    return None


def main(argv=None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.readme:
        folder = Path(args.results or args.out or ".")
        results = [json.loads(f.read_text()) for f in sorted(folder.glob("*.json"))]
        if not results:
            p_error = f"no benchmark results (*.json) in {folder}; run with --out {folder} first"
            raise SystemExit(p_error)
        table = _sibling("bench_table").update_readme(Path(args.readme), results, str(folder))
        print(table)
        return {"readme": args.readme, "results": len(results)}
    device = jax.devices()[0]
    load_before = load_average()
    busy = busy_check(args, device.platform, load_before)
    previous_conv = os.environ.get("SEGJAX_CONV")
    if args.conv is not None:  # before any model is built; restored when main returns (tests call it in-process)
        os.environ["SEGJAX_CONV"] = args.conv
    try:
        return run(args, device, load_before, busy)
    finally:
        if args.conv is not None:
            if previous_conv is None:
                os.environ.pop("SEGJAX_CONV", None)
            else:
                os.environ["SEGJAX_CONV"] = previous_conv


def run(args, device, load_before, busy: dict) -> dict:
    peak = args.peak_tflops if args.peak_tflops is not None else default_peak(device.device_kind, args.dtype)
    result = {"model": args.model, "model_kw": {k: repr(v) for k, v in args.model_kw.items()},
              "size": list(args.size), "batch": args.batch, "num_classes": args.num_classes, "dtype": args.dtype,
              "device": device.device_kind, "platform": device.platform, "peak_tflops": peak,
              "card": args.card or default_card(device), "processor": processor(),
              **conv_lowering(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
              "load_average_before": load_before, **busy}
    # Builder options name the file too: unet and unet bilinear=True must not overwrite each other.
    options = "".join(f"-{k}={v}" for k, v in sorted(args.model_kw.items()))
    stem = f"{args.model}{options}_{args.size[0]}x{args.size[1]}_b{args.batch}_{args.dtype}_{device.platform}"
    out = Path(args.out) if args.out else None

    def save(partial: bool = True):
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            (out / f"{stem}.json").write_text(json.dumps(dict(result, partial=True) if partial else result, indent=2))

    kw = dict(args.model_kw, **({"dtype": jnp.bfloat16} if args.dtype == "bfloat16" else {}))
    model = models.create(args.model, num_classes=args.num_classes, **kw)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((args.batch, *args.size, 3), dtype=np.float32))
    y = jnp.asarray(labels_for(args, rng).astype(np.int32))

    jax_result = bench_jax(args, model, x, y, peak)
    result.update(params=jax_result.pop("params"),
                  forward_gflop_per_image=(jax_result["infer"]["flops_per_step"]["xla"] or 0) / args.batch / 1e9,
                  jax=jax_result, load_average=load_average())
    save()
    if args.torch:
        flops = {m: jax_result[m]["flops_per_step"] for m in ("train", "infer")}

        def on_variant(torch_result):
            result.update(torch=torch_result, load_average=load_average())
            save()

        try:
            result["torch"] = bench_torch(args, flops, peak, on_variant)
        except ImportError as e:
            result["torch"] = {"skipped": f"torch unavailable ({e})"}
        ratio = {}
        for label in ("eager", "compile"):
            side = result["torch"].get(label, {})
            ratio.update({f"{m}_{label}": jax_result[m]["images_per_s"] / side[m]["images_per_s"]
                          for m in ("train", "infer") if m in side})
        if ratio:
            result["ratio"] = ratio
    if args.loader:
        result["loader"] = bench_loader(args)
    result["load_average_after"] = result["load_average"] = load_average()  # "load_average": as the run finished

    table = _sibling("bench_table").markdown(result)
    print(table)
    if out is not None:
        save(partial=False)
        (out / f"{stem}.md").write_text(table)
        print(f"wrote {out / stem}.json and .md")
    return result


if __name__ == "__main__":
    main()
