"""Class probabilities from a model, optionally averaged over scales and horizontal flips (DeepLab v3).

Shared by validation during training, `segjax eval` and `segjax predict`.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from segjax import nn as snn


MS_RULES = ("mean-probs", "max-logits")


def predict_probs(apply_fn, variables, images: jax.Array, scales: Sequence[float] = (1.0,),
                  flip: bool = False, task: str = "segmentation", rule: str = "mean-probs") -> jax.Array:
    """(N, H, W, C) softmax probabilities (one sigmoid channel for saliency) at the input's H, W.

    Each scale resizes the input bilinearly, runs the model, resizes the logits back; rule
    "mean-probs" averages the probabilities of all scales (and their mirror images when `flip`),
    as DeepLab v3; "max-logits" takes the element-wise maximum of the logits, then the softmax, as
    DeepLab v2's multi-scale inference does (the caffe model maxes its stride-8 logits before
    upsampling; here they are maxed at the input's size).
    """
    if rule not in MS_RULES:
        raise ValueError(f"multi-scale rule {rule!r}: use one of {', '.join(MS_RULES)}")
    squash = (lambda z: jax.nn.sigmoid(z)) if task == "saliency" else (lambda z: jax.nn.softmax(z, axis=-1))
    n, h, w, _ = images.shape
    total, count, best = 0.0, 0, None
    for scale in scales:
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        x = images if size == (h, w) else snn.resize(images, size, "bilinear", align_corners=False)
        for mirrored in (False, True) if flip else (False,):
            xi = x[:, :, ::-1] if mirrored else x
            logits = apply_fn(variables, xi, train=False)["out"].astype(jnp.float32)
            if mirrored:
                logits = logits[:, :, ::-1]
            if size != (h, w):
                logits = snn.resize(logits, (h, w), "bilinear", align_corners=False)
            if rule == "max-logits":
                best = logits if best is None else jnp.maximum(best, logits)
            else:
                total = total + squash(logits)
                count += 1
    return squash(best) if rule == "max-logits" else total / count


def labels_from_probs(probs: jax.Array, task: str = "segmentation") -> jax.Array:
    if task == "saliency":
        return (probs[..., 0] > 0.5).astype(jnp.int32)
    return jnp.argmax(probs, axis=-1).astype(jnp.int32)
