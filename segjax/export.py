"""Deployable inference artifacts: a serialised `jax.export` (StableHLO) module, optional ONNX, and model.json.

`export(card, variables, out_dir)` writes into `out_dir`:

- `model.stablehlo`: `jax.export.export(jax.jit(f)).serialize()` of `f(x) = model.apply(variables, x)["out"]`
  (or its probabilities), weights baked in. Input: (N, H, W, 3) float32 RGB images scaled to 0-1 and
  normalised with model.json's mean/std. Output: (N, H, W, C) float32 at the input's H, W. The batch is
  symbolic; H and W are symbolic too where the model allows it (`symbolic=True`), otherwise fixed at
  `example_size`. It runs with jax alone: `jax.export.deserialize(data).call(x)` (lowered for CPU and
  CUDA by default).
- `model.onnx` (with `onnx=True`): the same function through jax2onnx, checked with onnxruntime.
- `model.json`: the model's card (`segjax.card.ModelCard.from_meta` reads it back) and what a runtime
  needs besides the graph: normalisation, layout, output kind, class names, palette, output stride,
  which dimensions are symbolic (and their constraints), versions.

Everything is written into a temporary folder beside `out_dir` and moved into place at the end, so a
failure leaves no partial export. Convolutions are traced with segjax's plain `lax` lowering
(`nn.conv_lowering("native")`): the CPU rewrites depend on concrete sizes and on the host backend.

Symbolic H and W: segjax's resize and its pooling/crop arithmetic build index tables from concrete
sizes, so most models cannot take free H, W. `export` tries free H, W first, then H, W constrained
to multiples of the model's output stride (`h = k * stride`), and otherwise raises a SegjaxError that
names the culprit and points at `symbolic=False` (fixed H, W; the batch stays symbolic).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import traceback
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from segjax import __version__, analysis, tasks
from segjax.card import ModelCard
from segjax.files import jsonable
from segjax.errors import SegjaxError

FORMAT = "segjax-export"
FORMAT_VERSION = 1
STABLEHLO_FILE = "model.stablehlo"
ONNX_FILE = "model.onnx"
MANIFEST_FILE = "model.json"
DEFAULT_PLATFORMS = ("cpu", "cuda")
ONNX_TOLERANCE = 1e-4  # max |onnxruntime - jax| relative to max |jax|
STABLEHLO_TOLERANCE = 1e-5  # the same for the deserialised artifact against segjax's own apply
INSTALL_HINT = 'pip install "segjax[export]"'


# ------------------------------------------------------------------------------------- tracing

def _output_stride(model, variables, example_size, num_classes, channels: int = 3) -> dict:
    shapes = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), variables)
    try:
        return analysis.output_stride(model, example_size, variables=shapes, num_classes=num_classes,
                                      channels=channels)
    except Exception:  # a model whose intermediates cannot be probed: leave the stride out
        return {"feature": None, "logits": None}


def _where(e: BaseException) -> str:
    """file:line of the innermost segjax frame of `e` (where a model needed a concrete size)."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if f"{os.sep}segjax{os.sep}" in f.filename
              and not f.filename.endswith(f"{os.sep}export.py")]
    if not frames:
        return ""
    f = frames[-1]
    return f" at {os.path.join(os.path.basename(os.path.dirname(f.filename)), os.path.basename(f.filename))}:{f.lineno}"


