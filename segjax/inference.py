"""Class probabilities from a model, optionally over scales and horizontal flips; loading a model to predict.

Shared by validation during training, `segjax eval` and `segjax predict`.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp

from segjax import checkpoint
from segjax import nn as snn
from segjax.errors import SegjaxError


DEEPLAB_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
# Multi-scale rule -> its scales: DeepLab v3's averaged softmax, DeepLab v2's max of logits at 1, 0.75, 0.5.
MS_SCALES = {"mean-probs": DEEPLAB_SCALES, "max-logits": (0.5, 0.75, 1.0)}
MS_RULES = tuple(MS_SCALES)


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


@dataclasses.dataclass(frozen=True)
class InferenceModel:
    """A model with its variables, as a checkpoint describes it: what evaluation and prediction need."""
    model: object
    variables: dict
    task: str
    num_classes: int
    mean: tuple
    std: tuple

    @property
    def apply_fn(self):
        return self.model.apply


def load_for_inference(path: str) -> tuple[InferenceModel, dict]:
    """(InferenceModel, checkpoint meta) from a workdir, its checkpoints/ root, a step directory or a
    converted checkpoint; the variables are checked to fit the model the meta describes."""
    from segjax import models
    from segjax.convert import check_fits, model_shapes

    variables, meta = checkpoint.load_variables(path)
    kw = dict(meta.get("model_kwargs") or {})
    num_classes = int(meta.get("num_classes") or kw.pop("num_classes", 0) or 0)
    kw.pop("num_classes", None)
    if not num_classes:
        raise SegjaxError(f"{path}: the checkpoint does not say its number of classes")
    model = models.create(meta["model"], num_classes, **kw)
    check_fits(variables, model_shapes(model, in_channels=int(meta.get("in_channels", 3))),
               f"{path} (saved as model={meta['model']}, num_classes={num_classes})")
    task = meta.get("task") or ("saliency" if meta["model"].startswith("u2net") else "segmentation")
    if "mean" not in meta or "std" not in meta:  # written before checkpoints carried their normalisation
        from segjax.data.transforms import IMAGENET_MEAN, IMAGENET_STD
        meta = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, **meta}
    mean, std = tuple(meta["mean"]), tuple(meta["std"])
    return InferenceModel(model, variables, task, num_classes, mean, std), meta
