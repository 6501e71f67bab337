"""Peak host memory and wall time of tiled prediction of a huge image, and what whole-image prediction would need.

    python experiments/tiled_predict_memory.py [--size 12000] [--base 8] [--tile 512] [--overlap 0.25]
        [--batch 4] [--workdir /tmp/segjax_tiled] [--whole-sizes 1024,2048]

1. Writes a synthetic uint8 RGB image of size x size to an .npy memmap, then predicts it with
   `segjax.tiling.predict_tiled` (UNet, bilinear, random weights, 3 classes) into a float32 .npy memmap.
   Reports ru_maxrss (resident set, which includes the memmaps' file pages that were touched) and the
   peaks of RssAnon (private memory: what the process really needs) and RssFile sampled every 50 ms.
2. Whole-image prediction: (a) XLA's buffer assignment for the jitted forward compiled (not run) at
   1 x size x size, (b) measured peak RSS of whole-image prediction at smaller sizes, in subprocesses,
   extrapolated linearly in pixels.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from segjax import analysis, models, tiling  # noqa: E402

GIB = 1024 ** 3
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # segjax.data.transforms' values


def proc_status(keys=("RssAnon", "RssFile", "VmRSS", "VmHWM")) -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in keys:
                out[k] = int(v.split()[0]) * 1024
    return out


class PeakSampler(threading.Thread):
    def __init__(self, period=0.05):
        super().__init__(daemon=True)
        self.period, self.peak, self.stop = period, {}, threading.Event()

    def run(self):
        while not self.stop.is_set():
            for k, v in proc_status().items():
                self.peak[k] = max(self.peak.get(k, 0), v)
            time.sleep(self.period)


def model_and_fn(base):
    m = models.create("unet", num_classes=3, base_channels=base, bilinear=True)
    v = analysis.init_variables(m, (64, 64))
    fn = jax.jit(lambda v, x: jax.nn.softmax(m.apply(v, x, train=False)["out"], -1))
    return m, v, fn


def whole(size, base):
    """Whole-image prediction at size x size in this process; prints its peak RSS as JSON.

    VmHWM (this process's high-water mark), not ru_maxrss: Linux carries ru_maxrss over execve, so a
    subprocess would report its parent's peak."""
    _, v, fn = model_and_fn(base)
    x = np.random.default_rng(0).normal(size=(1, size, size, 3)).astype(np.float32)
    before = proc_status()["VmHWM"]
    t = time.time()
    np.asarray(fn(v, x))
    print(json.dumps({"size": size, "peak_rss": proc_status()["VmHWM"], "before": before,
                      "seconds": time.time() - t}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=12000)
    ap.add_argument("--base", type=int, default=8)
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--overlap", type=float, default=0.25)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--workdir", default="/tmp/segjax_tiled")
    ap.add_argument("--whole-sizes", default="1024,2048")
    ap.add_argument("--whole", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--whole-only", action="store_true", help="only the whole-image estimates (step 2)")
    a = ap.parse_args()
    if a.whole:
        return whole(a.whole, a.base)
    if a.whole_only:
        return whole_estimates(a)

    os.makedirs(a.workdir, exist_ok=True)
    n = a.size
    img_path, out_path = os.path.join(a.workdir, "image.npy"), os.path.join(a.workdir, "probs.npy")
    image = np.lib.format.open_memmap(img_path, mode="w+", dtype=np.uint8, shape=(n, n, 3))
    yy = np.arange(n)[:, None]
    for r in range(0, n, 1000):  # a smooth pattern plus noise, written in row chunks
        rows = np.arange(r, min(n, r + 1000))[:, None, None]
        xx = np.arange(n)[None, :, None]
        pattern = (127 + 100 * np.sin(rows / 97.0 + xx / 131.0 + np.arange(3)) +
                   np.random.default_rng(r).integers(-20, 21, (len(rows), n, 3)))
        image[r:r + len(rows)] = np.clip(pattern, 0, 255).astype(np.uint8)
    image.flush()
    del image, yy
    image = np.load(img_path, mmap_mode="r")
    out = np.lib.format.open_memmap(out_path, mode="w+", dtype=np.float32, shape=(n, n, 3))

    m, v, fn = model_and_fn(a.base)
    stride = analysis.output_stride(m, (128, 128), variables=v, num_classes=3)["feature"]
    start_rss = proc_status()
    sampler = PeakSampler()
    sampler.start()
    t = time.time()
    stats = {}
    tiling.predict_tiled(lambda x: fn(v, x), image, tile=a.tile, overlap=a.overlap, tile_batch=a.batch,
                         out=out, output_stride=stride, mean=IMAGENET_MEAN, std=IMAGENET_STD, stats=stats)
    out.flush()
    wall = time.time() - t
    sampler.stop.set()
    sampler.join()
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    report = {"size": n, "model": f"unet base {a.base} bilinear", "tile": a.tile, "overlap": a.overlap,
              "tile_batch": a.batch, "tiles": stats["tiles"], "grid": stats["grid"], "wall_s": round(wall, 1),
              "ru_maxrss_gib": round(ru / GIB, 3),
              "peak_rss_anon_gib": round(sampler.peak.get("RssAnon", 0) / GIB, 3),
              "peak_rss_file_gib": round(sampler.peak.get("RssFile", 0) / GIB, 3),
              "rss_anon_before_gib": round(start_rss.get("RssAnon", 0) / GIB, 3),
              "accumulator_mib": round(stats["accumulator_bytes"] / 2 ** 20, 1),
              "output_gib": round(out.nbytes / GIB, 3), "input_gib": round(image.nbytes / GIB, 3),
              "cpu_count": os.cpu_count(), "loadavg_at_end": os.getloadavg()}
    print(json.dumps(report), flush=True)
    del out, image
    whole_estimates(a)


def whole_estimates(a):
    n = a.size
    _, v, fn = model_and_fn(a.base)
    # (a) XLA's own buffer assignment for the whole image, compiled only.
    x = jax.ShapeDtypeStruct((1, n, n, 3), jnp.float32)
    mem = fn.lower(v, x).compile().memory_analysis()
    xla = {"size": n, "xla_temp_gib": round(mem.temp_size_in_bytes / GIB, 2),
           "xla_argument_gib": round(mem.argument_size_in_bytes / GIB, 2),
           "xla_output_gib": round(mem.output_size_in_bytes / GIB, 2)}
    print(json.dumps(xla), flush=True)
    # (b) measured whole-image peaks at smaller sizes, extrapolated per pixel.
    rows = []
    for s in [int(s) for s in a.whole_sizes.split(",") if s]:
        res = subprocess.run([sys.executable, __file__, "--whole", str(s), "--base", str(a.base)],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    if len(rows) >= 2:
        (s1, m1), (s2, m2) = [(r["size"] ** 2, r["peak_rss"]) for r in rows[-2:]]
        per_px = (m2 - m1) / (s2 - s1)
        print(json.dumps({"extrapolated_whole_gib": round((m1 + per_px * (n * n - s1)) / GIB, 1),
                          "bytes_per_pixel": round(per_px, 1)}), flush=True)


if __name__ == "__main__":
    main()
