"""`train_and_evaluate(config, workdir)`: the training loop, read top to bottom (set up, loop, report).

Builds data, model, optimizer and TrainState from a recipe, resumes from the workdir's latest
checkpoint (params, optimizer state, BatchNorm statistics, step, RNG and the data iterator's
position), trains with the jitted data-parallel step (segjax.step), evaluates, checkpoints (latest
k + best), and logs to metrics.jsonl / TensorBoard / PNG plots. Only `segjax.cli` imports this module.

Preemption (segjax.preemption): SIGTERM or SIGINT finishes the current step, checkpoints and returns
{"stopped": True, "signal": ...}. Resuming falls back past unreadable checkpoints (see
TrainCheckpoints.restore_latest). A NaN/Inf loss or gradient stops with an error naming the step
before any checkpoint records it, unless config.nonfinite="skip" (skipped steps are counted in
metrics.jsonl and the final message).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from segjax import checkpoint, data, evaluate, inference, logs, losses, models, optim, preemption, samples
from segjax import schedules, step as S, tasks
from segjax.card import ModelCard
from segjax.files import write_atomic
from segjax import config as config_lib
from segjax.errors import SegjaxError

DEVICE_PREFETCH = 2  # train batches placed on the devices ahead of the step (0: just in time)

# What must match between a checkpoint and the recipe resuming it.
_ARCH_KEYS = ("model", "model_kwargs", "num_classes", "task", "dataset", "batch_size", "optimizer")


def train_and_evaluate(config, workdir: str) -> dict:
    """Trains `config` into `workdir` (resuming from its latest checkpoint); returns the final scores,
    or {"step", "stopped": True, "signal"} after checkpointing on SIGTERM/SIGINT."""
    stop = preemption.StopRequest(os.path.abspath(workdir))
    with stop.installed():
        run = setup(config, os.path.abspath(workdir))
        if run.start >= run.total_steps:  # nothing to train; saving this step again would clash with it
            run.ckpts.close()
            print(f"{run.workdir} already holds the finished run ({run.start}/{run.total_steps} steps); raise "
                  f"--config.num_steps to train on, or pick another --workdir")
            return {"step": run.start, "finished": True}
        stop.deferred = True  # from here a signal finishes the step and checkpoints
        step, scores = train_loop(run, stop)
        return report(run, step, scores, stop)


# ------------------------------------------------------------------------------------------ set up

@dataclasses.dataclass
class Run:
    """Everything the loop needs, built once by `setup`."""
    config: object
    workdir: str
    start: int
    total_steps: int
    stop_at: int
    eval_every: int
    state: S.TrainState
    parallel: S.DataParallel
    train_iter: object
    eval_loader: Callable
    ckpts: checkpoint.TrainCheckpoints
    writer: logs.MetricWriter
    schedule: Callable
    card: ModelCard                         # what the checkpoints say the model is
    sample_grid: Callable | None  # (variables, step) -> the picture of the fixed validation samples


def setup(config, workdir: str) -> Run:
    config_lib.check(config, jax.device_count())  # before any data, compile or workdir work
    primary = jax.process_index() == 0
    root = os.path.expanduser(config.data_dir) if config.data_dir else data.default_data_dir()
    _prepare_data(config, root, primary)
    if data.in_channels(config.dataset, root) != config.in_channels:
        raise SegjaxError(f"config.in_channels={config.in_channels} but data set '{config.dataset}' has "
                          f"{data.in_channels(config.dataset, root)}-band images; use "
                          f"--config.in_channels={data.in_channels(config.dataset, root)}")
    train_source = data.open_source(config.dataset, config.train_split, root)
    eval_source = data.open_source(config.dataset, config.eval_split, root)
    _check_num_classes(config, root)
    steps_per_epoch = max(1, len(train_source) // config.batch_size)
    total_steps = config.num_steps or config.num_epochs * steps_per_epoch
    warmup_steps = min(int(round(config.warmup_epochs * steps_per_epoch)), total_steps - 1)

    model = build_model(config)
    rng = jax.random.PRNGKey(config.seed)
    variables = initial_variables(config, model, jax.random.fold_in(rng, 1))
    tx, schedule = build_optimizer(config, total_steps, warmup_steps, set(variables["params"]))
    loss_fn = losses.make_loss(config.loss, config.num_classes, aux_weight=config.aux_weight,
                               dice_weight=config.dice_weight, class_weights=tuple(config.class_weights))
    state = S.create_train_state(rng, model, tx, (config.crop_size, config.crop_size, config.in_channels), variables)
    parallel = S.DataParallel(S.make_mesh(), model.apply, num_classes=config.num_classes, task=config.task,
                              loss_fn=loss_fn, scales=config.eval_scales, flip=config.eval_flip)
    train_iter = _train_iterator(config, train_source, parallel, total_steps, steps_per_epoch)

    card = model_card(config, root)
    state = parallel.put_state(state)  # restore into the global layout: no cross-host copies afterwards
    os.makedirs(workdir, exist_ok=True)  # only now: a run refused for its data or recipe leaves no workdir
    ckpts = checkpoint.TrainCheckpoints(workdir, config.keep_checkpoints, config.best_metric)
    start, tree = ckpts.restore_latest(state.checkpoint_tree(), train_iter,
                                       lambda saved: _check_resumable(saved, config, workdir))
    if start and start < total_steps:
        state = parallel.put_state(state.replace_from_checkpoint(tree))
        print(f"resuming {workdir} from step {start}/{total_steps}")
    if primary and (start or 0) < total_steps:  # the workdir holds no other run: never overwrite its config
        write_atomic(os.path.join(workdir, "config.json"), config_lib.to_json(config))
    return Run(config, workdir, start or 0, total_steps, min(config.stop_at_step or total_steps, total_steps),
               config.eval_every_steps or steps_per_epoch, state, parallel, train_iter,
               functools.partial(_eval_loader, config, eval_source), ckpts,
               logs.MetricWriter(workdir, enabled=primary), schedule, card,
               _sample_grid(config, eval_source, parallel, model.apply, list(card.class_names)))


def build_model(config, axis_name: str | None = None):
    return models.create(config.model, config.num_classes, dtype=jnp.dtype(config.dtype), param_dtype=jnp.float32,
                         axis_name=axis_name, **config.model_kwargs.to_dict())


def model_card(config, root: str) -> ModelCard:
    task = tasks.get(config.task)
    names = task.class_names(config.num_classes) or data.names_or_numbers(config.dataset, config.num_classes, root)
    return ModelCard.from_config(config, names)


def build_optimizer(config, total_steps: int, warmup_steps: int, param_names):
    make_schedule = {  # config.check has refused any other name
        "poly": lambda: schedules.poly(config.learning_rate, total_steps, config.power, warmup_steps,
                                       config.warmup_factor),
        "cosine": lambda: schedules.cosine(config.learning_rate, total_steps, warmup_steps, config.warmup_factor),
    }[config.schedule]
    schedule = make_schedule()
    lr_mult = config.lr_mult.to_dict()
    # The default recipe boosts "aux_classifier" (torchvision: 10x); models without that head skip it.
    unknown = sorted(k for k in lr_mult if k not in param_names and k != "aux_classifier")
    if unknown:
        raise SegjaxError(f"config.lr_mult names {', '.join(map(repr, unknown))}, which model {config.model} does "
                          f"not have; its parameter groups are {', '.join(sorted(param_names))}")
    lr_mult = {k: v for k, v in lr_mult.items() if k in param_names}
    tx = optim.make_optimizer(config.optimizer, schedule, momentum=config.momentum, nesterov=config.nesterov,
                              weight_decay=config.weight_decay, lr_mult=lr_mult or None,
                              grad_clip_norm=config.grad_clip_norm or None)
    return tx, schedule


def initial_variables(config, model, rng):
    """Random init, then optionally a whole segjax checkpoint or an ImageNet backbone on top."""
    from segjax import convert

    variables = S.init_variables(model, rng, (config.crop_size, config.crop_size, config.in_channels))
    if config.init_checkpoint:
        loaded, saved = checkpoint.load_variables(config.init_checkpoint)
        convert.check_fits(loaded, variables, f"config.init_checkpoint={config.init_checkpoint} (model="
                           f"{saved.get('model')}, num_classes={saved.get('num_classes')}) for model={config.model}, "
                           f"num_classes={config.num_classes}")
        variables = {k: loaded.get(k, {}) for k in variables}
    if config.backbone_weights:
        variables = convert.load_backbone(config.model, variables, convert.load_state_dict(config.backbone_weights))
    return variables


def _train_iterator(config, source, parallel: S.DataParallel, total_steps: int, steps_per_epoch: int):
    """This process's shard of the training stream, already on the devices (DevicePrefetch)."""
    loader = iter(data.make_train_loader(
        source, batch_size=config.batch_size // jax.process_count(), crop_size=config.crop_size,
        base_size=config.base_size, scale_range=tuple(config.scale_range), hflip=config.hflip, vflip=config.vflip,
        mean=tuple(config.mean), std=tuple(config.std), seed=config.seed, worker_count=config.workers,
        uint8_images=config.uint8_batches, num_epochs=math.ceil(total_steps / steps_per_epoch) + 1,
        shard_index=jax.process_index(), shard_count=jax.process_count()))
    put = parallel.put_batch
    if config.uint8_batches:  # normalised on the devices: 4x fewer host->device bytes, less host CPU
        normalize = jax.jit(functools.partial(data.pipeline.normalize_on_device, mean=tuple(config.mean),
                                              std=tuple(config.std)))
        put = lambda batch: normalize(parallel.put_batch(batch))  # noqa: E731
    return data.pipeline.DevicePrefetch(loader, put, DEVICE_PREFETCH)


