"""Segmentation losses on logits, computed in float32 whatever the logits' dtype; all jittable.

Shapes: logits (..., C) channels-last (N, H, W, C); labels (...) integer class indices with
`ignore_index` (255, VOC's void) marking pixels that count nowhere. Labels outside [0, C) other
than `ignore_index` are a data bug: they make the cross-entropy NaN (no exception under jit).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import optax

from segjax.errors import SegjaxError


def _valid_and_safe(labels, ignore_index):
    labels = jnp.asarray(labels).astype(jnp.int32)
    valid = labels != ignore_index
    return valid, jnp.where(valid, labels, 0)


def _safe_divide(num, den):
    """num / den, and 0 where den == 0 (with finite gradients there)."""
    return num / jnp.where(den > 0, den, 1.0)


def cross_entropy(logits, labels, ignore_index: int = 255, class_weights=None):
    """torch.nn.functional.cross_entropy(reduction="mean", ignore_index, weight) on NHWC logits.

    The mean is weighted: sum_i w[y_i] * nll_i / sum_i w[y_i] over non-ignored pixels. Where torch
    returns NaN (every pixel ignored) this returns 0, so an all-void crop cannot poison training.
    """
    logits = jnp.asarray(logits).astype(jnp.float32)
    valid, safe = _valid_and_safe(labels, ignore_index)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(log_probs, safe[..., None], axis=-1)[..., 0]
    nll = jnp.where((safe >= 0) & (safe < logits.shape[-1]), nll, jnp.nan)  # out-of-range label: NaN
    weight = valid.astype(jnp.float32)
    if class_weights is not None:
        weight = weight * jnp.asarray(class_weights, jnp.float32)[safe]
    return _safe_divide(jnp.sum(jnp.where(valid, weight * nll, 0.0)), jnp.sum(weight))


def dice_loss(logits, labels, num_classes: int | None = None, ignore_index: int = 255,
              smooth: float = 1e-6):
    """1 - mean over classes of soft Dice on softmax probabilities, void pixels left out.

    dice_c = (2 * sum(p_c * y_c) + smooth) / (sum(p_c) + sum(y_c) + smooth), sums over the whole
    batch and every pixel, mean over all C classes (background included). This is the UNet
    reproduction's (milesial/Pytorch-UNet) `dice_loss(softmax, one_hot, multiclass=True)`, whose
    epsilon is 1e-6: a class absent from both prediction and truth scores 1.
    """
    logits = jnp.asarray(logits).astype(jnp.float32)
    if num_classes is not None and num_classes != logits.shape[-1]:
        raise SegjaxError(f"dice_loss: num_classes={num_classes} but logits have {logits.shape[-1]} channels")
    valid, safe = _valid_and_safe(labels, ignore_index)
    mask = valid[..., None].astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1) * mask
    onehot = jax.nn.one_hot(safe, logits.shape[-1], dtype=jnp.float32) * mask
    axes = tuple(range(logits.ndim - 1))
    inter = jnp.sum(probs * onehot, axis=axes)
    sets = jnp.sum(probs, axis=axes) + jnp.sum(onehot, axis=axes)
    return 1.0 - jnp.mean((2.0 * inter + smooth) / (sets + smooth))


def soft_iou_loss(logits, labels, ignore_index: int = 255):
    """1 - sum(X * Y) / sum(X + Y - X * Y) over the whole batch, X probabilities, Y targets.

    C > 1: X = softmax, Y = one-hot labels. C == 1 (saliency): X = sigmoid, Y = `labels` as
    targets in [0, 1], shape (N, H, W) or (N, H, W, 1). Void pixels (`ignore_index`) left out.
    """
    logits = jnp.asarray(logits).astype(jnp.float32)
    if logits.shape[-1] == 1:
        target = _binary_target(labels, logits.shape)
        valid = (target != ignore_index).astype(jnp.float32)
        probs = jax.nn.sigmoid(logits) * valid
        target = target * valid
    else:
        valid, safe = _valid_and_safe(labels, ignore_index)
        mask = valid[..., None].astype(jnp.float32)
        probs = jax.nn.softmax(logits, axis=-1) * mask
        target = jax.nn.one_hot(safe, logits.shape[-1], dtype=jnp.float32) * mask
    inter = jnp.sum(probs * target)
    union = jnp.sum(probs + target - probs * target)
    return 1.0 - _safe_divide(inter, union)


def _binary_target(target, logits_shape):
    target = jnp.asarray(target).astype(jnp.float32)
    if target.ndim == len(logits_shape) - 1:
        target = target[..., None]
    if target.shape != tuple(logits_shape):
        raise SegjaxError(f"binary target shape {target.shape} does not match logits {tuple(logits_shape)}")
    return target


def binary_cross_entropy(logits, target, ignore_index: int = 255):
    """Mean BCE-with-logits (torch.nn.BCEWithLogitsLoss) over the non-void pixels.

    target: (N, H, W) or (N, H, W, 1) in [0, 1] (float or 0/1 integers); pixels equal to
    `ignore_index` (void padding of a crop) count nowhere.
    """
    logits = jnp.asarray(logits).astype(jnp.float32)
    target = _binary_target(target, logits.shape)
    valid = target != ignore_index
    bce = optax.sigmoid_binary_cross_entropy(logits, jnp.where(valid, target, 0.0))
    return _safe_divide(jnp.sum(jnp.where(valid, bce, 0.0)), jnp.sum(valid.astype(jnp.float32)))


def u2net_bce(outputs: Mapping, target, ignore_index: int = 255):
    """U-2-Net's muti_bce_loss_fusion on logits: BCE(fused) + sum of BCE(side_i), each a pixel mean.

    `outputs["out"]` is the fused map (d0), `outputs["sides"]` the side maps (d1..d6), all
    (N, H, W, 1) logits. U-2-Net applies nn.BCELoss to sigmoid outputs; on logits this is the same
    loss, stable (torch's BCELoss clamps log at -100, i.e. differs only past |logit| ~ 100).
    Void pixels (`ignore_index`) are left out of every mean (U-2-Net itself has none).
    """
    sides: Sequence = outputs.get("sides", ())
    return binary_cross_entropy(outputs["out"], target, ignore_index) + sum(
        binary_cross_entropy(side, target, ignore_index) for side in sides
    )


LOSSES = ("ce", "ce+dice", "soft_iou", "ce+soft_iou", "u2net_bce")


def make_loss(kind: str, num_classes: int, *, aux_weight: float = 0.5, dice_weight: float = 1.0,
              class_weights=None, ignore_index: int = 255):
    """The recipe's loss, `loss(outputs, labels) -> scalar`, on the model's float32 output dict.

    "ce": torchvision's criterion, CE(out) + aux_weight * CE(aux) when the model has an aux head;
    "ce+dice": that + dice_weight * dice(out) (the UNet recipe); "soft_iou": 1 - I/U of the
    probabilities (Rahman & Wang 2016's soft IoU, I = sum X*Y, U = sum X + Y - X*Y), plus the aux head's at
    aux_weight; "ce+soft_iou": "ce" + soft_iou(out); "u2net_bce": U-2-Net's fused + side BCE.
    """
    weights = None if class_weights is None or not len(class_weights) else jnp.asarray(class_weights, jnp.float32)
    if weights is not None and weights.shape != (num_classes,):
        raise SegjaxError(f"config.class_weights has {weights.shape[0]} entries; the model has {num_classes} classes")

    def with_aux(term):
        def loss(outputs, labels):
            total = term(outputs["out"], labels)
            if "aux" in outputs and aux_weight:
                total = total + aux_weight * term(outputs["aux"], labels)
            return total
        return loss

    ce = with_aux(lambda logits, labels: cross_entropy(logits, labels, ignore_index, weights))
    if kind == "ce":
        return ce
    if kind == "ce+dice":
        return lambda outputs, labels: ce(outputs, labels) + dice_weight * dice_loss(
            outputs["out"], labels, num_classes, ignore_index=ignore_index)
    if kind == "soft_iou":
        return with_aux(lambda logits, labels: soft_iou_loss(logits, labels, ignore_index))
    if kind == "ce+soft_iou":
        return lambda outputs, labels: ce(outputs, labels) + soft_iou_loss(outputs["out"], labels, ignore_index)
    if kind == "u2net_bce":
        return lambda outputs, labels: u2net_bce(outputs, labels.astype(jnp.float32), ignore_index)
    raise SegjaxError(f"config.loss={kind!r}: use one of {', '.join(LOSSES)}")
