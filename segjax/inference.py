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

    rule "mean-probs" (DeepLab v3): each scale resizes the input bilinearly, runs the model,
    resizes the logits back, and the probabilities of all scales (and their mirror images when
    `flip`) are averaged. rule "max-logits" (DeepLab v2): see `max_logits`.
    """
    if rule not in MS_RULES:
        raise ValueError(f"multi-scale rule {rule!r}: use one of {', '.join(MS_RULES)}")
    squash = (lambda z: jax.nn.sigmoid(z)) if task == "saliency" else (lambda z: jax.nn.softmax(z, axis=-1))
    if rule == "max-logits":
        return squash(max_logits(apply_fn, variables, images, scales, flip))
    n, h, w, _ = images.shape
    total, count = 0.0, 0
    for scale in scales:
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        x = images if size == (h, w) else snn.resize(images, size, "bilinear", align_corners=False)
        for logits in _logits_and_mirror(lambda xi: apply_fn(variables, xi, train=False)["out"], x, flip):
            if size != (h, w):
                logits = snn.resize(logits, (h, w), "bilinear", align_corners=False)
            total = total + squash(logits)
            count += 1
    return total / count


def max_logits(apply_fn, variables, images: jax.Array, scales: Sequence[float] = (0.5, 0.75, 1.0),
               flip: bool = False) -> jax.Array:
    """DeepLab v2's multi-scale logits, as the reference that reaches the published number computes them.

    Each scale p resizes the input as `F.interpolate(scale_factor=p)` does (floor(H * p), samples at
    1/p). The model's logits at its own output stride (`upsample=False`) are resized to those of the
    unscaled input, maxed element-wise, and only then upsampled to the input size. The model must
    take `upsample` (see `supports_max_logits`): the DeepLab and FCN-ResNet models do.
    """
    def at_stride(x):
        return apply_fn(variables, x, train=False, upsample=False)["out"].astype(jnp.float32)

    size = jax.eval_shape(at_stride, images).shape[1:3]
    best = None
    for scale in scales:
        x = images if scale == 1 else snn.resize(images, None, scale_factor=scale)
        for logits in _logits_and_mirror(at_stride, x, flip):
            logits = snn.resize(logits, size, "bilinear", align_corners=False)
            best = logits if best is None else jnp.maximum(best, logits)
    return snn.resize(best, images.shape[1:3], "bilinear", align_corners=False)


def supports_max_logits(model) -> bool:
    import inspect
    return "upsample" in inspect.signature(type(model).__call__).parameters


def _logits_and_mirror(logits_of, x, flip: bool):
    """The logits of x and, when `flip`, those of its mirror image mirrored back."""
    yield logits_of(x).astype(jnp.float32)
    if flip:
        yield logits_of(x[:, :, ::-1]).astype(jnp.float32)[:, :, ::-1]


def labels_from_probs(probs: jax.Array, task: str = "segmentation") -> jax.Array:
    if task == "saliency":
        return (probs[..., 0] > 0.5).astype(jnp.int32)
    return jnp.argmax(probs, axis=-1).astype(jnp.int32)
