"""Learning-rate schedules, per iteration, equal to the PyTorch schedulers the recipes use.

An Optax schedule maps the number of updates already applied, `t`, to the learning rate of the next
update. PyTorch's reference scripts call `lr_scheduler.step()` after every `optimizer.step()`, so the
learning rate of update `t` there is the scheduler's value after `t` steps: the same indexing.

`poly` (torchvision segmentation reference, `--lr-warmup-epochs`):
    t <  w:  base_lr * (f + (1 - f) * t / w)              LinearLR(start_factor=f, total_iters=w)
    t >= w:  base_lr * (1 - (t - w) / (T - w)) ** power   PolynomialLR(total_iters=T - w)
    with SequentialLR(milestones=[w]); T = total_steps, w = warmup_steps, f = warmup_factor.
    After T the rate stays 0, as PolynomialLR's does.

`cosine` (torchvision classification reference): the same linear warmup, then
    end_lr + (base_lr - end_lr) * (1 + cos(pi * (t - w) / (T - w))) / 2
    = CosineAnnealingLR(T_max=T - w, eta_min=end_lr). After T the rate stays end_lr, whereas
    CosineAnnealingLR would climb back up (it is periodic); training never runs past T.
"""

from __future__ import annotations

import optax

from segjax.errors import SegjaxError


def _check(base_lr: float, total_steps: int, warmup_steps: int, warmup_factor: float) -> None:
    if base_lr <= 0:
        raise SegjaxError(f"base_lr must be > 0, got {base_lr}")
    if total_steps <= 0:
        raise SegjaxError(f"total_steps must be > 0, got {total_steps}; train for at least one step")
    if not 0 <= warmup_steps < total_steps:
        raise SegjaxError(
            f"warmup_steps={warmup_steps} must be in [0, total_steps={total_steps}); "
            "shorten the warmup or train longer"
        )
    if not 0 < warmup_factor <= 1:
        raise SegjaxError(f"warmup_factor must be in (0, 1], got {warmup_factor}")


def _with_warmup(decay: optax.Schedule, base_lr: float, warmup_steps: int,
                 warmup_factor: float) -> optax.Schedule:
    if warmup_steps == 0:
        return decay
    warmup = optax.linear_schedule(base_lr * warmup_factor, base_lr, transition_steps=warmup_steps)
    return optax.join_schedules([warmup, decay], boundaries=[warmup_steps])


def poly(base_lr: float, total_steps: int, power: float = 0.9, warmup_steps: int = 0,
         warmup_factor: float = 1e-3) -> optax.Schedule:
    """Linear warmup from `base_lr * warmup_factor`, then polynomial decay to 0 at `total_steps`."""
    _check(base_lr, total_steps, warmup_steps, warmup_factor)
    decay = optax.polynomial_schedule(base_lr, 0.0, power, transition_steps=total_steps - warmup_steps)
    return _with_warmup(decay, base_lr, warmup_steps, warmup_factor)


def cosine(base_lr: float, total_steps: int, warmup_steps: int = 0, warmup_factor: float = 1e-3,
           end_lr: float = 0.0) -> optax.Schedule:
    """Linear warmup from `base_lr * warmup_factor`, then half a cosine to `end_lr` at `total_steps`."""
    _check(base_lr, total_steps, warmup_steps, warmup_factor)
    if not 0 <= end_lr <= base_lr:
        raise SegjaxError(f"end_lr={end_lr} must be in [0, base_lr={base_lr}]")
    decay = optax.cosine_decay_schedule(base_lr, total_steps - warmup_steps, alpha=end_lr / base_lr)
    return _with_warmup(decay, base_lr, warmup_steps, warmup_factor)
