"""Per-model StableHLO and ONNX export parity (the table in docs/export.md); one JSON row per model.

    python experiments/export_parity.py                 # every registered model
    python experiments/export_parity.py unet u2netp     # some
    python experiments/export_parity.py --no-onnx ...   # StableHLO only (ONNX conversions take minutes)
    python experiments/export_parity.py --fixed u2net   # H, W fixed at 64x64 (the batch stays symbolic)

Each model is built at full width (UNet at base_channels=8) with random weights. Parameters that
start at zero (FCN's score layers, ...) are drawn at random too, so no comparison is of zeros.
`segjax.export.export` runs its own checks at the 64x64 example size (StableHLO and ONNX against
the model with its weights as arguments); where H and W are symbolic, the artifact is also run at
96x128, a size it was not traced at, against segjax's own jitted apply (default CPU lowering).
"""
import argparse
import json
import subprocess
import sys
import time

import jax
import numpy as np

from segjax import export as E
from segjax import models
from segjax.analysis import init_variables
from segjax.card import ModelCard
from segjax.errors import SegjaxError

SMALL = {"unet": dict(base_channels=8)}
EXAMPLE, OTHER = (64, 64), (96, 128)


def random_zeros(variables, seed=0):
    """`variables` with every all-zero parameter drawn from N(0, 0.01^2)."""
    leaves, tree = jax.tree_util.tree_flatten(variables)
    rng = np.random.default_rng(seed)
    leaves = [rng.normal(0, 0.01, a.shape).astype(a.dtype) if a.size and not np.any(a) else a for a in leaves]
    return jax.tree_util.tree_unflatten(tree, leaves)


def row(name: str, onnx: bool, fixed: bool = False) -> dict:
    kw = SMALL.get(name, {})
    nc = 1 if name.startswith("u2net") else 3
    m = models.create(name, num_classes=nc, **kw)
    v = random_zeros(init_variables(m, EXAMPLE))
    meta = {"model": name, "model_kwargs": kw, "num_classes": nc}
    out = f"/tmp/export_parity/{name}"
    r = {"model": name}
    t = time.time()
    try:
        if fixed:
            raise SegjaxError("symbolic height/width not asked (--fixed)")
        man = E.export(ModelCard.from_meta(meta), v, out, model=m, symbolic=True, onnx=onnx, example_size=EXAMPLE)
        r["symbolic_hw"] = man["input"]["constraints"] or "free"
    except SegjaxError as e:
        if "symbolic height/width" not in str(e):
            raise
        r["symbolic_hw"] = "no: " + str(e)
        man = E.export(ModelCard.from_meta(meta), v, out, model=m, symbolic=False, onnx=onnx, example_size=EXAMPLE)
    r["export_s"] = round(time.time() - t, 1)
    r["stablehlo_rel_64x64"] = man["checks"]["stablehlo_rel_max_abs_diff"]
    x = np.random.RandomState(1).standard_normal((2, *OTHER, 3)).astype(np.float32)
    ref = None
    if "height" in man["input"]["symbolic_dims"]:
        with open(f"{out}/model.stablehlo", "rb") as f:
            got = jax.export.deserialize(f.read()).call(x)
        ref = np.asarray(jax.jit(lambda x: m.apply(v, x, train=False)["out"])(x))
        r["stablehlo_rel_96x128"] = rel(got, ref)
    if onnx:
        r["onnx_dims"] = man["onnx"]["symbolic_dims"]
        r["onnx_rel_64x64"] = man["checks"]["onnx_rel_max_abs_diff"]
        r["onnx_fallbacks"] = man["onnx"].get("fallbacks", [])
        if ref is not None and "height" in r["onnx_dims"]:
            import onnxruntime
            sess = onnxruntime.InferenceSession(f"{out}/model.onnx", providers=["CPUExecutionProvider"])
            r["onnx_rel_96x128"] = rel(sess.run(None, {sess.get_inputs()[0].name: x})[0], ref)
    return r


def rel(got, ref) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", help="default: every registered model")
    p.add_argument("--no-onnx", action="store_true")
    p.add_argument("--fixed", action="store_true", help="export at the fixed 64x64 example size")
    p.add_argument("--in-process", action="store_true", help="measure here (default: one process per model: "
                   "jax2onnx keeps state between conversions, and a later symbolic conversion can fail on it)")
    args = p.parse_args(argv)
    names = args.names or models.names()
    if not args.in_process:
        flags = ["--in-process"] + (["--no-onnx"] if args.no_onnx else []) + (["--fixed"] if args.fixed else [])
        for name in names:
            subprocess.run([sys.executable, __file__, *flags, name], check=False)
        return 0
    for name in names:
        try:
            r = row(name, onnx=not args.no_onnx, fixed=args.fixed)
        except SegjaxError as e:
            r = {"model": name, "error": str(e)}
        print(json.dumps(r), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