def _eval_loader(config, source):
    per_process = max(config.eval_batch_size // jax.process_count(), jax.local_device_count())
    per_process -= per_process % jax.local_device_count()
    return data.make_eval_loader(source, batch_size=per_process, base_size=config.base_size, mean=tuple(config.mean),
                                 std=tuple(config.std), shard_index=jax.process_index(),
                                 shard_count=jax.process_count())


def _sample_grid(config, source, parallel: S.DataParallel, apply_fn, class_names) -> Callable | None:
    """(variables, step) -> image | truth | prediction grid of the first `config.sample_images` validation
    examples (the same ones at every evaluation), or None when sample_images is 0."""
    if not config.sample_images:
        return None
    batch = next(iter(data.make_eval_loader(source, batch_size=config.sample_images, base_size=config.base_size,
                                            mean=tuple(config.mean), std=tuple(config.std))))
    pixels = (batch["image"] * np.asarray(config.std) + np.asarray(config.mean)) * 255
    # Replicated: every process holds the same samples and gets the whole prediction back.
    images = jax.make_array_from_process_local_data(parallel.replicated, batch["image"])
    probs_of = jax.jit(lambda variables, x: inference.predict_probs(apply_fn, variables, x, task=config.task),
                       out_shardings=parallel.replicated)

    def picture(variables, step):
        probs = np.asarray(probs_of(variables, images).addressable_data(0))
        return samples.grid(pixels, batch["mask"], probs, config.task, batch["valid_hw"], step=step,
                            class_names=class_names)
    return picture


def _prepare_data(config, root: str, primary: bool) -> None:
    """Process 0 builds the data set first; the others then find it built (on a shared file system)
    or build their own copy (on local disks), never two writers on one directory at once."""
    options = config.data_options.to_dict()
    if config.in_channels != 3:  # a multi-band folder data set: the recipe need not say it twice
        options.setdefault("in_channels", config.in_channels)

    def prepare():
        data.prepare(config.dataset, root, config.manual_dir or None, progress=primary,
                     manual_dir_flag="--config.manual_dir=DIR", **options)

    if jax.process_count() == 1:
        prepare()
        return
    from jax.experimental import multihost_utils

    if primary:
        prepare()
    multihost_utils.sync_global_devices("segjax: data prepared by process 0")
    if not primary:
        prepare()


def _check_num_classes(config, root) -> None:
    """Labels >= num_classes would make the loss NaN at step 1; say so before compiling anything."""
    names = data.known_class_names(config.dataset, root) if tasks.get(config.task).labels_are_classes else []
    if len(names) > config.num_classes:
        raise SegjaxError(f"config.num_classes={config.num_classes} but data set '{config.dataset}' has {len(names)} "
                          f"classes ({', '.join(names[:5])}, ...); use --config.num_classes={len(names)}")


def _check_resumable(saved: dict, config, workdir: str) -> None:
    old = saved.get("config", {})
    new = json.loads(config_lib.to_json(config))
    changed = [k for k in _ARCH_KEYS if k in old and old[k] != new.get(k)]
    if changed:
        k = changed[0]
        raise SegjaxError(f"{workdir} holds a run with {k}={old[k]!r}, not {new[k]!r}; "
                          f"use another --workdir or the recipe it was trained with")


# ------------------------------------------------------------------------------------------ loop

def train_loop(run: Run, stop: preemption.StopRequest) -> tuple[int, dict | None]:
    """Steps from run.start to run.stop_at (or a stop signal); returns (last step, last scores)."""
    from tqdm import tqdm

    config, state, step, scores, last_eval = run.config, run.state, run.start, None, -1
    bar = tqdm(total=run.total_steps, initial=run.start, desc=f"train {config.name}", unit="step",
               disable=jax.process_index() != 0, dynamic_ncols=True)
    pending = PendingMetrics(config.nonfinite, run.writer, run.schedule, bar, run.ckpts)
    try:
        while step < run.stop_at and not preemption.stop_requested(stop, step, min(config.log_every_steps, 10)):
            batch = next(run.train_iter)
            step_rng = jax.random.fold_in(state.rng, step)
            if step == run.start:  # compiled ahead of the first call, so that its seconds are logged apart
                run.writer.write(step + 1, "compile", run.parallel.compile_ahead("train", state, batch, step_rng))
            state, step_metrics = run.parallel.train_step(state, batch, step_rng)
            step += 1
            pending.add(step, step_metrics, config.batch_size)
            bar.update(1)
            saving = step % run.eval_every == 0 or step == run.total_steps
            if step % config.log_every_steps == 0 or step == run.stop_at or saving:
                pending.flush()  # NaN/Inf checked here, always before a checkpoint can record the steps
            if saving:
                scores, last_eval = _evaluate(run, state, step), step
                run.ckpts.save(step, state.checkpoint_tree(), run.train_iter, run.card.to_meta(), _best(run, scores))
        pending.flush()
        if last_eval != step and step > run.start:
            if step == run.total_steps:
                scores = _evaluate(run, state, step)
            run.ckpts.save(step, state.checkpoint_tree(), run.train_iter, run.card.to_meta(),
                           _best(run, scores) if step == run.total_steps else None)
    except BaseException:
        with contextlib.suppress(Exception):  # keep the original error
            run.writer.close()
            run.ckpts.close()
        raise
    finally:
        bar.close()
    run.ckpts.close()
    run.writer.close()
    return step, scores


def _evaluate(run: Run, state: S.TrainState, step: int) -> dict:
    first = "eval" not in run.parallel.compiled
    scores = evaluate.evaluate_dataset(run.parallel, state.variables, run.eval_loader(), run.config.task)
    run.writer.write(step, "eval", scores)
    if first:
        run.writer.write(step, "compile", run.parallel.compiled["eval"])
    if run.sample_grid is not None:
        picture = run.sample_grid(state.variables, step)
        if jax.process_index() == 0:
            samples.save(run.workdir, step, picture)
            run.writer.image(step, "samples", picture)
    return scores


def _best(run: Run, scores: dict) -> dict:
    return {run.config.best_metric: float(scores[run.config.best_metric])}


class PendingMetrics:
    """The step metrics not yet fetched from the devices, and the NaN/Inf policy applied when they are.

    `flush` fetches them (one device sync per log interval), raises on a non-finite step under
    policy "stop" (saying which checkpoints are intact), and logs their mean otherwise.
    """

    def __init__(self, policy: str, writer: logs.MetricWriter, schedule, bar, ckpts: checkpoint.TrainCheckpoints):
        self.policy, self.writer, self.schedule, self.bar, self.ckpts = policy, writer, schedule, bar, ckpts
        self.steps, self.values, self.images, self.t0 = [], [], 0, time.perf_counter()

    def add(self, step: int, values: dict, images: int) -> None:
        self.steps.append(step)
        self.values.append(values)
        self.images += images

    def flush(self) -> None:
        if not self.steps:
            return
        values = jax.device_get(self.values)
        bad = [s for s, v in zip(self.steps, values) if int(v["nonfinite"])]
        if bad and self.policy != "skip":
            last = self.ckpts.latest_step()
            intact = (f"the checkpoints in {self.ckpts.directory} (latest: step {last}) are intact" if last else
                      "no checkpoint was saved yet")
            raise SegjaxError(f"non-finite loss or gradient at step {bad[0]} (update not applied); {intact}; "
                              "lower the learning rate, or set --config.nonfinite=skip to skip such steps")
        good = [v for v in values if not int(v["nonfinite"])] or values
        record = {k: float(np.mean([v[k] for v in good])) for k in ("loss", "grad_norm")}
        record["lr"] = float(self.schedule(self.steps[-1] - 1))
        record["images_per_s"] = self.images / max(time.perf_counter() - self.t0, 1e-9)
        if bad:
            record["skipped_steps"] = len(bad)
            record["nonfinite_steps"] = bad
        self.writer.write(self.steps[-1], "train", record)
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                             img_s=f"{record['images_per_s']:.1f}")
        self.steps, self.values, self.images, self.t0 = [], [], 0, time.perf_counter()