def _reason(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return (first[:160] + "...") if len(first) > 160 else first


def _inference_fn(model, variables, task: tasks.Task, probabilities: bool, barrier: bool = True):
    """x -> logits (or probabilities) with the weights baked in. `barrier` keeps XLA from constant-folding
    through the baked weights: with them folded, XLA:CPU returned NaN / 1e17 for fcn32s_vgg16 (whose
    zero-initialised score layer must give exactly 0), where the same function with the weights as
    arguments gives 0. jax2onnx has no optimization_barrier, so the ONNX trace goes without it."""
    def fn(x):
        weights = jax.lax.optimization_barrier(variables) if barrier else variables
        logits = model.apply(weights, x, train=False)["out"]
        return task.activate(logits) if probabilities else logits
    return fn


def _spec(shape: str) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(jax.export.symbolic_shape(shape), jnp.float32)


def _symbolic_attempts(stride, example_size, channels: int = 3) -> list[tuple[str, str | None]]:
    """(shape spec, constraint text) to try in order: free H, W, then multiples of the output stride."""
    attempts = [(f"b, h, w, {channels}", None)]
    strides = stride if isinstance(stride, (tuple, list)) else (stride, stride)
    if all(isinstance(s, int) and s > 1 for s in strides):
        sh, sw = strides
        attempts.append((f"b, {sh}*h, {sw}*w, {channels}", f"H a multiple of {sh}, W a multiple of {sw}"))
    return attempts


def _trace(fn, spec: jax.ShapeDtypeStruct, platforms):
    from segjax import nn as snn
    with snn.conv_lowering("native"):
        return jax.export.export(jax.jit(fn), platforms=tuple(platforms))(spec)


def _rel_diff(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


# ------------------------------------------------------------------------------------- ONNX

def _onnx_modules():
    try:
        import jax2onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except Exception:
        raise SegjaxError(f"ONNX export needs jax2onnx and onnxruntime, which are not installed; {INSTALL_HINT}") \
            from None
    return jax2onnx, onnxruntime


def require_onnx() -> None:
    """The one-line install hint, for callers that check before loading or writing anything."""
    _onnx_modules()


def _to_onnx(fn, spec: jax.ShapeDtypeStruct, name: str):
    """ONNX ModelProto of `fn` at `spec`.

    The function is traced to a jaxpr here, before jax2onnx runs, and jax2onnx converts the replayed
    jaxpr: jax2onnx swaps flax.linen/jax.numpy functions for its own during its trace, and some of those
    stand-ins do not accept every call segjax makes (e.g. `flax.linen.max_pool` with positional
    window/strides). Convolutions use the plain lax lowering (ONNX Conv).
    """
    jax2onnx, _ = _onnx_modules()
    from segjax import nn as snn
    with snn.conv_lowering("native"):
        closed = jax.make_jaxpr(fn)(spec)

    def replay(x):
        return analysis.replay_jaxpr(closed.jaxpr, closed.consts, [x], _for_onnx)[0]

    return jax2onnx.to_onnx(replay, [spec], model_name=name, input_names=["image"],
                            output_names=["probabilities" if "prob" in name else "logits"])


def _max_pool_3d(x, window, strides, padding):
    """An NHWC (1, kh, kw, 1) window max as a 3-D (N*C, H, W) one: jax2onnx emits lax's reduce_window_max
    as an ONNX MaxPool with one kernel dimension per operand dimension, and onnxruntime pools over at
    most three; the 2-D pool of the images does not change."""
    n, h, w, c = x.shape
    y = jnp.transpose(x, (0, 3, 1, 2)).reshape(n * c, h, w)
    y = jax.lax.reduce_window(y, -jnp.inf, jax.lax.max, (1, window[1], window[2]), (1, strides[1], strides[2]),
                              ((0, 0), tuple(padding[1]), tuple(padding[2])))
    return jnp.transpose(y.reshape(n, c, *y.shape[1:]), (0, 2, 3, 1))


def _for_onnx(eqn, invals):
    """jax2onnx stand-ins for the equations it converts wrongly; None for any other equation.

    - an NHWC max pool (window and stride 1 on N and C, no dilation or N/C padding) is replayed as a
      3-D pool (see `_max_pool_3d`);
    - `lax.pad` with a constant value and no interior padding goes through `jnp.pad`, which jax2onnx
      replaces with its own op during its trace: its `lax.pad` lowering calls int() on symbolic
      dimensions, so FCN-VGG (pad 100) and UNet (pad to the skip) would lose their symbolic H, W and
      batch. jnp.pad's padding value reaches lax.pad through a convert_element_type of a literal,
      which is folded here so that the value stays a constant.
    """
    p = eqn.params
    if (eqn.primitive.name == "reduce_window_max" and len(p["window_dimensions"]) == 4
            and p["window_dimensions"][0] == p["window_dimensions"][3] == 1
            and tuple(p["window_strides"])[::3] == (1, 1)
            and all(d == 1 for d in p.get("base_dilation", (1,) * 4))
            and all(d == 1 for d in p.get("window_dilation", (1,) * 4))
            and tuple(p["padding"][0]) == tuple(p["padding"][3]) == (0, 0)):
        return [_max_pool_3d(invals[0], p["window_dimensions"], p["window_strides"], p["padding"])]
    if (eqn.primitive.name == "convert_element_type" and _constant(invals[0])
            and jnp.issubdtype(p["new_dtype"], jnp.floating)):  # integer ones index gathers: left alone
        return [np.asarray(invals[0], p["new_dtype"])]
    if (eqn.primitive.name == "pad" and _constant(invals[1])
            and all(i == 0 and lo >= 0 and hi >= 0 for lo, hi, i in p["padding_config"])):
        return [jnp.pad(invals[0], [(int(lo), int(hi)) for lo, hi, _ in p["padding_config"]],
                        constant_values=np.asarray(invals[1]).item())]
    return None


def _constant(v) -> bool:
    return isinstance(v, (int, float, np.ndarray, np.generic)) and np.ndim(v) == 0


def _onnx_run(proto_bytes: bytes, x: np.ndarray) -> np.ndarray:
    _, ort = _onnx_modules()
    sess = ort.InferenceSession(proto_bytes, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def onnx_export(fn, example_size, name: str, spatial: tuple | None = None, x: np.ndarray | None = None,
                ref: np.ndarray | None = None, channels: int = 3):
    """(serialised ONNX, symbolic dim names, relative max-abs difference or None, failed attempts) of `fn`.

    Tries symbolic H, W (`spatial`: the StableHLO artifact's H, W specs, when those were symbolic), then
    a symbolic batch at example_size, then batch 1. With `x` and `ref` (jax's output on x), each
    conversion is run with onnxruntime on x (its first image where the batch is fixed) and kept only
    when it loads, runs and agrees with `ref` within ONNX_TOLERANCE.
    """
    h, w = example_size
    tries = []
    if spatial is not None:
        tries.append((f"B, {spatial[0]}, {spatial[1]}, {channels}", ["batch", "height", "width"]))
    tries += [(f"B, {h}, {w}, {channels}", ["batch"]), (f"1, {h}, {w}, {channels}", [])]
    errors = []
    for shape, dims in tries:
        try:
            data = _to_onnx(fn, _spec(shape), name).SerializeToString()
        except SegjaxError:
            raise
        except Exception as e:  # noqa: BLE001  the next, more static, shape
            errors.append(f"jax2onnx at ({shape}): {type(e).__name__}: {_reason(e)}{_where(e)}")
            continue
        diff = None
        if x is not None:
            xb = x if "batch" in dims else x[:1]
            try:
                got = _onnx_run(data, xb)
            except Exception as e:  # noqa: BLE001
                errors.append(f"onnxruntime at ({shape}): {_reason(e)}")
                continue
            diff = _rel_diff(got, ref[: xb.shape[0]])
            if not diff <= ONNX_TOLERANCE:
                errors.append(f"onnxruntime at ({shape}): relative max-abs difference {diff:.1e} > {ONNX_TOLERANCE:g}")
                continue
        return data, dims, diff, errors
    raise SegjaxError(f"{name}: no ONNX model that onnxruntime runs correctly ({errors[-1]})")


# ------------------------------------------------------------------------------------- export

def export(card: ModelCard, variables, out_dir: str, *, model=None, probabilities: bool = False,
           symbolic: bool = True, onnx: bool = False, onnx_symbolic_hw: bool = True,
           example_size: Sequence[int] = (64, 64), platforms: Sequence[str] = DEFAULT_PLATFORMS,
           check: bool = True) -> dict:
    """Write model.stablehlo, model.json (and model.onnx with `onnx=True`) into `out_dir`; return model.json's dict.

    card: the model's ModelCard (segjax.card); variables: its {"params", "batch_stats"}.
    model: the flax module, when it is not the registry model the card names (default: card.build()).
    probabilities: output softmax probabilities (sigmoid for saliency) instead of logits.
    symbolic: symbolic H and W (the batch is always symbolic); raises SegjaxError for a model that
        needs concrete sizes (then pass symbolic=False: H, W fixed at example_size).
    onnx: also write model.onnx via jax2onnx, checked against jax with onnxruntime.
    onnx_symbolic_hw: try symbolic H, W in ONNX too (when the StableHLO has them); False converts at
        example_size with a symbolic batch. U2-Net needs False: with symbolic H, W its jax2onnx conversion
        did not finish (u2netp: over 20 CPU minutes in jax2onnx's graph optimizer; u2net: past 21 GB).
    example_size: (H, W) traced for the fixed-size export, used for the checks and the stride probe.
    platforms: the jax.export lowering platforms of model.stablehlo.
    check: run the deserialised artifact (and the ONNX model) once against the model and refuse
        to write one that disagrees (relative max-abs difference above 1e-5, 1e-4 for ONNX).
    """
    h, w = (int(s) for s in example_size)
    if h < 1 or w < 1:
        raise SegjaxError(f"example size {h}x{w}: give a positive height and width")
    if onnx:
        _onnx_modules()
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise SegjaxError(f"{out_dir}: the export folder is a file; pick another folder")
    model = card.build() if model is None else model
    fn = _inference_fn(model, variables, card.task, probabilities)
    stride = _output_stride(model, variables, (h, w), card.num_classes, card.in_channels)
    exported, constraint = _trace_stablehlo(card, fn, stride["feature"], (h, w), symbolic, platforms)
    blob = exported.serialize()
    checks, x, ref = {}, None, None
    if check:
        x, ref, diff = _check_stablehlo(card, model, variables, exported, blob, probabilities, (h, w))
        if diff is not None:
            checks["stablehlo_rel_max_abs_diff"] = diff
    onnx_bytes, onnx_info = None, None
    if onnx:
        spatial = tuple(str(d) for d in exported.in_avals[0].shape[1:3]) if symbolic and onnx_symbolic_hw else None
        onnx_bytes, onnx_info, diff = _export_onnx(card, model, variables, probabilities, (h, w), spatial, x, ref)
        if diff is not None:
            checks["onnx_rel_max_abs_diff"] = diff
    manifest = _manifest(card.replace(output_stride=stride["feature"]), exported, stride, probabilities, symbolic,
                         constraint, (h, w), onnx_info, checks)
    files = {STABLEHLO_FILE: blob, MANIFEST_FILE: (json.dumps(manifest, indent=2) + "\n").encode()}
    if onnx_bytes is not None:
        files[ONNX_FILE] = onnx_bytes
    _write_folder(out_dir, files, stale=() if onnx else (ONNX_FILE,))
    return manifest


def _trace_stablehlo(card: ModelCard, fn, stride, example_size, symbolic: bool, platforms):
    """(jax.export.Exported, constraint text or None): free H, W, else multiples of the output stride,
    else (symbolic=False) fixed at example_size."""
    h, w = example_size
    if not symbolic:
        try:
            return _trace(fn, _spec(f"b, {h}, {w}, {card.in_channels}"), platforms), None
        except Exception as e:  # noqa: BLE001
            raise SegjaxError(f"{card.model}: jax.export failed at {h}x{w}: {_reason(e)}{_where(e)}") from None
    failures = []
    for shape, why in _symbolic_attempts(stride, example_size, card.in_channels):
        try:
            return _trace(fn, _spec(shape), platforms), why
        except Exception as e:  # noqa: BLE001  shape polymorphism refused: try the next constraint
            failures.append(f"{_reason(e)}{_where(e)}")
    raise SegjaxError(f"{card.model} cannot be exported with symbolic height/width: it needs concrete sizes "
                      f"({failures[-1]}); export a fixed size instead (symbolic=False, {h}x{w} from example_size)")


def _check_stablehlo(card: ModelCard, model, variables, exported, blob: bytes, probabilities: bool, example_size):
    """(x, the model's output on x, the artifact's relative difference from it or None where the artifact
    cannot run on this backend). The reference runs the model with its variables as arguments, as segjax
    does; a difference above STABLEHLO_TOLERANCE (or NaN) is an error."""
    x = np.random.RandomState(0).standard_normal((2, *example_size, card.in_channels)).astype(np.float32)
    ref = np.asarray(jax.jit(lambda v, x: _inference_fn(model, v, card.task, probabilities, False)(x))(variables, x))
    if "cpu" not in exported.platforms and jax.default_backend() not in exported.platforms:
        return x, ref, None
    diff = _rel_diff(np.asarray(jax.export.deserialize(blob).call(x)), ref)
    if not diff <= STABLEHLO_TOLERANCE:  # NaN fails too
        raise SegjaxError(f"{card.model}: the exported StableHLO disagrees with the model (relative max-abs "
                          f"difference {diff:.1e} > {STABLEHLO_TOLERANCE:g})")
    return x, ref, diff


def _export_onnx(card: ModelCard, model, variables, probabilities: bool, example_size, spatial, x, ref):
    """(ONNX bytes, model.json's "onnx" entry, relative difference from `ref` or None)."""
    name = f"{card.model}_{'probabilities' if probabilities else 'logits'}"
    data, dims, diff, fallbacks = onnx_export(_inference_fn(model, variables, card.task, probabilities, barrier=False),
                                              example_size, name, spatial, x, ref, card.in_channels)
    info = {"file": ONNX_FILE, "symbolic_dims": dims, "opset": None,
            "jax2onnx_version": _version("jax2onnx"), "onnxruntime_version": _version("onnxruntime")}
    try:
        import onnx as onnx_lib
        info["opset"] = max(o.version for o in onnx_lib.load_from_string(data).opset_import
                            if o.domain in ("", "ai.onnx"))
    except Exception:  # noqa: BLE001  the opset is informative only
        pass
    if fallbacks:
        info["fallbacks"] = fallbacks  # the more symbolic shapes tried first, and why they failed
    return data, info, diff


def _manifest(card: ModelCard, exported, stride: dict, probabilities: bool, symbolic: bool, constraint,
              example_size, onnx_info, checks: dict) -> dict:
    """model.json: the card (ModelCard.from_meta reads it back) and what a runtime needs besides the graph."""
    shape = lambda aval: [d if isinstance(d, int) else str(d) for d in aval.shape]  # noqa: E731
    bands = card.in_channels
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "segjax_version": __version__,
        **card.to_meta(),
        "input": {
            "layout": "NHWC", "dtype": "float32", "channels": "RGB" if bands == 3 else f"{bands} bands",
            "shape": shape(exported.in_avals[0]),
            "normalisation": ("x = (rgb / 255 - mean) / std" if bands == 3 else
                              "x = (bands / 65535 - mean) / std for 16-bit bands (/ 255 for 8-bit)"),
            "mean": list(card.mean), "std": list(card.std),
            "symbolic_dims": ["batch"] + (["height", "width"] if symbolic else []), "constraints": constraint,
            "example_size": list(example_size),
        },
        "output": {
            "kind": "probabilities" if probabilities else "logits", "layout": "NHWC", "dtype": "float32",
            "shape": shape(exported.out_avals[0]), "size": "the input's height and width",
            "activation": card.task.activation, "activation_applied": bool(probabilities), "decode": card.task.decode,
        },
        "palette": card.palette, "logits_stride": jsonable(stride["logits"]),
        "stablehlo": {"file": STABLEHLO_FILE, "platforms": list(exported.platforms), "jax_version": jax.__version__,
                      "calling_convention_version": exported.calling_convention_version,
                      "load": "jax.export.deserialize(open(file, 'rb').read()).call(x)"},
        "onnx": onnx_info,
        "checks": checks,
    }


def _write_folder(out_dir: str, files: dict[str, bytes], stale: Sequence[str] = ()) -> None:
    """Writes `files` (name -> bytes) into out_dir all at once: into a temporary folder beside it, then
    moved into place, so a failure leaves no partial export; `stale` files of an earlier export go."""
    from segjax.errors import writes_to

    parent = os.path.dirname(os.path.abspath(out_dir))
    with writes_to(parent, "export folder"):
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out_dir))}.", suffix=".tmp", dir=parent)
        try:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's folder is private; the export is an ordinary folder
            for name, data in files.items():
                with open(os.path.join(tmp, name), "wb") as f:
                    f.write(data)
            if not os.path.exists(out_dir):
                os.rename(tmp, out_dir)
                return
            for name in stale:
                if os.path.exists(os.path.join(out_dir, name)):
                    os.remove(os.path.join(out_dir, name))
            for name in os.listdir(tmp):
                os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _version(package: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(package)
    except Exception:  # noqa: BLE001
        return None


def load_manifest(out_dir: str) -> dict:
    with open(os.path.join(out_dir, MANIFEST_FILE)) as f:
        return json.load(f)
