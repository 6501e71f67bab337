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


def segmentation_loss(outputs: Mapping, labels, aux_weight: float = 0.5, ignore_index: int = 255,
                      class_weights=None, dice_weight: float = 0.0):
    """torchvision's criterion: CE(out) + aux_weight * CE(aux) when the model has an aux head.

    `dice_weight` > 0 adds dice_weight * dice_loss(out) (the UNet recipe: CE + 1.0 * Dice).
    """
    loss = cross_entropy(outputs["out"], labels, ignore_index, class_weights)
    if dice_weight:
        loss = loss + dice_weight * dice_loss(outputs["out"], labels, ignore_index=ignore_index)
    if "aux" in outputs and aux_weight:
        loss = loss + aux_weight * cross_entropy(outputs["aux"], labels, ignore_index, class_weights)
    return loss