# ------------------------------------------------------------------------------------------ report

def report(run: Run, step: int, scores: dict | None, stop: preemption.StopRequest) -> dict:
    """Prints how the run ended; returns what `train_and_evaluate` returns."""
    config, primary = run.config, jax.process_index() == 0
    skipped = _count_skipped(run.workdir, step) if primary else 0
    skipped_note = f" (skipped {skipped} non-finite steps)" if skipped else ""
    if step < run.total_steps:
        why = (f"{stop.signal} received" if stop.signal else f"{stop.elsewhere} received by another process"
               if stop.elsewhere else f"stop_at_step={run.stop_at}")
        saved = f"step {step}/{run.total_steps} is checkpointed in {run.workdir}" if step else "nothing was saved yet"
        print(f"{why}: {saved}{skipped_note}; run the same command again to resume")
        return {"step": step, "stopped": True, **({"signal": stop.name} if stop.name else {})}
    if primary:
        names = list(run.card.class_names)
        logs.plot(run.workdir, names)
        print(run.card.task.format_scores(scores, names))
        print(f"{config.name}: step {step}, {config.best_metric} {scores[config.best_metric]:.4f}"
              + (f", skipped {skipped} non-finite steps" if skipped else "") + f"; workdir {run.workdir}")
    return {"step": step, **scores}


def _count_skipped(workdir: str, step: int) -> int:
    """Non-finite steps skipped up to `step` over every session of this run (a resume replays some steps)."""
    return len({s for r in logs.read_metrics(workdir) if r.get("split") == "train"
                for s in r.get("nonfinite_steps", []) if s <= step})
