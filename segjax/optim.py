"""Optimisers with PyTorch semantics, built from Optax pieces (plain Optax state: jit- and checkpoint-safe).

"sgd"   = torch.optim.SGD(momentum, weight_decay, nesterov, dampening=0): weight decay is coupled,
          d = g + wd * p, then the momentum buffer b = mu * b + d (b = d on the first step),
          then p -= lr * (d + mu * b if nesterov else b).
"adamw" = torch.optim.AdamW: p -= lr * (m_hat / (sqrt(v_hat) + eps) + wd * p) (decoupled decay;
          with weight_decay=0 this is Adam, as U-2-Net trains). Optax computes the bias correction
          1 - b2**t in float32 (0.999 -> 0.99900001), torch in float64: the first steps' rates
          differ by ~1e-5 relative, less as t grows.

`lr_mult` scales the learning rate of the parameters under some top-level names, like a PyTorch
param group with its own lr: torchvision's segmentation reference trains `aux_classifier` at 10x,
`lr_mult={"aux_classifier": 10.0}`. The whole update of those parameters is scaled, which is what
a larger group lr does in torch for both optimisers (lr multiplies the decay term too).

`grad_clip_norm` clips the raw gradients to that global L2 norm before anything else, like
`torch.nn.utils.clip_grad_norm_` before `optimizer.step()` (torch divides by norm + 1e-6, Optax by
the norm: a relative difference of 1e-6 / norm).

`tx.update(grads, state, params)` needs `params` whenever weight_decay > 0.
"""

from __future__ import annotations

from typing import Mapping

import jax
import optax

from segjax.errors import SegjaxError

_DEFAULT_GROUP = "__default__"


def make_optimizer(
    name: str,
    schedule: optax.ScalarOrSchedule,
    *,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    nesterov: bool = False,
    lr_mult: Mapping[str, float] | None = None,
    grad_clip_norm: float | None = None,
) -> optax.GradientTransformation:
    """Build "sgd" or "adamw" (betas 0.9/0.999, eps 1e-8: torch's defaults); weight decay applies to
    every parameter, as the torchvision reference does. `lr_mult` scales the updates of top-level
    parameter groups (e.g. {"aux_classifier": 10.0})."""
    if weight_decay < 0:
        raise SegjaxError(f"weight_decay must be >= 0, got {weight_decay}")
    if grad_clip_norm is not None and grad_clip_norm <= 0:
        raise SegjaxError(f"grad_clip_norm must be > 0 or None, got {grad_clip_norm}")

    parts = []
    if grad_clip_norm is not None:
        parts.append(optax.clip_by_global_norm(grad_clip_norm))
    decay = optax.add_decayed_weights(weight_decay) if weight_decay else None
    if name == "sgd":
        if nesterov and momentum <= 0:
            raise SegjaxError("nesterov SGD needs momentum > 0; set momentum (e.g. 0.9) or nesterov=False")
        parts += [decay] if decay else []
        parts += [optax.trace(decay=momentum, nesterov=nesterov)] if momentum else []
    elif name == "adamw":
        parts.append(optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8))
        parts += [decay] if decay else []
    else:
        raise SegjaxError(f"unknown optimizer {name!r}; use 'sgd' or 'adamw'")
    parts.append(optax.scale_by_learning_rate(schedule))
    if lr_mult:
        parts.append(_scale_groups(dict(lr_mult)))
    return optax.chain(*parts)


def _scale_groups(lr_mult: dict[str, float]) -> optax.GradientTransformation:
    """Multiply the updates under each top-level name in `lr_mult` by its factor."""
    for key, mult in lr_mult.items():
        if mult <= 0:
            raise SegjaxError(f"lr_mult[{key!r}] must be > 0, got {mult}")

    def labels(tree):
        missing = sorted(set(lr_mult) - set(tree.keys()))
        if missing:
            raise SegjaxError(
                f"lr_mult names {missing}, which the model does not have; "
                f"its top-level parameters are {sorted(tree.keys())}"
            )
        return jax.tree_util.tree_map_with_path(
            lambda path, _: path[0].key if path[0].key in lr_mult else _DEFAULT_GROUP, tree
        )

    transforms = {key: optax.scale(mult) for key, mult in lr_mult.items()}
    transforms[_DEFAULT_GROUP] = optax.identity()
    return optax.multi_transform(transforms, labels)
