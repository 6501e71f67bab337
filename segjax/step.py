"""The pure steps and the devices they run on: `TrainState`, `train_step`, `eval_step`, `DataParallel`.

`train_step(state, batch, rng, *, loss_fn)` and `eval_step(apply_fn, variables, batch, *, num_classes,
task, ...)` are pure; their collaborators (the loss, the model's apply, the multi-scale rule) are bound
with `functools.partial` before jit, as in flax's examples. They run three ways with the same code:
  * jit with NamedSharding over a 1-D device mesh ("data"): batch sharded, state replicated; XLA
    reduces BatchNorm statistics and gradients over the global batch (the model has no axis_name);
  * jax.pmap with `axis_name=...` (the model built with the same axis_name for cross-replica BN);
  * one device.
Mixed precision: the model computes in its dtype; params and optimizer state stay float32 and the
loss is computed in float32. A non-finite loss or gradient leaves params, optimizer state and
BatchNorm statistics untouched for that step (and is reported in the metrics as `nonfinite`).
"""
from __future__ import annotations

import functools
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from segjax import inference, tasks

LossFn = Callable[[dict, jax.Array], jax.Array]


class TrainState(struct.PyTreeNode):
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array                      # base PRNG key (raw uint32); step keys are fold_in(rng, step)
    apply_fn: Callable = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)

    @property
    def variables(self) -> dict:
        return {"params": self.params, "batch_stats": self.batch_stats}

    def checkpoint_tree(self) -> dict:
        """Everything that resumes training exactly (with the data iterator's state, saved beside it)."""
        return {"step": self.step, "params": self.params, "batch_stats": self.batch_stats,
                "opt_state": self.opt_state, "rng": self.rng}

    def replace_from_checkpoint(self, tree: dict) -> "TrainState":
        return self.replace(**{k: tree[k] for k in ("step", "params", "batch_stats", "opt_state", "rng")})


def init_variables(model, rng: jax.Array, image_shape: tuple[int, int, int]) -> dict:
    x = jnp.zeros((1, *image_shape), jnp.float32)
    variables = jax.jit(functools.partial(model.init, train=False))({"params": rng, "dropout": rng}, x)
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def create_train_state(rng: jax.Array, model, tx: optax.GradientTransformation,
                       image_shape: tuple[int, int, int], variables: dict | None = None) -> TrainState:
    init_rng, train_rng = jax.random.split(rng)
    variables = variables if variables is not None else init_variables(model, init_rng, image_shape)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=variables.get("batch_stats", {}),
                      opt_state=tx.init(params), rng=train_rng, apply_fn=model.apply, tx=tx)


def _where(ok, new, old):
    return jax.tree_util.tree_map(lambda n, o: jnp.where(ok, n, o), new, old)


def train_step(state: TrainState, batch: dict, rng: jax.Array, *, loss_fn: LossFn, axis_name: str | None = None):
    """One SGD step on {"image": (B,H,W,3) float32, "mask": (B,H,W) int32}; returns (state, metrics)."""
    if axis_name is not None:  # a different dropout mask on every replica
        rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))

    def loss_of(params):
        outputs, updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats}, batch["image"],
                                          train=True, mutable=["batch_stats"], rngs={"dropout": rng})
        outputs = jax.tree_util.tree_map(lambda t: t.astype(jnp.float32), outputs)
        return loss_fn(outputs, batch["mask"]), updates.get("batch_stats", state.batch_stats)

    (loss, batch_stats), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
    if axis_name is not None:
        grads = jax.lax.pmean(grads, axis_name)
        loss = jax.lax.pmean(loss, axis_name)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # Finite gradients can still give a non-finite update (e.g. a NaN learning rate): check both.
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(updates))
    new_state = state.replace(step=state.step + 1,
                              params=_where(ok, params, state.params),
                              opt_state=_where(ok, opt_state, state.opt_state),
                              batch_stats=_where(ok, batch_stats, state.batch_stats))
    return new_state, {"loss": loss, "grad_norm": grad_norm, "nonfinite": (~ok).astype(jnp.int32)}


