"""Memory stability of a long CPU training run: resident memory (RSS) after warm-up vs at the end.

Runs `segjax train` (the real CLI, in a subprocess) for 2,000 steps of a tiny version of the default recipe
(UNet with 4 base channels on 256 synthetic 32x32 images: 62 epochs, an eval + checkpoint every 250 steps,
metrics every 10), and samples the process's RSS (plus any data-loader worker processes) with psutil twice
a second, pairing each sample with the last step logged to metrics.jsonl.

    python experiments/memory_stability.py [--steps 2000] [--warmup 500] [--out runs/memory_stability]

Warm-up RSS: median of the samples in [warmup, warmup + 250) steps (the first evals and checkpoints, and
epochs boundaries, have happened). End RSS: median in the last 250 steps (before the final eval/plots).
Goal: growth <= 5%. Also reports the peak and a least-squares slope in MiB per 1,000 steps after warm-up.
Writes <out>/memory.json and prints one line per 250 steps.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import psutil


def rss_bytes(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def last_step(metrics_path: str, seen: list) -> int:
    """The latest train step in metrics.jsonl, reading only what was appended since the last call."""
    if not os.path.exists(metrics_path):
        return 0
    with open(metrics_path) as f:
        f.seek(seen[0])
        for line in f.read().splitlines():
            if line.strip():
                record = json.loads(line)
                if record.get("split") == "train":
                    seen[1] = record["step"]
        seen[0] = f.tell()
    return seen[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=500)
    ap.add_argument("--window", type=int, default=250, help="steps averaged at warm-up and at the end")
    ap.add_argument("--workers", type=int, default=0, help="grain worker processes (their RSS is included)")
    ap.add_argument("--out", default="runs/memory_stability")
    args = ap.parse_args(argv)

    workdir = os.path.join(args.out, "workdir")
    shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(args.out, exist_ok=True)
    cmd = [sys.executable, "-m", "segjax.cli", "train", "--workdir", workdir,
           f"--config.data_dir={os.path.join(args.out, 'data')}",
           "--config.model_kwargs={'base_channels': 4, 'bilinear': True}",
           "--config.data_options={'image_size': 32, 'num_train': 256, 'num_val': 32}",
           "--config.batch_size=8", "--config.eval_batch_size=32", f"--config.num_steps={args.steps}",
           "--config.eval_every_steps=250", "--config.log_every_steps=10", "--config.keep_checkpoints=2",
           f"--config.workers={args.workers}"]
    t0 = time.monotonic()
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    proc = psutil.Process(child.pid)
    samples, seen, printed = [], [0, 0], 0  # (seconds, step, rss)
    while child.poll() is None:
        try:
            rss = rss_bytes(proc)
        except psutil.Error:
            break
        step = last_step(os.path.join(workdir, "metrics.jsonl"), seen)
        samples.append((time.monotonic() - t0, step, rss))
        if step >= printed + args.window:
            printed = step - step % args.window
            print(f"step {step:5d}  rss {rss / 2**20:7.1f} MiB  ({samples[-1][0]:.0f} s)", flush=True)
        time.sleep(0.5)
    err = child.stderr.read()
    if child.wait() != 0:
        print(err[-2000:], file=sys.stderr)
        return 1

    steps = np.array([s for _, s, _ in samples])
    rss = np.array([r for _, _, r in samples], np.float64) / 2**20
    warm = rss[(steps >= args.warmup) & (steps < args.warmup + args.window)]
    end = rss[(steps >= args.steps - args.window) & (steps < args.steps)]
    after = (steps >= args.warmup) & (steps < args.steps)
    slope = float(np.polyfit(steps[after], rss[after], 1)[0] * 1000) if after.sum() > 2 else float("nan")
    result = {"steps": args.steps, "warmup_steps": args.warmup, "samples": len(samples),
              "rss_warm_mib": float(np.median(warm)), "rss_end_mib": float(np.median(end)),
              "rss_peak_after_warmup_mib": float(rss[steps >= args.warmup].max()),
              "growth_pct": float(100 * (np.median(end) / np.median(warm) - 1)),
              "slope_mib_per_1000_steps": slope, "wall_s": samples[-1][0], "workers": args.workers,
              "command": cmd}
    with open(os.path.join(args.out, "memory.json"), "w") as f:
        json.dump({**result, "trace": [[round(t, 1), int(s), round(r, 2)] for (t, s, _), r in zip(samples, rss)]},
                  f, indent=1)
    print(f"RSS after warm-up (steps {args.warmup}-{args.warmup + args.window}) {result['rss_warm_mib']:.1f} MiB, "
          f"at the end {result['rss_end_mib']:.1f} MiB: growth {result['growth_pct']:+.2f}% (goal <= 5%), "
          f"slope {slope:+.2f} MiB/1000 steps, peak {result['rss_peak_after_warmup_mib']:.1f} MiB, "
          f"{result['wall_s']:.0f} s")
    return 0 if result["growth_pct"] <= 5 else 3


if __name__ == "__main__":
    sys.exit(main())
