"""Class probabilities from a model, optionally over scales and horizontal flips; loading a model to predict.

Shared by validation during training, `segjax eval` and `segjax predict`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp

from segjax import checkpoint, tasks
from segjax import nn as snn
from segjax.card import ModelCard


DEEPLAB_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
# Multi-scale rule -> its scales: DeepLab v3's averaged softmax, DeepLab v2's max of logits at 1, 0.75, 0.5.
MS_SCALES = {"mean-probs": DEEPLAB_SCALES, "max-logits": (0.5, 0.75, 1.0)}
MS_RULES = tuple(MS_SCALES)


def predict_probs(apply_fn, variables, images: jax.Array, scales: Sequence[float] = (1.0,),
                  flip: bool = False, task: str | tasks.Task = tasks.SEGMENTATION, rule: str = "mean-probs") -> jax.Array:
    """(N, H, W, C) softmax probabilities (one sigmoid channel for saliency) at the input's H, W.

    rule "mean-probs" (DeepLab v3): each scale resizes the input bilinearly, runs the model,
    resizes the logits back, and the probabilities of all scales (and their mirror images when
    `flip`) are averaged. rule "max-logits" (DeepLab v2): see `max_logits`.
    """
    if rule not in MS_RULES:
        raise ValueError(f"multi-scale rule {rule!r}: use one of {', '.join(MS_RULES)}")
    squash = tasks.get(task).activate
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


@dataclasses.dataclass(frozen=True)
class InferenceModel:
    """A model with its variables and the card that describes them: what evaluation and prediction need."""
    card: ModelCard
    model: object
    variables: dict

    @property
    def apply_fn(self):
        return self.model.apply

    @functools.cached_property
    def output_stride(self):
        """The card's output stride, measured on the model when the card predates it (1: no stride)."""
        if self.card.output_stride is not None:
            return self.card.output_stride
        from segjax import analysis
        return analysis.output_stride(self.model, variables=self.variables)["feature"] or 1


def load_for_inference(path: str) -> InferenceModel:
    """The model of a workdir, its checkpoints/ root, a step directory or a converted checkpoint; the
    variables are checked to fit the model its card describes."""
    from segjax.convert import check_fits, model_shapes

    variables, meta = checkpoint.load_variables(path)
    card = ModelCard.from_meta(meta, path)
    model = card.build()
    check_fits(variables, model_shapes(model, in_channels=card.in_channels),
               f"{path} (saved as model={card.model}, num_classes={card.num_classes})")
    return InferenceModel(card, model, variables)
