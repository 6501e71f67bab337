"""What a model costs and sees: parameters, FLOPs, output stride, receptive field (`segjax inspect`).

Definitions (each computed generically, for any module that follows the model contract):

- **parameters**: elements of the "params" collection (batch statistics are counted apart).
- **FLOPs**: forward FLOPs per image from XLA's cost analysis of the compiled, jitted forward.
  XLA counts a multiply-add as 2 FLOPs but skips taps that fall on zero padding, and it also counts
  elementwise work (BatchNorm, activations, resizes). `analytic_flops` gives the paper convention
  instead: 2 x multiply-adds of every convolution and matmul, padding taps included; so XLA's
  number is a few percent below it on "same"-padded networks at small sizes, and the two agree
  exactly on a padding-free conv.
- **output stride**: measured differentially. Every submodule output (flax `capture_intermediates`,
  shapes only, via `jax.eval_shape`) is probed at two input sizes, H and H + 64; a map whose height
  grows by dh has stride 64 / dh. This ignores constant offsets (FCN's pad-100, valid convs) and
  global-pooling branches (1 x 1 at both sizes). We report the coarsest map ("feature") and the
  finest num_classes-channel map below the top module ("logits": the class scores before the
  final resize; 1 when the head already works at input resolution).
- **receptive field**: the bounding box of the nonzero gradient of the centre pixel's logits (summed
  over channels) w.r.t. the input (randomly initialised weights, random inputs, the union over a small batch,
  so neither dead ReLUs nor cancellation can hide a tap). Any global-pooling path (ASPP image
  pooling, LR-ASPP's scale branch, squeeze-excitation) makes it the whole image; `local_only=True`
  replays the traced forward with a stop-gradient on every reduction over both spatial axes, which
  gives the receptive field of the local (convolutional) paths alone. A box that touches the input
  border is reported as clipped: the true receptive field is at least that large.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from segjax import models
from segjax import nn as snn

STRIDE_PROBE = 64  # extra pixels for the differential stride probe; exact for strides dividing 64


# ------------------------------------------------------------------------------------- parameters

def param_count(variables_or_shapes: Any) -> int:
    """Elements in the "params" collection (or in the whole tree when it has none); arrays or shapes."""
    tree = variables_or_shapes
    if isinstance(tree, dict) and "params" in tree:
        tree = tree["params"]
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree))


def abstract_variables(model, size: Sequence[int], channels: int = 3):
    """Shapes of `model`'s variables, without computing anything."""
    x = jax.ShapeDtypeStruct((1, *size, channels), jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)


def init_variables(model, size: Sequence[int] = (64, 64), channels: int = 3, seed: int = 0):
    """Randomly initialised variables (jitted init; parameters don't depend on the input size)."""
    x = jnp.zeros((1, *size, channels), jnp.float32)
    return jax.jit(lambda key, x: model.init(key, x, train=False))(jax.random.key(seed), x)


# ------------------------------------------------------------------------------------- FLOPs

def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    # jax returns a dict in 0.4.3x+ and 0.10; older versions returned a one-element list.
    return cost[0] if isinstance(cost, (list, tuple)) else (cost or {})


def xla_flops(fn: Callable, *args) -> float:
    """FLOPs XLA's cost analysis assigns to the compiled `jax.jit(fn)(*args)` (args may be shapes)."""
    return float(_cost(jax.jit(fn).lower(*args).compile()).get("flops", float("nan")))


def _subjaxprs(eqn):
    for v in eqn.params.values():
        for j in v if isinstance(v, (list, tuple)) else (v,):
            if isinstance(j, jcore.ClosedJaxpr):
                yield j.jaxpr
            elif isinstance(j, jcore.Jaxpr):
                yield j


def _count_macs(jaxpr) -> float:
    macs = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out, in, *spatial)
            taps = math.prod(rhs[d] for d in rhs_spec[1:])
            # A transposed conv (lhs_dilation) multiplies mostly inserted zeros: count the real taps only.
            dilated = math.prod(eqn.params.get("lhs_dilation") or (1,))
            macs += math.prod(eqn.outvars[0].aval.shape) * taps / dilated
        elif name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            macs += math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lhs_contract)
        for sub in _subjaxprs(eqn):
            macs += _count_macs(sub)
    return macs


def analytic_flops(fn: Callable, *args) -> float:
    """2 x multiply-adds of every convolution and matmul in `fn`'s jaxpr (padding taps included).

    Traced with the plain `lax` convolutions (SEGJAX_CONV=native): the rewrites of `auto`/`dense`
    (shifted multiply-adds, trimmed taps) would hide or drop convolutions from the count.
    """
    with snn.conv_lowering("native"):
        return 2.0 * _count_macs(jax.make_jaxpr(fn)(*args).jaxpr)


