"""The pure train/eval steps: overfitting, NaN guard, mixed precision, and jit-sharded == pmap == 1 device."""
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import functools

from segjax import losses, optim, schedules
from segjax import step as S
from tests.tiny_model import TinySeg

LOSS = losses.make_loss("ce", 3)
train_step = functools.partial(S.train_step, loss_fn=LOSS)


def eval_step(state, batch, axis_name=None):
    return S.eval_step(state.apply_fn, state.variables, batch, num_classes=3, axis_name=axis_name)


def tiny_state(dtype=jnp.float32, lr=0.05, optimizer="adamw", axis_name=None, size=32, base=8):
    model = TinySeg(3, base, axis_name, dtype)
    tx = optim.make_optimizer(optimizer, schedules.poly(lr, 1000), weight_decay=0.0)
    return S.create_train_state(jax.random.PRNGKey(0), model, tx, (size, size, 3))


def one_batch(n=2, size=32, seed=0, void=True):
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(n, size, size, 3)).astype(np.float32)
    yy, xx = np.mgrid[:size, :size]
    mask = np.zeros((n, size, size), np.int32)
    for i in range(n):  # a disc (class 1) and a bar (class 2) the model must find from the image
        cy, cx = rng.integers(size // 4, size - size // 4, 2)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < (size // 6) ** 2
        mask[i][disc] = 1
        mask[i][:, : size // 4] = 2
        image[i][disc] += 3.0
        image[i][:, : size // 4] -= 3.0
        if void:
            mask[i][0, :] = 255
    return {"image": image, "mask": mask}


@pytest.fixture(scope="module")
def jitted_step():
    return jax.jit(train_step)


def test_overfits_one_batch_and_eval_is_perfect(jitted_step):
    state, batch = tiny_state(), one_batch()
    losses = []
    for step in range(150):
        state, m = jitted_step(state, batch, jax.random.PRNGKey(step))
        losses.append(float(m["loss"]))
    assert losses[-1] < 0.05 and losses[-1] < losses[0] / 20, losses[::20]
    assert int(state.step) == 150
    # eval_step on the same batch (BatchNorm running stats, train=False): the confusion matrix is nearly diagonal
    cm = np.asarray(jax.jit(eval_step)(state, batch)["confusion"])
    assert cm.sum() == int((batch["mask"] != 255).sum())  # void pixels are not counted
    assert np.trace(cm) / cm.sum() > 0.97


def test_nonfinite_step_leaves_state_untouched(jitted_step):
    state, batch = tiny_state(), one_batch()
    bad = {"image": batch["image"].copy(), "mask": batch["mask"]}
    bad["image"][0, 3, 3, 0] = np.nan
    new, m = jitted_step(state, bad, jax.random.PRNGKey(0))
    assert int(m["nonfinite"]) == 1 and int(new.step) == 1
    for a, b in zip(jax.tree_util.tree_leaves((state.params, state.batch_stats, state.opt_state)),
                    jax.tree_util.tree_leaves((new.params, new.batch_stats, new.opt_state))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    new, m = jitted_step(new, batch, jax.random.PRNGKey(1))  # a good batch afterwards trains normally
    assert int(m["nonfinite"]) == 0 and np.isfinite(float(m["loss"]))


def test_nonfinite_update_from_finite_gradients_is_caught_too():
    """A NaN learning rate leaves loss and gradients finite but the update NaN: the step must not apply it."""
    state, batch = tiny_state(lr=float("nan")), one_batch()
    new, m = jax.jit(train_step)(state, batch, jax.random.PRNGKey(0))
    assert np.isfinite(float(m["loss"])) and np.isfinite(float(m["grad_norm"]))
    assert int(m["nonfinite"]) == 1
    for a, b in zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(new.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_lr_mult_must_name_parameter_groups_of_the_model():
    from segjax import config as config_lib, convert, models
    from segjax.errors import SegjaxError
    from segjax.train import build_optimizer

    config = config_lib.load_config("deeplabv1_largefov_voc")
    groups = set(convert.model_shapes(models.create(config.model, config.num_classes))["params"])
    build_optimizer(config, 100, 10, groups)  # the recipe's own multipliers name real groups
    with config.unlocked():
        config.lr_mult = {"classifier": 10.0}  # deeplabv1's head is fc8: a silent no-op before
    with pytest.raises(SegjaxError, match="'classifier'.*fc8"):
        build_optimizer(config, 100, 10, groups)


def test_bfloat16_compute_keeps_float32_params_and_loss():
    state, batch = tiny_state(dtype=jnp.bfloat16, size=16, base=4), one_batch(size=16)
    new, m = jax.jit(train_step)(state, batch, jax.random.PRNGKey(0))
    assert m["loss"].dtype == jnp.float32 and np.isfinite(float(m["loss"]))
    kinds = {x.dtype for x in jax.tree_util.tree_leaves((new.params, new.opt_state, new.batch_stats))
             if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)}
    assert kinds == {jnp.dtype(jnp.float32)}
    moved = [float(jnp.abs(a - b).max()) for a, b in zip(jax.tree_util.tree_leaves(state.params),
                                                          jax.tree_util.tree_leaves(new.params))]
    assert max(moved) > 0  # the update reached the float32 master weights


EIGHT_DEVICES = textwrap.dedent("""
    import functools, jax, jax.numpy as jnp, numpy as np
    from flax import jax_utils
    assert jax.device_count() == 8, jax.devices()
    from segjax import step as S
    import tests.test_train as tt

    batch = tt.one_batch(n=8, size=16, void=False)
    steps = 2
    def run_single():
        state, step = tt.tiny_state(size=16, base=4, optimizer="sgd", lr=0.1), jax.jit(tt.train_step)
        for i in range(steps):
            state, m = step(state, batch, jax.random.PRNGKey(i))
        return state, jax.jit(tt.eval_step)(state, batch)["confusion"]
    def run_sharded():
        state = tt.tiny_state(size=16, base=4, optimizer="sgd", lr=0.1)
        dp = S.DataParallel(S.make_mesh(), state.apply_fn, num_classes=3, loss_fn=tt.LOSS)
        state = dp.put_state(state)
        for i in range(steps):
            state, m = dp.train_step(state, dp.put_batch(batch), jax.random.PRNGKey(i))
        return state, dp.eval_step(state.variables, dp.put_batch(batch))["confusion"]
    def run_pmap():
        state = jax_utils.replicate(tt.tiny_state(size=16, base=4, optimizer="sgd", lr=0.1, axis_name="batch"))
        step = jax.pmap(functools.partial(tt.train_step, axis_name="batch"), axis_name="batch")
        evals = jax.pmap(functools.partial(tt.eval_step, axis_name="batch"), axis_name="batch")
        split = jax.tree_util.tree_map(lambda x: x.reshape(8, 1, *x.shape[1:]), batch)
        for i in range(steps):
            state, m = step(state, split, jax.numpy.stack([jax.random.PRNGKey(i)] * 8))
        return jax_utils.unreplicate(state), evals(state, split)["confusion"][0]
    ref, cm_ref = run_single()
    worst = {}
    for name, (state, cm) in {"sharded": run_sharded(), "pmap": run_pmap()}.items():
        assert int(state.step) == steps
        err = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(
            jax.tree_util.tree_leaves((ref.params, ref.batch_stats)),
            jax.tree_util.tree_leaves((state.params, state.batch_stats))))
        worst[name] = err
        assert err < 2e-4, (name, err)
        np.testing.assert_array_equal(np.asarray(cm), np.asarray(cm_ref))
    moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(
        jax.tree_util.tree_leaves(ref.params), jax.tree_util.tree_leaves(tt.tiny_state(size=16, base=4).params)))
    assert moved > 1e-3, moved  # the steps really changed the params, so agreement means something
    print("OK", worst, moved)
""")


@pytest.mark.e2e  # a subprocess with 8 host devices
def test_jit_sharded_pmap_and_single_device_steps_agree_on_8_devices():
    env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", EIGHT_DEVICES], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "OK" in proc.stdout
