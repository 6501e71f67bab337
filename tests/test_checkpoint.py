"""Checkpoints: latest k + best retention, --checkpoint resolution, and exact resume of training."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax import checkpoint, config as config_lib
from segjax.errors import SegjaxError
from segjax.train import train_and_evaluate
from tests import tiny_model


class CountingIterator:
    def __init__(self):
        self.position = 0

    def get_state(self):
        return {"position": self.position}

    def set_state(self, state):
        self.position = state["position"]


def tree(step):
    return {"step": jnp.int32(step), "params": {"w": jnp.full((3,), float(step))}, "batch_stats": {},
            "rng": jax.random.PRNGKey(step)}


def test_manager_keeps_latest_k_plus_best_and_resolves_workdir_to_best(tmp_path):
    it = CountingIterator()
    with checkpoint.TrainCheckpoints(str(tmp_path), keep=2) as ckpts:
        for step, miou in [(1, None), (2, 0.6), (3, None), (4, 0.4), (5, None), (6, 0.5), (7, None)]:
            it.position = 10 * step
            ckpts.save(step, tree(step), it, {"model": "m", "step": step}, None if miou is None else {"miou": miou})
        assert ckpts.manager.all_steps() == [2, 6, 7]  # best (2) + latest two
        assert ckpts.best_step() == 2
        restored, meta = ckpts.restore(6, tree(0), it)
    assert int(restored["step"]) == 6 and it.position == 60 and meta["step"] == 6
    np.testing.assert_array_equal(np.asarray(restored["params"]["w"]), [6.0, 6.0, 6.0])
    assert not any(name.startswith("tmp") or "orbax-checkpoint-tmp" in name for name in os.listdir(tmp_path / "checkpoints"))

    # --checkpoint: a workdir resolves to its best step; the variables come back without the optimizer
    assert checkpoint.resolve(str(tmp_path)) == str(tmp_path / "checkpoints" / "2")
    variables, meta = checkpoint.load_variables(str(tmp_path))
    np.testing.assert_array_equal(np.asarray(variables["params"]["w"]), [2.0, 2.0, 2.0])
    # ... and so does the Orbax root, the path a user naturally types
    assert checkpoint.resolve(str(tmp_path / "checkpoints")) == str(tmp_path / "checkpoints" / "2")
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(SegjaxError, match="not a segjax checkpoint"):
        checkpoint.resolve(str(tmp_path / "elsewhere"))


def test_variables_checkpoint_roundtrip(tmp_path):
    v = {"params": {"conv": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}}, "batch_stats": {}}
    checkpoint.save_variables(str(tmp_path / "conv"), v, {"model": "unet", "model_kwargs": {"num_classes": 2}})
    loaded, meta = checkpoint.load_variables(str(tmp_path / "conv"))
    np.testing.assert_array_equal(np.asarray(loaded["params"]["conv"]["kernel"]), v["params"]["conv"]["kernel"])
    assert meta["model"] == "unet"


def tiny_config(data_dir, **kw):
    c = config_lib.load_config("synthetic_unet")
    c.model = tiny_model.NAME
    c.model_kwargs = {"features": 4}
    c.data_dir = str(data_dir)
    c.data_options = {"image_size": 24, "num_train": 16, "num_val": 8}
    c.base_size, c.crop_size, c.batch_size, c.eval_batch_size = 24, 16, 4, 8
    c.num_steps, c.eval_every_steps, c.log_every_steps = 6, 3, 1
    c.warmup_epochs = 0.5
    c.lr_mult = {"aux_classifier": 10.0}
    c.model_kwargs.features = 4
    for k, v in kw.items():
        setattr(c, k, v)
    return c


@pytest.mark.e2e  # three training runs
def test_resume_gives_the_same_params_as_training_straight(tmp_path):
    data_dir = tmp_path / "data"
    straight = train_and_evaluate(tiny_config(data_dir), str(tmp_path / "straight"))
    assert straight["step"] == 6
    first = train_and_evaluate(tiny_config(data_dir, stop_at_step=3), str(tmp_path / "resumed"))
    assert first == {"step": 3, "stopped": True}
    # 6 steps at 4 images from 16: the resumed half crosses an epoch boundary (a new shuffle)
    second = train_and_evaluate(tiny_config(data_dir), str(tmp_path / "resumed"))
    assert second["step"] == 6
    a, _ = checkpoint.load_variables(str(tmp_path / "straight" / "checkpoints" / "6"))
    b, _ = checkpoint.load_variables(str(tmp_path / "resumed" / "checkpoints" / "6"))
    leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(leaves_a) == len(leaves_b) > 0
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert straight["miou"] == second["miou"]
    # the learning-rate curve of the resumed run continues the straight run's exactly
    def lrs(workdir):
        with open(workdir / "metrics.jsonl") as f:
            return {r["step"]: r["lr"] for r in map(json.loads, f) if r["split"] == "train"}
    assert lrs(tmp_path / "straight") == lrs(tmp_path / "resumed")
    # and a different architecture is refused rather than silently restored
    with pytest.raises(SegjaxError, match="holds a run with"):
        train_and_evaluate(tiny_config(data_dir, num_classes=6), str(tmp_path / "resumed"))
