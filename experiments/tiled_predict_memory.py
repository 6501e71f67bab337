"""Peak resident memory and wall time of `segjax predict --tile` on huge images, through the CLI.

    python experiments/tiled_predict_memory.py --checkpoint runs/synthetic_unet \\
        [--runs 8000:jpeg,20000:tiff] [--probs both|off|on] [--tile 256] [--overlap 0.25] \\
        [--workdir /tmp/segjax_tiled] [--keep-outputs]

The checkpoint is the default recipe's (`segjax train`, a UNet with 16 base channels, bilinear,
5 classes); for memory only its architecture matters, so a short run does, e.g.
`segjax train --workdir /tmp/ckpt --config.num_steps=30 --config.eval_every_steps=30`.

For each run SIZE:FORMAT (jpeg, png or tiff; the TIFF is uncompressed RGB) it writes a synthetic
SIZE x SIZE RGB image (once, in a subprocess, kept in --workdir), then runs

    python -m segjax.cli predict --checkpoint CKPT IMAGE --out OUT --tile T T --overlap O [--save-probs]

as a child process and reads that child's own peak resident set (`ru_maxrss` from `os.wait4`; this
parent never imports JAX, so nothing of it is counted). It prints one JSON line per run and a
markdown table (size, format, --save-probs, peak RSS, wall time, the child's CPU time (user + system,
from the same rusage: less sensitive to other load than wall time), output bytes). The outputs are
deleted after each run unless --keep-outputs (the float16 probabilities of a 20,000 x 20,000,
5-class image are 4 GB).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 1024 ** 3


def make_image(size: int, fmt: str, path: str) -> None:
    """A smooth colour pattern with noise, written 1,000 rows at a time (TIFF) or from one array (PIL)."""
    import numpy as np

    def rows(r0, r1):
        y = np.arange(r0, r1)[:, None, None]
        x = np.arange(size)[None, :, None]
        pattern = 127 + 100 * np.sin(y / 97.0 + x / 131.0 + np.arange(3)) + \
            np.random.default_rng(r0).integers(-20, 21, (r1 - r0, size, 3))
        return np.clip(pattern, 0, 255).astype(np.uint8)

    chunk = 1000
    if fmt == "tiff":
        import tifffile

        strips = (rows(r, min(size, r + chunk)) for r in range(0, size, chunk))
        tifffile.imwrite(path + ".tmp", strips, shape=(size, size, 3), dtype=np.uint8, photometric="rgb",
                         rowsperstrip=chunk, bigtiff=size * size * 3 > 2 ** 31)
    else:
        from PIL import Image

        Image.MAX_IMAGE_PIXELS = None
        image = np.empty((size, size, 3), np.uint8)
        for r in range(0, size, chunk):
            image[r:r + chunk] = rows(r, min(size, r + chunk))
        Image.fromarray(image).save(path + ".tmp", format="JPEG" if fmt == "jpeg" else "PNG", quality=90)
    os.replace(path + ".tmp", path)


def watch(pid: int, start: float, every: float) -> tuple:
    """Waits for the child; every `every` seconds prints its resident-set high-water mark so far (VmHWM),
    so that a run stopped early still tells its peak up to then. Returns (wait status, rusage)."""
    last = start
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            return status, usage
        if every and time.time() - last >= every:
            last = time.time()
            with open(f"/proc/{pid}/status") as f:
                vm = {k: v.split()[0] for k, _, v in (line.partition(":") for line in f) if k in ("VmHWM", "VmRSS")}
            gib = {k: round(int(v) * 1024 / GIB, 2) for k, v in vm.items()}
            print(json.dumps({"elapsed_s": round(last - start), "peak_rss_so_far_gib": gib["VmHWM"],
                              "rss_gib": gib["VmRSS"]}), flush=True)
        time.sleep(1.0)


def run_predict(args, image: str, save_probs: bool) -> dict:
    out = os.path.join(args.workdir, "out")
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "segjax.cli", "predict", "--checkpoint", args.checkpoint, image, "--out", out,
           "--tile", str(args.tile), str(args.tile), "--overlap", str(args.overlap)] + \
        (["--save-probs"] if save_probs else [])
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log = os.path.join(args.workdir, "predict.log")
    start = time.time()
    with open(log, "w") as sink:  # a file, not a pipe: the child is reaped by wait4 below, not by Popen
        child = subprocess.Popen(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT)
        status, usage = watch(child.pid, start, args.progress_every)
    child.returncode = os.waitstatus_to_exitcode(status)
    wall = time.time() - start
    if child.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{open(log).read()[-3000:]}")
    written = sum(os.path.getsize(os.path.join(out, n)) for n in os.listdir(out))
    if not args.keep_outputs:
        shutil.rmtree(out, ignore_errors=True)
    return {"image": os.path.basename(image), "save_probs": save_probs,
            "peak_rss_gib": round(usage.ru_maxrss * 1024 / GIB, 2),
            "wall_s": round(wall, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "outputs_gib": round(written / GIB, 2), "cpu_count": os.cpu_count(),
            "loadavg_1min_at_end": round(os.getloadavg()[0], 1), "command": " ".join(cmd[1:])}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=False, help="a trained default-recipe workdir (see above)")
    ap.add_argument("--runs", default="8000:jpeg,20000:tiff", help="SIZE:FORMAT,... (jpeg, png, tiff)")
    ap.add_argument("--probs", default="both", choices=["both", "off", "on"], help="runs with --save-probs?")
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--overlap", type=float, default=0.25)
    ap.add_argument("--workdir", default="/tmp/segjax_tiled")
    ap.add_argument("--keep-outputs", action="store_true")
    ap.add_argument("--progress-every", type=float, default=300, help="seconds between progress lines (0: none)")
    ap.add_argument("--make-image", nargs=3, metavar=("SIZE", "FORMAT", "PATH"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.make_image:
        return make_image(int(a.make_image[0]), a.make_image[1], a.make_image[2])
    if not a.checkpoint:
        ap.error("--checkpoint is required")
    os.makedirs(a.workdir, exist_ok=True)
    results = []
    for run in a.runs.split(","):
        size, fmt = run.split(":")
        image = os.path.join(a.workdir, f"image_{size}.{ {'jpeg': 'jpg', 'png': 'png', 'tiff': 'tif'}[fmt] }")
        if not os.path.exists(image):  # in a subprocess: its memory is not this process's
            subprocess.run([sys.executable, __file__, "--make-image", size, fmt, image], check=True)
        for save_probs in {"both": (False, True), "off": (False,), "on": (True,)}[a.probs]:
            results.append(dict(size=int(size), format=fmt, **run_predict(a, image, save_probs)))
            print(json.dumps(results[-1]), flush=True)
    print("\n| image | --save-probs | peak RSS (ru_maxrss) | wall time | CPU time | outputs |\n|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['size']:,} x {r['size']:,} {r['format'].upper()} | {'yes' if r['save_probs'] else 'no'} | "
              f"{r['peak_rss_gib']:.2f} GiB | {r['wall_s'] / 60:.1f} min | {r['cpu_s'] / 60:.1f} min | "
              f"{r['outputs_gib']:.2f} GiB |")


if __name__ == "__main__":
    main()
