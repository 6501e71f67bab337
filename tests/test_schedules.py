"""Schedules equal the PyTorch schedulers, stepped with an optimizer as the reference scripts do."""

import numpy as np
import pytest
import torch

from segjax import schedules
from segjax.errors import SegjaxError


def torch_lrs(make_scheduler, base_lr, steps):
    """The lr each of `steps` updates uses: read the group lr, optimizer.step(), scheduler.step()."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=base_lr, momentum=0.9)
    scheduler = make_scheduler(optimizer)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return np.asarray(lrs, np.float64)


def optax_lrs(schedule, steps):
    return np.asarray(schedule(np.arange(steps)), np.float64)  # Optax schedules take an array of steps


def assert_close(ours, ref, base_lr):
    # Optax evaluates in float32: allow float32 rounding relative to the peak rate. Near the end the
    # relative error grows: the cosine's 1 + cos(.) cancels, and XLA turns t / T into t * (1 / T),
    # so at t = T poly gives (6e-8) ** 0.9 * base_lr ~ 3e-7 * base_lr instead of 0.
    print(f"max abs err {np.abs(ours - ref).max():.3g} (base lr {base_lr})")
    np.testing.assert_allclose(ours, ref, rtol=2e-6, atol=base_lr * 5e-7)


@pytest.mark.parametrize("total, power", [(97, 0.9), (40, 2.0)])
def test_poly_equals_torch_polynomial_lr_at_every_step(total, power):
    base_lr = 0.02
    steps = total + 5  # past the end the rate stays at 0 in both
    ref = torch_lrs(lambda o: torch.optim.lr_scheduler.PolynomialLR(o, total_iters=total, power=power),
                    base_lr, steps)
    ours = optax_lrs(schedules.poly(base_lr, total, power=power), steps)
    assert ref[0] == base_lr and ref[-1] == 0.0
    assert_close(ours, ref, base_lr)


def test_poly_with_warmup_equals_torchvision_reference_sequence():
    base_lr, total, warmup, factor = 0.02, 120, 15, 0.01
    main_iters = total - warmup  # torchvision: iters_per_epoch * (epochs - lr_warmup_epochs)

    def make(o):
        warm = torch.optim.lr_scheduler.LinearLR(o, start_factor=factor, total_iters=warmup)
        main = torch.optim.lr_scheduler.PolynomialLR(o, total_iters=main_iters, power=0.9)
        return torch.optim.lr_scheduler.SequentialLR(o, schedulers=[warm, main], milestones=[warmup])

    ref = torch_lrs(make, base_lr, total + 3)
    ours = optax_lrs(schedules.poly(base_lr, total, warmup_steps=warmup, warmup_factor=factor), total + 3)
    assert ref[0] == pytest.approx(base_lr * factor) and ref[warmup] == pytest.approx(base_lr)
    # and the closed form of the module docstring
    t = np.arange(total)
    closed = np.where(t < warmup, base_lr * (factor + (1 - factor) * t / warmup),
                      base_lr * np.clip(1 - (t - warmup) / main_iters, 0, 1) ** 0.9)
    np.testing.assert_allclose(ref[:total], closed, rtol=1e-9, atol=1e-15)
    assert_close(ours, ref, base_lr)


@pytest.mark.parametrize("warmup, end_lr", [(0, 0.0), (8, 1e-4)])
def test_cosine_equals_torch_cosine_annealing(warmup, end_lr):
    base_lr, total, factor = 0.1, 60, 0.1

    def make(o):
        main = torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=total - warmup, eta_min=end_lr)
        if not warmup:
            return main
        warm = torch.optim.lr_scheduler.LinearLR(o, start_factor=factor, total_iters=warmup)
        return torch.optim.lr_scheduler.SequentialLR(o, schedulers=[warm, main], milestones=[warmup])

    ref = torch_lrs(make, base_lr, total + 1)  # comparable up to T; torch's cosine is periodic after
    ours = optax_lrs(schedules.cosine(base_lr, total, warmup, factor, end_lr), total + 1)
    assert ref[-1] == pytest.approx(end_lr, abs=1e-12)
    assert_close(ours, ref, base_lr)


def test_schedule_is_jittable_on_a_traced_step():
    import jax
    import jax.numpy as jnp

    schedule = schedules.poly(0.01, 100, warmup_steps=10)
    got = jax.jit(jax.vmap(schedule))(jnp.arange(100))
    t = np.arange(100)
    closed = np.where(t < 10, 0.01 * (1e-3 + (1 - 1e-3) * t / 10), 0.01 * (1 - (t - 10) / 90) ** 0.9)
    np.testing.assert_allclose(np.asarray(got), closed, rtol=2e-6, atol=0.01 * 2e-7)


@pytest.mark.parametrize("kwargs", [dict(base_lr=0.0, total_steps=10), dict(base_lr=0.1, total_steps=0),
                                    dict(base_lr=0.1, total_steps=10, warmup_steps=10),
                                    dict(base_lr=0.1, total_steps=10, warmup_steps=2, warmup_factor=0.0)])
def test_bad_arguments_raise_one_line_errors(kwargs):
    with pytest.raises(SegjaxError):
        schedules.poly(**kwargs)
