"""make_optimizer against torch.optim over several steps: decay, momentum, group lr, clipping, schedule."""

import jax
import numpy as np
import optax
import pytest
import torch

from segjax import schedules
from segjax.errors import SegjaxError
from segjax.optim import make_optimizer

SHAPES = {"backbone": {"conv": (3, 4), "bias": (4,)}, "classifier": {"w": (4, 2)}, "aux_classifier": {"w": (4, 3)}}
STEPS, BASE_LR, TOTAL = 6, 0.05, 10


def initial_params(seed=0):
    rng = np.random.default_rng(seed)
    return {g: {k: rng.normal(size=s).astype(np.float32) for k, s in leaves.items()} for g, leaves in SHAPES.items()}


def gradient(name, value, step):
    """A gradient that depends on the parameter (so decay and momentum change the trajectory)."""
    rng = np.random.default_rng(1000 * step + sum(map(ord, name)))
    a = rng.uniform(0.5, 2.0, size=value.shape).astype(np.float32)
    b = rng.normal(size=value.shape).astype(np.float32)
    return (a * value + 3.0 * b).astype(np.float32)


def run_torch(kind, kw, clip, aux_mult):
    params = initial_params()
    tensors = {f"{g}/{k}": torch.nn.Parameter(torch.from_numpy(v.copy())) for g, leaves in params.items()
               for k, v in leaves.items()}
    main = [t for n, t in tensors.items() if not n.startswith("aux_classifier/")]
    aux = [t for n, t in tensors.items() if n.startswith("aux_classifier/")]
    groups = [{"params": main}, {"params": aux, "lr": BASE_LR * aux_mult}]
    if kind == "sgd":
        opt = torch.optim.SGD(groups, lr=BASE_LR, momentum=kw["momentum"], weight_decay=kw["weight_decay"],
                              nesterov=kw["nesterov"])
    else:
        opt = torch.optim.AdamW(groups, lr=BASE_LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=kw["weight_decay"])
    sched = torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=TOTAL, power=0.9)
    for step in range(STEPS):
        for n, t in tensors.items():
            t.grad = torch.from_numpy(gradient(n, t.detach().numpy(), step))
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(list(tensors.values()), clip)
        opt.step()
        sched.step()
    return {n: t.detach().numpy() for n, t in tensors.items()}


def run_segjax(kind, kw, clip, aux_mult):
    tx = make_optimizer(kind, schedules.poly(BASE_LR, TOTAL), grad_clip_norm=clip,
                        lr_mult={"aux_classifier": aux_mult}, **kw)
    params = jax.tree.map(jax.numpy.asarray, initial_params())
    state = tx.init(params)
    update = jax.jit(tx.update)
    for step in range(STEPS):
        grads = {g: {k: gradient(f"{g}/{k}", np.asarray(v), step) for k, v in leaves.items()}
                 for g, leaves in params.items()}
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return {f"{g}/{k}": np.asarray(v) for g, leaves in params.items() for k, v in leaves.items()}


# Optax computes Adam's bias correction 1 - b2**t in float32, where 0.999 is 0.99900001: 1e-5 relative
# off on step 1 (torch uses Python floats), fading as t grows. At lr 0.5 (aux group) over 6 steps that
# is ~1e-5 in the parameters; SGD has no such term.
ATOL = {"sgd": 2e-6, "adamw": 3e-5}

CASES = [
    ("sgd", dict(momentum=0.9, weight_decay=1e-2, nesterov=False), None),
    ("sgd", dict(momentum=0.9, weight_decay=1e-2, nesterov=True), 2.0),
    ("sgd", dict(momentum=0.0, weight_decay=0.0, nesterov=False), None),
    ("adamw", dict(weight_decay=0.05), None),
    ("adamw", dict(weight_decay=0.05), 2.0),
]


@pytest.mark.parametrize("kind, kw, clip", CASES)
def test_matches_torch_optimizer_with_aux_group_and_poly_schedule(kind, kw, clip):
    ref = run_torch(kind, kw, clip, aux_mult=10.0)
    ours = run_segjax(kind, kw, clip, aux_mult=10.0)
    start = {f"{g}/{k}": v for g, leaves in initial_params().items() for k, v in leaves.items()}
    worst = 0.0
    for name in ref:
        assert not np.allclose(ref[name], start[name], atol=1e-3), f"{name} did not move"
        worst = max(worst, float(np.abs(ours[name] - ref[name]).max()))
        np.testing.assert_allclose(ours[name], ref[name], rtol=1e-5, atol=ATOL[kind], err_msg=name)
    print(f"{kind} {kw} clip={clip}: max abs err {worst:.3g}")


def test_clipping_is_active_in_the_clipped_cases():
    # With clip=2.0 the trajectory must differ from the unclipped one, or the test above proves nothing.
    kw = dict(momentum=0.9, weight_decay=1e-2, nesterov=True)
    clipped, free = run_torch("sgd", kw, 2.0, 10.0), run_torch("sgd", kw, None, 10.0)
    assert max(np.abs(clipped[n] - free[n]).max() for n in free) > 1e-2


def test_lr_mult_scales_only_the_named_group():
    kw = dict(momentum=0.9, weight_decay=1e-2, nesterov=False)
    x1, x10 = run_segjax("sgd", kw, None, 1.0), run_segjax("sgd", kw, None, 10.0)
    start = {f"{g}/{k}": v for g, leaves in initial_params().items() for k, v in leaves.items()}
    for name in x1:
        if name.startswith("aux_classifier/"):
            assert np.abs(x10[name] - start[name]).max() > 3 * np.abs(x1[name] - start[name]).max()
        else:
            np.testing.assert_array_equal(x10[name], x1[name])


def test_bad_options_raise_one_line_errors():
    with pytest.raises(SegjaxError, match="unknown optimizer"):
        make_optimizer("rmsprop", 0.1)
    tx = make_optimizer("sgd", 0.1, lr_mult={"aux_clasifier": 10.0})
    with pytest.raises(SegjaxError, match="aux_clasifier"):
        tx.init(jax.tree.map(jax.numpy.asarray, initial_params()))


def test_state_round_trips_through_orbax_and_training_continues_identically(tmp_path):
    import orbax.checkpoint as ocp

    tx = make_optimizer("sgd", schedules.poly(BASE_LR, TOTAL, warmup_steps=2), grad_clip_norm=1.0,
                        lr_mult={"aux_classifier": 10.0})
    params = jax.tree.map(jax.numpy.asarray, initial_params())
    grads = jax.tree.map(lambda p: 0.5 * p + 1.0, params)
    update = jax.jit(tx.update)
    _, state = update(grads, tx.init(params), params)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "opt", state)
        ckptr.wait_until_finished()
        restored = ckptr.restore(tmp_path / "opt", tx.init(params))
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    expected, _ = update(grads, state, params)
    got, _ = update(grads, restored, params)
    jax.tree.map(np.testing.assert_array_equal, got, expected)