def eval_step(apply_fn, variables: dict, batch: dict, *, num_classes: int,
              task: str | tasks.Task = tasks.SEGMENTATION, scales=(1.0,), flip: bool = False,
              ms_rule: str = "mean-probs", axis_name: str | None = None):
    """The task's evaluation sums over a batch: {"confusion": (C, C) int32} (segmentation) or the
    saliency sums; with `axis_name` (under pmap / shard_map) summed over the devices."""
    task = tasks.get(task)
    probs = inference.predict_probs(apply_fn, variables, batch["image"], scales, flip, task, ms_rule)
    sums = task.eval_sums(probs, batch["mask"], num_classes)
    if axis_name is not None:
        sums = jax.lax.psum(sums, axis_name)
    return sums


# ------------------------------------------------------------------------------------ parallelism

def make_mesh(devices=None) -> Mesh:
    return Mesh(np.asarray(devices if devices is not None else jax.devices()), ("data",))


class DataParallel:
    """The jitted steps over a mesh: batch sharded along "data", everything else replicated.

    `train_step(state, batch, rng)` has `loss_fn` bound (None: an evaluation-only instance);
    `eval_step(variables, batch)` has the model's `apply_fn` and the evaluation options bound.
    """

    def __init__(self, mesh: Mesh, apply_fn, *, num_classes: int, task: str | tasks.Task = tasks.SEGMENTATION,
                 loss_fn: LossFn | None = None, scales=(1.0,), flip: bool = False, ms_rule: str = "mean-probs"):
        self.mesh = mesh
        self.replicated = NamedSharding(mesh, P())
        self.data = NamedSharding(mesh, P("data"))
        if loss_fn is not None:
            self.train_step = jax.jit(functools.partial(train_step, loss_fn=loss_fn),
                                      in_shardings=(self.replicated, self.data, self.replicated),
                                      out_shardings=(self.replicated, self.replicated), donate_argnums=(0,))
        self.eval_step = jax.jit(functools.partial(eval_step, apply_fn, num_classes=num_classes, task=task,
                                                   scales=tuple(scales), flip=flip, ms_rule=ms_rule),
                                 in_shardings=(self.replicated, self.data), out_shardings=self.replicated)
        self.compiled: dict = {}  # "train" / "eval" -> {"<kind>_compile_s": seconds, "cache_hit": bool}

    def compile_ahead(self, kind: str, *args) -> dict | None:
        """Compiles the "train" or "eval" step for `args` before its first call (which then reuses the
        executable), timing it; only the first time per kind: returns the new entry of `compiled`, else None."""
        if kind in self.compiled:
            return None
        self.compiled[kind] = compile_timed(self.train_step if kind == "train" else self.eval_step, *args, kind=kind)
        return self.compiled[kind]

    def put_state(self, tree):
        """A TrainState or variables, replicated over the mesh."""
        return jax.device_put(tree, self.replicated)

    def put_batch(self, batch: dict) -> dict:
        """This process's slice of the global batch (numpy) -> global arrays sharded over "data"."""
        return {k: jax.make_array_from_process_local_data(self.data, np.asarray(batch[k])) for k in ("image", "mask")}


class _CacheHits:
    """Counts JAX's persistent-cache hits in this process (a jax.monitoring listener, registered once)."""
    count = 0
    listening = False

    @classmethod
    def now(cls) -> int:
        if not cls.listening:
            jax.monitoring.register_event_listener(cls._event)
            cls.listening = True
        return cls.count

    @classmethod
    def _event(cls, event: str, **kwargs) -> None:
        if event == "/jax/compilation_cache/cache_hits":
            cls.count += 1


def compile_timed(jitted, *args, kind: str = "step") -> dict:
    """Traces, lowers and compiles `jitted` for `args`: {"<kind>_compile_s": wall seconds, "cache_hit":
    whether JAX's persistent compilation cache supplied the executable}."""
    hits, t0 = _CacheHits.now(), time.perf_counter()
    jitted.lower(*args).compile()
    return {f"{kind}_compile_s": time.perf_counter() - t0, "cache_hit": _CacheHits.now() > hits}
