"""Evaluation metrics: confusion matrix and its scores, saliency MAE and max F-measure.

Counting happens on device per batch (jittable, int32 / float32); totals live on the host in
int64 / float64 via `accumulate`, so a data set past 2**31 pixels never wraps around. One batch (or
one `psum` of batches across devices) must stay under 2**31 pixels, which any real batch does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from segjax.errors import SegjaxError

F_BETA_SQUARED = 0.3  # saliency convention: precision weighted over recall
_EPS = 1e-8  # the U-2-Net evaluation tool's guard against 0 / 0


def confusion_matrix(pred, target, num_classes: int, ignore_index: int = 255):
    """(num_classes, num_classes) int32 counts, rows = truth, columns = prediction.

    Pixels whose truth is `ignore_index` or outside [0, num_classes) are not counted (as
    torchvision's reference ConfusionMatrix), nor are predictions outside that range.
    """
    pred = jnp.asarray(pred).astype(jnp.int32).reshape(-1)
    target = jnp.asarray(target).astype(jnp.int32).reshape(-1)
    n = num_classes
    valid = (target != ignore_index) & (target >= 0) & (target < n) & (pred >= 0) & (pred < n)
    index = jnp.where(valid, target * n + pred, n * n)  # invalid pixels go to a bin that is dropped
    return jnp.bincount(index, length=n * n + 1)[: n * n].reshape(n, n)


def accumulate(total, batch):
    """total + batch on the host: integer leaves in int64, float leaves in float64.

    Works on a confusion matrix or on the dict `saliency_sums` returns; `total=None` starts a sum.
    A per-device stack (a leading device axis from pmap) is summed first.
    """
    def widen(x, like):
        x = np.asarray(x)
        if like is not None and x.ndim == np.ndim(like) + 1:
            x = x.sum(0, dtype=np.int64 if x.dtype.kind in "iu" else np.float64)
        if x.dtype.kind in "iu":
            if (x < 0).any():
                raise SegjaxError("a batch count is negative (int32 overflow on device): evaluate smaller batches")
            return x.astype(np.int64)
        return x.astype(np.float64)

    if total is None:
        return jax.tree.map(lambda b: widen(b, None), batch)
    return jax.tree.map(lambda t, b: t + widen(b, t), total, batch)


def _nanmean(x):
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else float("nan")


def scores(cm) -> dict:
    """Scores of a confusion matrix (rows = truth), in float64.

    Per class: `class_acc` = TP / truth (recall), `iou` = TP / (truth + predicted - TP),
    `dice` = 2 TP / (truth + predicted). A class absent from the truth has NaN `class_acc`; one
    absent from both truth and prediction has NaN `iou` and `dice`. Means skip NaN (nanmean), so
    absent classes don't drag mIoU down; a class predicted but never true scores IoU 0 and counts.
    (torchvision's reference takes a plain mean, NaN as soon as one class is absent.)
    `fwiou` weights IoU by the class's share of true pixels.
    """
    cm = np.asarray(cm, dtype=np.float64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise SegjaxError(f"confusion matrix must be square, got shape {cm.shape}")
    tp, truth, predicted, total = np.diag(cm), cm.sum(1), cm.sum(0), cm.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        class_acc = tp / truth
        iou = tp / (truth + predicted - tp)
        dice = 2 * tp / (truth + predicted)
        global_acc = tp.sum() / total
        freq = truth / total
    present = truth > 0
    return {
        "global_acc": float(global_acc),
        "class_acc": class_acc,
        "mean_acc": _nanmean(class_acc),
        "iou": iou,
        "miou": _nanmean(iou),
        "fwiou": float((freq[present] * iou[present]).sum()) if total else float("nan"),
        "dice": dice,
        "mean_dice": _nanmean(dice),
    }


def saliency_sums(prob, target, valid=None, normalize: bool = True, ignore_index: int = 255) -> dict:
    """Per-batch sums for `saliency_scores`, as the U-2-Net evaluation tool computes them.

    prob: (N, H, W) or (N, H, W, 1) saliency in [0, 1] (sigmoid of the fused logits); target:
    same shape, ground truth in [0, 1] (float, or 0/1 integers), `ignore_index` on void pixels
    (padding), which count nowhere; valid: optional (N,) 0/1 weights (padding images out; an image
    with no non-void pixel is left out too).
    Per image, as U-2-Net's test script and xuebinqin/Binary-Segmentation-Evaluation-Tool:
      - `normalize`: min-max normalise the map (U-2-Net's normPRED); then round it to 8 bits,
        levels 0..255 (the saved PNG);
      - foreground truth = target > 128/255;
      - for each of 255 thresholds s = 0..254, positive = level > s:
        precision = TP / (TP + FP + 1e-8), recall = TP / (#foreground + 1e-8);
      - MAE = mean |map - target| on the (normalised, not rounded) float map.
    Returns {"mae": sum of per-image MAE, "precision", "recall": (255,) sums of per-image curves,
    "count": number of images}, float32.
    """
    prob = jnp.asarray(prob, jnp.float32)
    target = jnp.asarray(target, jnp.float32)
    if prob.shape != target.shape:
        raise SegjaxError(f"saliency map shape {prob.shape} != target shape {target.shape}")
    n = prob.shape[0]
    prob, target = prob.reshape(n, -1), target.reshape(n, -1)
    pixel_ok = target != ignore_index
    num_ok = pixel_ok.sum(1)
    if normalize:
        lo = jnp.min(jnp.where(pixel_ok, prob, jnp.inf), axis=1, keepdims=True)
        hi = jnp.max(jnp.where(pixel_ok, prob, -jnp.inf), axis=1, keepdims=True)
        lo, hi = jnp.where(num_ok[:, None] > 0, lo, 0.0), jnp.where(num_ok[:, None] > 0, hi, 1.0)
        prob = (prob - lo) / jnp.maximum(hi - lo, _EPS)
    weight = (num_ok > 0).astype(jnp.float32)
    if valid is not None:
        weight = weight * jnp.asarray(valid, jnp.float32)

    level = jnp.clip(jnp.round(prob * 255.0), 0, 255).astype(jnp.int32)
    fg = target > 128.0 / 255.0
    # per image 512 bins (256 background levels, 256 foreground levels); void pixels -> a dropped bin
    bins = jnp.where(pixel_ok, jnp.arange(n)[:, None] * 512 + fg * 256 + level, n * 512)
    hist = jnp.bincount(bins.reshape(-1), length=n * 512 + 1)[:-1].reshape(n, 2, 256).astype(jnp.float32)
    above = jnp.cumsum(hist[..., ::-1], axis=-1)[..., ::-1]  # above[..., t] = #pixels with level >= t
    fp, tp = above[:, 0, 1:], above[:, 1, 1:]  # level > s  <=>  level >= s + 1, s = 0..254
    precision = tp / (tp + fp + _EPS)
    recall = tp / (hist[:, 1].sum(-1, keepdims=True) + _EPS)
    mae = jnp.sum(jnp.where(pixel_ok, jnp.abs(prob - target), 0.0), axis=1) / jnp.maximum(num_ok, 1)
    return {
        "mae": jnp.sum(weight * mae),
        "precision": jnp.sum(weight[:, None] * precision, axis=0),
        "recall": jnp.sum(weight[:, None] * recall, axis=0),
        "count": jnp.sum(weight),
    }


def saliency_scores(sums) -> dict:
    """{"mae", "max_f"} from accumulated `saliency_sums`.

    Precision and recall curves are averaged over images first, then F = (1 + b2) P R / (b2 P + R)
    with b2 = 0.3 at every threshold, and max F is the best threshold for the whole data set
    (the evaluation tool's dataset-level curve, not a mean of per-image best F).
    """
    count = float(sums["count"])
    if count <= 0:
        raise SegjaxError("saliency_scores: no images were accumulated")
    precision = np.asarray(sums["precision"], np.float64) / count
    recall = np.asarray(sums["recall"], np.float64) / count
    f = (1 + F_BETA_SQUARED) * precision * recall / (F_BETA_SQUARED * precision + recall + _EPS)
    return {"mae": float(sums["mae"]) / count, "max_f": float(f.max())}


def format_table(scores: dict, class_names=None) -> str:
    """Per-class IoU / accuracy / Dice table in percent, then the global numbers."""
    iou = np.asarray(scores["iou"])
    names = [str(i) for i in range(iou.size)] if class_names is None else list(class_names)
    if len(names) != iou.size:
        raise SegjaxError(f"{len(names)} class names for {iou.size} classes; pass one name per class")
    width = max(len("class"), *map(len, names))

    def pct(x):
        return f"{100 * x:7.2f}" if np.isfinite(x) else f"{'-':>7}"

    lines = [f"{'class':<{width}}  {'IoU':>7}  {'acc':>7}  {'dice':>7}"]
    for i, name in enumerate(names):
        lines.append(f"{name:<{width}}  {pct(iou[i])}  {pct(scores['class_acc'][i])}  {pct(scores['dice'][i])}")
    lines.append(
        f"global acc {pct(scores['global_acc']).strip()}  mean acc {pct(scores['mean_acc']).strip()}  "
        f"mIoU {pct(scores['miou']).strip()}  fwIoU {pct(scores['fwiou']).strip()}"
    )
    return "\n".join(lines)
