"""Speed and memory of the fully connected CRF: segjax.crf.dense_crf (jitted; one image, and a vmapped batch)
against pydensecrf2, side by side in one process. Default: a random-colour 375x500 image, 21 classes,
10 iterations, kazuto1011's values; median of 3 after a warm-up (the compile is timed apart). `--image
realistic` takes smooth coloured regions instead, where pydensecrf's hash table holds far fewer lattice
points while segjax's static shapes keep the worst case's capacity.

Memory: XLA's own account of the compiled CRF (arguments, outputs, temporaries: memory_analysis) and the
growth of the process's peak RSS over each phase (ru_maxrss; pydensecrf allocates in C++, out of
tracemalloc's sight, so it is measured first, in a fresh process, before JAX's buffers exist).

Run on an idle machine, one process, and say which CPU and load:
    PYTHONPATH=$PWD python experiments/crf_benchmark.py                 # segjax only
    PYTHONPATH=$PWD /tmp/crfvenv/bin/python experiments/crf_benchmark.py  # with pydensecrf2 beside it
Smoke run: --size 48 64 --batch 2 --repeats 1
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # crf_vs_pydensecrf, beside this file


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def inputs(h, w, c, n, seed=0, kind="random"):
    """n images and probabilities: "random" colours and probabilities (every simplex corner nearly its own
    lattice point: the lattice's worst case), "realistic" (crf_vs_pydensecrf.realistic: smooth coloured
    regions, probabilities that follow them), or the path of a photograph (its top-left h x w, n times, with
    random probabilities)."""
    if kind not in ("random", "realistic"):
        from PIL import Image
        photo = np.asarray(Image.open(kind).convert("RGB"))
        if photo.shape[0] < h or photo.shape[1] < w:
            raise SystemExit(f"error: {kind} is {photo.shape[0]}x{photo.shape[1]}, smaller than --size {h} {w}")
        _, probs = inputs(h, w, c, n, seed)
        return np.repeat(np.ascontiguousarray(photo[None, :h, :w]), n, axis=0), probs
    if kind == "realistic":
        from crf_vs_pydensecrf import realistic
        pairs = [realistic(h, w, c, seed + k) for k in range(n)]
        return np.stack([i for i, _ in pairs]), np.stack([p for _, p in pairs])
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    logits = rng.normal(size=(n, h, w, c)).astype(np.float32) * 2.0
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    return images, (probs / probs.sum(-1, keepdims=True)).astype(np.float32)


def bench_pydensecrf(image, probs, values, repeats):
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        return None
    from crf_vs_pydensecrf import pydensecrf
    before = peak_rss_mb()
    pydensecrf(image, probs, **values)
    grown = peak_rss_mb() - before
    return {"s": timed(lambda: pydensecrf(image, probs, **values), repeats), "rss_growth_mb": grown}


def bench_segjax(images, probs, values, repeats):
    import jax

    from segjax import crf

    single = jax.jit(lambda i, q: crf.dense_crf(i, q, **values))
    batched = jax.jit(jax.vmap(lambda i, q: crf.dense_crf(i, q, **values)))
    out = {}
    for name, fn, args in (("single", single, (images[0], probs[0])), ("batched", batched, (images, probs))):
        before = peak_rss_mb()
        start = time.perf_counter()
        compiled = fn.lower(*args).compile()
        compile_s = time.perf_counter() - start
        jax.block_until_ready(compiled(*args))  # warm-up
        s = timed(lambda: jax.block_until_ready(compiled(*args)), repeats)
        mem = compiled.memory_analysis()
        xla_mb = None if mem is None else (mem.argument_size_in_bytes + mem.output_size_in_bytes
                                           + mem.temp_size_in_bytes) / 2 ** 20
        out[name] = {"s": s, "per_image_s": s / len(args[0]) if name == "batched" else s, "compile_s": compile_s,
                     "xla_mb": xla_mb, "rss_growth_mb": peak_rss_mb() - before}
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", nargs=2, type=int, default=(375, 500), metavar=("H", "W"))
    p.add_argument("--classes", type=int, default=21)
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--batch", type=int, default=8, help="images in the vmapped batch")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--image", default="random", metavar="random|realistic|PATH",
                   help="random colours (the lattice's worst case), smooth coloured regions, or a photograph's "
                        "top-left --size pixels (e.g. scikit-learn's datasets/images/china.jpg)")
    args = p.parse_args()
    from segjax import crf

    values = {**crf.KAZUTO_VOC, "iterations": args.iterations}
    h, w = args.size
    images, probs = inputs(h, w, args.classes, args.batch, kind=args.image)
    print(f"{os.path.basename(args.image)} {h}x{w}, {args.classes} classes, {args.iterations} iterations, "
          f"median of {args.repeats}; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    ref = bench_pydensecrf(images[0], probs[0], values, args.repeats)  # first: before JAX allocates anything
    ours = bench_segjax(images, probs, values, args.repeats)
    if ref is None:
        print("pydensecrf2        not installed (pip install pydensecrf2 needs a C++ compiler)")
    else:
        print(f"pydensecrf2        {ref['s']:8.3f} s/image   peak RSS +{ref['rss_growth_mb']:.0f} MB")
    for name, r in ours.items():
        mem = "" if r["xla_mb"] is None else f"   XLA buffers {r['xla_mb']:.0f} MB"
        label = f"segjax jit{' vmap x' + str(args.batch) if name == 'batched' else ''}"
        print(f"{label:<18} {r['per_image_s']:8.3f} s/image   compile {r['compile_s']:.1f} s{mem}   "
              f"peak RSS +{r['rss_growth_mb']:.0f} MB")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