def flops(model, size: Sequence[int], variables=None, batch: int = 1, channels: int = 3) -> dict:
    """Forward FLOPs per image: {"xla": XLA cost analysis, "analytic": 2 x conv/matmul MACs}."""
    variables = abstract_variables(model, size, channels) if variables is None else variables
    x = jax.ShapeDtypeStruct((batch, *size, channels), jnp.float32)

    def forward(v, x):
        return model.apply(v, x, train=False)

    return {"xla": xla_flops(forward, variables, x) / batch, "analytic": analytic_flops(forward, variables, x) / batch}


# ------------------------------------------------------------------------------------- output stride

def _spatial_maps(model, variables, size, channels):
    x = jax.ShapeDtypeStruct((1, *size, channels), jnp.float32)
    _, state = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=False, capture_intermediates=True, mutable=["intermediates"]),
        variables, x)
    maps = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state["intermediates"])[0]:
        keys = tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        if len(getattr(leaf, "shape", ())) == 4:
            maps[keys] = leaf.shape
    return maps


def output_stride(model, size: Sequence[int] = (128, 128), variables=None, num_classes: int | None = None,
                  channels: int = 3) -> dict:
    """{"feature": stride of the coarsest internal map, "logits": of the finest class-score map or None}.

    Strides are (sh, sw) tuples collapsed to one int when equal; see the module docstring.
    """
    h, w = size
    variables = abstract_variables(model, size, channels) if variables is None else variables
    small = _spatial_maps(model, variables, (h, w), channels)
    large = _spatial_maps(model, variables, (h + STRIDE_PROBE, w + STRIDE_PROBE), channels)
    feature, logits = None, None
    for path, (_, h1, w1, c) in small.items():
        if path not in large:
            continue
        _, h2, w2, _ = large[path]
        if h2 == h1 or w2 == w1:  # global pooling branch: no spatial extent
            continue
        stride = (STRIDE_PROBE / (h2 - h1), STRIDE_PROBE / (w2 - w1))
        if feature is None or stride > feature:
            feature = stride
        if num_classes is not None and c == num_classes and path[0] != "__call__" and (logits is None or stride < logits):
            logits = stride
    return {"feature": _collapse(feature), "logits": _collapse(logits)}


def _collapse(stride):
    if stride is None:
        return None
    sh, sw = (int(s) if float(s).is_integer() else s for s in stride)
    return sh if sh == sw else (sh, sw)


# ------------------------------------------------------------------------------------- receptive field

def _is_global_spatial_reduction(eqn) -> bool:
    if eqn.primitive.name not in ("reduce_sum", "reduce_max", "reduce_min", "argmax"):
        return False
    axes = set(eqn.params.get("axes", ()))
    return len(eqn.invars[0].aval.shape) == 4 and {1, 2} <= axes


INLINED_CALLS = ("jit", "pjit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call")


def replay_jaxpr(jaxpr, consts, args, rewrite: Callable) -> list:
    """Evaluate `jaxpr` equation by equation, calls (INLINED_CALLS) inlined so every equation inside
    them is reached too; `rewrite(eqn, invals)` returns the outputs of an equation it replaces, or
    None to bind it as it is. Inlining a custom derivative rule differentiates its primal instead."""
    env = {}

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        sub = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
        if isinstance(sub, jcore.ClosedJaxpr) and eqn.primitive.name in INLINED_CALLS:
            outvals = replay_jaxpr(sub.jaxpr, sub.consts, invals[len(invals) - len(sub.jaxpr.invars):], rewrite)
        else:
            outvals = rewrite(eqn, invals)
            if outvals is None:
                outvals = eqn.primitive.bind(*invals, **eqn.params)
                outvals = outvals if eqn.primitive.multiple_results else [outvals]
        env.update(zip(eqn.outvars, outvals))
    return [read(v) for v in jaxpr.outvars]


def _cut_global_pool(eqn, invals):
    """A reduction over both spatial axes, with no gradient through it; None for any other equation."""
    if not _is_global_spatial_reduction(eqn):
        return None
    outvals = eqn.primitive.bind(*invals, **eqn.params)
    return [jax.lax.stop_gradient(o) for o in (outvals if eqn.primitive.multiple_results else [outvals])]


