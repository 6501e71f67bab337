"""Where training metrics go: `<workdir>/metrics.jsonl` (one JSON object per line), TensorBoard event
files (tensorboardX, no TensorFlow), and PNG plots drawn from metrics.jsonl at the end.
"""
from __future__ import annotations

import atexit
import json
import os
import sys

import numpy as np

from segjax.files import jsonable

METRICS_FILE = "metrics.jsonl"


def _summary_writer(logdir: str):
    """tensorboardX's SummaryWriter, imported with torch hidden: its writer module imports torch whenever it is
    installed, only to accept torch tensors (1.6 of the 1.8 s that import took on a 2-core Xeon); segjax hands
    it numpy. torch stays importable afterwards, and a process that has already imported it is left alone."""
    hide = "torch" not in sys.modules and "tensorboardX" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # makes `import torch` raise ImportError, which tensorboardX catches
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hide:
            del sys.modules["torch"]
    return SummaryWriter(logdir)


class MetricWriter:
    """Appends {"step", "split", ...} records; scalars also go to TensorBoard as "<split>/<name>".

    Only process 0 writes (every process may call it).
    """

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, METRICS_FILE)
        self._tb = None
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            self._tb = _summary_writer(os.path.join(workdir, "tensorboard"))
            # Runs before tensorboardX's own exit hook (LIFO): a run that failed (e.g. disk full) exits
            # with its one-line error instead of a flush traceback at interpreter exit.
            atexit.register(self._close_at_exit)

    def write(self, step: int, split: str, values: dict) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "split": split, **{k: jsonable(v) for k, v in values.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in record.items():
            if k not in ("step", "split") and isinstance(v, (int, float)) and not isinstance(v, bool):
                self._tb.add_scalar(f"{split}/{k}", v, int(step))

    def image(self, step: int, tag: str, picture) -> None:
        """An (H, W, 3) uint8 picture to TensorBoard."""
        if self.enabled:
            self._tb.add_image(tag, np.asarray(picture), int(step), dataformats="HWC")

    def close(self) -> None:
        tb, self._tb = self._tb, None
        if tb is not None:
            try:
                tb.flush()
                tb.close()
            except OSError:
                _quiet_failed_flush_at_exit()
                raise

    def _close_at_exit(self) -> None:
        try:
            self.close()
        except OSError:
            pass  # the disk refused the last events; the run has already reported why


def _quiet_failed_flush_at_exit() -> None:
    """After a final flush failed (e.g. disk full), tensorboardX's own exit hook retries it and fails
    again; Python reports an exception in an exit hook through sys.unraisablehook, which would print a
    traceback after the run's one-line error. Drop those OSErrors; anything else is still reported."""
    previous = sys.unraisablehook

    def hook(unraisable):
        if not isinstance(unraisable.exc_value, OSError):
            previous(unraisable)
    sys.unraisablehook = hook


def read_metrics(workdir: str) -> list[dict]:
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _curve(records, split, key):
    pts = sorted({r["step"]: r[key] for r in records if r.get("split") == split and r.get(key) is not None}.items())
    return [p[0] for p in pts], [p[1] for p in pts]


def plot(workdir: str, class_names: list[str] | None = None) -> list[str]:
    """Writes loss.png, lr.png, miou.png (or max_f.png) and class_iou.png into `workdir`; returns their paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(workdir)
    written = []

    def save(fig, name):
        path = os.path.join(workdir, name)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)

    for split, key, name, ylabel in (("train", "loss", "loss.png", "training loss"),
                                     ("train", "lr", "lr.png", "learning rate"),
                                     ("eval", "miou", "miou.png", "validation mIoU"),
                                     ("eval", "max_f", "max_f.png", "validation max F")):
        steps, values = _curve(records, split, key)
        if not steps:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(steps, values, marker="o" if split == "eval" else None)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if key == "loss" and min(values) > 0 and max(values) / min(values) > 50:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        save(fig, name)

    last_eval = [r for r in records if r.get("split") == "eval" and r.get("iou")]
    if last_eval:
        iou = [v if v is not None else 0.0 for v in last_eval[-1]["iou"]]
        names = class_names if class_names and len(class_names) == len(iou) else [str(i) for i in range(len(iou))]
        fig, ax = plt.subplots(figsize=(max(6, 0.4 * len(iou)), 4))
        ax.bar(range(len(iou)), iou)
        ax.set_xticks(range(len(iou)))
        ax.set_xticklabels(names, rotation=60, ha="right")
        ax.set_ylim(0, 1)
        ax.set_ylabel(f"IoU at step {last_eval[-1]['step']}")
        save(fig, "class_iou.png")
    return written