def without_global_pooling(fn: Callable, example: jax.Array) -> Callable:
    """`fn` with no gradient through reductions over both spatial axes (global pooling / SE / ASPP pool)."""
    closed = jax.make_jaxpr(fn)(example)
    out_tree = jax.tree_util.tree_structure(jax.eval_shape(fn, example))

    def cut(x):
        return jax.tree_util.tree_unflatten(out_tree, replay_jaxpr(closed.jaxpr, closed.consts, [x], _cut_global_pool))

    return cut


def receptive_field(fn: Callable, size: Sequence[int], channels: int = 3, local_only: bool = False,
                    batch: int = 2, seed: int = 0) -> dict:
    """Receptive field of the centre output pixel of `fn` (NHWC -> NHWC array, or a dict with "out").

    Returns {"height", "width", "box": (top, left, bottom, right) inclusive, "clipped"}; height and
    width are 0 when no input pixel reaches that output (e.g. only global paths and local_only).
    """
    x = jax.random.normal(jax.random.key(seed), (batch, *size, channels), jnp.float32)
    f = without_global_pooling(fn, x) if local_only else fn

    def centre_logit(x):
        y = f(x)
        y = y["out"] if isinstance(y, dict) else y
        if y.ndim != 4:
            raise ValueError(f"receptive_field: expected an NHWC output, got shape {y.shape}")
        # All channels of the centre pixel: a union of supports, so one dead unit can't hide the field.
        return y[:, y.shape[1] // 2, y.shape[2] // 2, :].sum()

    grad = jax.jit(jax.grad(centre_logit))(x)
    support = np.asarray(jnp.any(grad != 0, axis=(0, 3)))
    rows, cols = np.nonzero(support.any(1))[0], np.nonzero(support.any(0))[0]
    if rows.size == 0:
        return {"height": 0, "width": 0, "box": None, "clipped": False}
    box = (int(rows[0]), int(cols[0]), int(rows[-1]), int(cols[-1]))
    clipped = box[0] == 0 or box[1] == 0 or box[2] == size[0] - 1 or box[3] == size[1] - 1
    return {"height": box[2] - box[0] + 1, "width": box[3] - box[1] + 1, "box": box, "clipped": clipped}


def model_receptive_field(model, variables, size: Sequence[int], local_only: bool = False) -> dict:
    return receptive_field(lambda x: model.apply(variables, x, train=False), size, local_only=local_only)


# ------------------------------------------------------------------------------------- report

def _fmt_stride(s) -> str:
    return "-" if s is None else (f"{s[0]}x{s[1]}" if isinstance(s, tuple) else str(s))


def _fmt_rf(rf, size) -> str:
    if rf["height"] == 0:
        return "none (no local path reaches the centre output)"
    text = f"{rf['height']}x{rf['width']}"
    if rf["clipped"]:
        whole = (rf["height"], rf["width"]) == tuple(size)
        text += " (whole input)" if whole else " (clipped by the input border: at least this)"
    return text


def report(name: str, num_classes: int = 21, size: Sequence[int] = (480, 480)) -> str:
    """Parameters, FLOPs, output stride and receptive field of a registered model, as text."""
    size = (int(size[0]), int(size[1]))
    model = models.create(name, num_classes=num_classes)
    variables = init_variables(model, size=tuple(min(s, 64) for s in size))
    n_params = param_count(variables)
    n_stats = param_count(variables.get("batch_stats", {}))
    fl = flops(model, size, variables=jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), variables))
    stride = output_stride(model, size, variables=variables, num_classes=num_classes)
    out_shape = jax.eval_shape(lambda x: model.apply(variables, x, train=False)["out"],
                               jax.ShapeDtypeStruct((1, *size, 3), jnp.float32)).shape
    lines = [
        f"model            {name} ({num_classes} classes, input {size[0]}x{size[1]})",
        f"parameters       {n_params:,} (+ {n_stats:,} batch-norm statistics)",
        f"forward FLOPs    {fl['xla'] / 1e9:.2f} GFLOP/img (XLA cost analysis; multiply-add = 2, padding taps skipped)",
        f"                 {fl['analytic'] / 1e9:.2f} GFLOP/img (2 x conv/matmul multiply-adds, padding included)",
        f"output stride    coarsest feature map {_fmt_stride(stride['feature'])}, "
        f"class scores before the final resize {_fmt_stride(stride['logits'])}",
    ]
    if len(out_shape) == 4:
        rf_all = model_receptive_field(model, variables, size)
        rf_local = model_receptive_field(model, variables, size, local_only=True)
        lines += [f"receptive field  {_fmt_rf(rf_all, size)} of the centre output pixel",
                  f"                 {_fmt_rf(rf_local, size)} without global-pooling paths"]
    else:
        lines += ["receptive field  whole input (the model pools globally to a vector)"]
    return "\n".join(lines)
