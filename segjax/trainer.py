"""The training loop behind `segjax.train.train_and_evaluate(config, workdir)`.

Builds data, model, optimizer and TrainState from a recipe, resumes from the workdir's latest
checkpoint (params, optimizer state, BatchNorm statistics, step, RNG and the data iterator's
position), trains with the jitted data-parallel step, evaluates, checkpoints (latest k + best),
and logs to metrics.jsonl / TensorBoard / PNG plots.

Preemption: SIGTERM or SIGINT during training finishes the current step (or eval, or checkpoint write),
checkpoints and returns {"stopped": True, "signal": ...}; `segjax train` then prints how to resume and
exits with 128 + the signal number (143 SIGTERM, 130 SIGINT), so schedulers see an unfinished run.
A signal before the first step, or a second one, stops at once (same status; nothing new is saved).
Resuming falls back past unreadable checkpoints (see TrainCheckpoints.restore_latest). A NaN/Inf loss
or gradient stops with an error naming the step before any checkpoint records it, unless
config.nonfinite="skip" (skipped steps are counted in metrics.jsonl and the final message).
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import signal
import time

import jax
import numpy as np

from segjax import checkpoint, distributed, logs
from segjax import config as config_lib
from segjax import train as T
from segjax.errors import SegjaxError

DEVICE_PREFETCH = 2  # train batches placed on the devices ahead of the step (0: just in time)

# What must match between a checkpoint and the recipe resuming it.
_ARCH_KEYS = ("model", "model_kwargs", "num_classes", "task", "dataset", "batch_size", "optimizer")


def data_dir(config) -> str:
    return os.path.expanduser(config.data_dir or os.environ.get("SEGJAX_DATA_DIR", "~/.cache/segjax/data"))


def build_model(config, axis_name: str | None = None):
    from segjax import models
    import jax.numpy as jnp

    if config.dtype not in ("float32", "bfloat16", "float16"):
        raise SegjaxError(f"config.dtype={config.dtype!r}: use float32 or bfloat16")
    return models.create(config.model, config.num_classes, dtype=jnp.dtype(config.dtype), param_dtype=jnp.float32,
                         axis_name=axis_name, **config.model_kwargs.to_dict())


def model_meta(config) -> dict:
    return {"model": config.model, "model_kwargs": config.model_kwargs.to_dict(), "num_classes": config.num_classes,
            "task": config.task, "dataset": config.dataset, "mean": list(config.mean), "std": list(config.std),
            "config": json.loads(config_lib.to_json(config))}


def build_optimizer(config, total_steps: int, warmup_steps: int, param_names):
    from segjax import optim, schedules

    if config.schedule == "poly":
        schedule = schedules.poly(config.learning_rate, total_steps, config.power, warmup_steps, config.warmup_factor)
    elif config.schedule == "cosine":
        schedule = schedules.cosine(config.learning_rate, total_steps, warmup_steps, config.warmup_factor)
    else:
        raise SegjaxError(f"config.schedule={config.schedule!r}: use 'poly' or 'cosine'")
    lr_mult = config.lr_mult.to_dict()
    # The default recipe boosts "aux_classifier" (torchvision: 10x); models without that head skip it.
    unknown = sorted(k for k in lr_mult if k not in param_names and k != "aux_classifier")
    if unknown:
        raise SegjaxError(f"config.lr_mult names {', '.join(map(repr, unknown))}, which model {config.model} does "
                          f"not have; its parameter groups are {', '.join(sorted(param_names))}")
    lr_mult = {k: v for k, v in lr_mult.items() if k in param_names}
    tx = optim.make_optimizer(config.optimizer, schedule, momentum=config.momentum, weight_decay=config.weight_decay,
                              lr_mult=lr_mult or None, grad_clip_norm=config.grad_clip_norm or None)
    return tx, schedule


def initial_variables(config, model, rng):
    """Random init, then optionally a whole segjax checkpoint or an ImageNet backbone on top."""
    variables = T.init_variables(model, rng, (config.crop_size, config.crop_size, 3))
    if config.init_checkpoint:
        from segjax.convert import check_fits
        loaded, saved = checkpoint.load_variables(config.init_checkpoint)
        check_fits(loaded, variables, f"config.init_checkpoint={config.init_checkpoint} (model={saved.get('model')}, "
                   f"num_classes={saved.get('num_classes')}) for model={config.model}, num_classes={config.num_classes}")
        variables = {k: loaded.get(k, {}) for k in variables}
    if config.backbone_weights:
        from segjax import convert
        variables = convert.load_backbone(config.model, variables, convert.load_state_dict(config.backbone_weights))
    return variables


class Interrupted(SegjaxError):
    """A stop signal that could not wait for a checkpoint: exit status 128 + the signal's number."""

    def __init__(self, signame: str, message: str):
        super().__init__(message)
        self.exit_status = 128 + int(signal.Signals[signame])


class StopRequest:
    """SIGTERM/SIGINT. While `deferred` (the training loop and its last checkpoint) the first signal only
    sets `signal`: the loop finishes its step, checkpoints and returns. Before that (data, model, restore:
    nothing new to save) or on a second signal, Interrupted is raised at once. Handlers are restored on exit."""

    def __init__(self, workdir: str = ""):
        self.signal = None
        self.deferred = False
        self.elsewhere = None  # multi-process: a signal another process got (we stop with it)
        self.workdir = workdir

    @contextlib.contextmanager
    def installed(self):
        def handler(signum, frame):
            name = signal.Signals(signum).name
            if self.deferred and self.signal is None:
                self.signal = name
                return
            when = "again" if self.signal else "before the first step"
            self.signal = name
            raise Interrupted(name, f"{name} received {when}: stopped without saving; run the same command "
                                    f"again to resume from the last checkpoint in {self.workdir}")
        previous = {}
        try:
            for s in (signal.SIGTERM, signal.SIGINT):
                previous[s] = signal.signal(s, handler)
        except ValueError:  # not the main thread: no signal handling
            pass
        try:
            yield self
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


def _then_none(iterable):
    yield from iterable
    yield None


def evaluate_dataset(parallel, state, loader, task: str) -> dict:
    """Sums the eval step over a loader on the host in int64/float64; returns metrics.scores(...)."""
    from segjax import metrics

    total, running = None, None
    for batch in _then_none(loader):  # a batch's sums are fetched once the next batch is dispatched
        if batch is not None:
            batch = parallel.put_batch(batch)
            parallel.compile_ahead("eval", state, batch)  # timed, the first time only (parallel.compiled)
        previous, running = running, (None if batch is None else parallel.eval_step(state, batch))
        if previous is None:
            continue
        sums = jax.device_get(previous)
        sums = {k: np.asarray(v, np.int64 if k == "confusion" else np.float64) for k, v in sums.items()}
        total = sums if total is None else {k: total[k] + sums[k] for k in total}
    if total is None:
        raise SegjaxError("the evaluation split is empty")
    if task == "saliency":
        return metrics.saliency_scores(total)
    return metrics.scores(total["confusion"])


def _check_resumable(saved: dict, config, workdir: str) -> None:
    old = saved.get("config", {})
    new = json.loads(config_lib.to_json(config))
    changed = [k for k in _ARCH_KEYS if k in old and old[k] != new.get(k)]
    if changed:
        k = changed[0]
        raise SegjaxError(f"{workdir} holds a run with {k}={old[k]!r}, not {new[k]!r}; "
                          f"use another --workdir or the recipe it was trained with")


def run(config, workdir: str) -> dict:
    """Trains (resuming); on SIGTERM/SIGINT returns {"step", "stopped": True, "signal"} after checkpointing."""
    stop = StopRequest(os.path.abspath(workdir))
    with stop.installed():
        return _run(config, workdir, stop)


def _run(config, workdir: str, stop: StopRequest) -> dict:
    from segjax import data
    from tqdm import tqdm

    config_lib.check(config, jax.device_count())  # before any data, compile or workdir work
    workdir = os.path.abspath(workdir)
    primary = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    root = data_dir(config)
    _prepare_data(data, config, root, primary)
    train_source = data.open_source(config.dataset, config.train_split, root)
    eval_source = data.open_source(config.dataset, config.eval_split, root)
    _check_num_classes(data, config, root)
    steps_per_epoch = max(1, len(train_source) // config.batch_size)
    total_steps = config.num_steps or config.num_epochs * steps_per_epoch
    warmup_steps = min(int(round(config.warmup_epochs * steps_per_epoch)), total_steps - 1)
    stop_at = min(config.stop_at_step or total_steps, total_steps)
    eval_every = config.eval_every_steps or steps_per_epoch

    model = build_model(config)
    rng = jax.random.PRNGKey(config.seed)
    variables = initial_variables(config, model, jax.random.fold_in(rng, 1))
    tx, schedule = build_optimizer(config, total_steps, warmup_steps, set(variables["params"]))
    loss_fn = T.make_loss_fn(config.loss, config.num_classes, config.aux_weight, config.dice_weight,
                             tuple(config.class_weights))
    state = T.create_train_state(rng, model, tx, loss_fn, (config.crop_size, config.crop_size, 3), variables,
                                 config.task, config.num_classes)
    parallel = T.DataParallel(T.make_mesh(), config.eval_scales, config.eval_flip)

    shard = dict(shard_index=jax.process_index(), shard_count=jax.process_count())
    local_batch = config.batch_size // jax.process_count()
    train_iter = iter(data.make_train_loader(
        train_source, batch_size=local_batch, crop_size=config.crop_size, base_size=config.base_size,
        scale_range=tuple(config.scale_range), hflip=config.hflip, vflip=config.vflip, mean=tuple(config.mean),
        std=tuple(config.std), seed=config.seed, worker_count=config.workers, uint8_images=config.uint8_batches,
        num_epochs=math.ceil(total_steps / steps_per_epoch) + 1, **shard))
    put = parallel.put_batch
    if config.uint8_batches:  # normalised on the devices: 4x fewer host->device bytes, less host CPU
        normalize = jax.jit(functools.partial(data.pipeline.normalize_on_device, mean=tuple(config.mean),
                                              std=tuple(config.std)))
        put = lambda batch: normalize(parallel.put_batch(batch))  # noqa: E731
    train_iter = data.pipeline.DevicePrefetch(train_iter, put, DEVICE_PREFETCH)

    def eval_loader():
        per_process = max(config.eval_batch_size // jax.process_count(), jax.local_device_count())
        per_process -= per_process % jax.local_device_count()
        return data.make_eval_loader(eval_source, batch_size=per_process, base_size=config.base_size,
                                     mean=tuple(config.mean), std=tuple(config.std), **shard)

    meta = model_meta(config)
    state = parallel.put_state(state)  # restore into the global layout: no cross-host copies afterwards
    ckpts = checkpoint.TrainCheckpoints(workdir, config.keep_checkpoints, config.best_metric)
    start, tree = ckpts.restore_latest(state.checkpoint_tree(), train_iter,
                                       lambda saved: _check_resumable(saved, config, workdir))
    start = start or 0
    if start:
        if start >= total_steps:  # nothing to train; saving this step again would clash with it
            ckpts.close()
            print(f"{workdir} already holds the finished run ({start}/{total_steps} steps); raise "
                  f"--config.num_steps to train on, or pick another --workdir")
            return {"step": start, "finished": True}
        state = state.replace_from_checkpoint(tree)
        print(f"resuming {workdir} from step {start}/{total_steps}")
    if primary:  # only once the workdir is known to hold no other run: never overwrite its config
        with open(os.path.join(workdir, "config.json.tmp"), "w") as f:
            f.write(config_lib.to_json(config))
        os.replace(os.path.join(workdir, "config.json.tmp"), os.path.join(workdir, "config.json"))
    state = parallel.put_state(state)
    writer = logs.MetricWriter(workdir, enabled=primary)
    class_names = _class_names(data, config)
    skipped, scores, last_eval = 0, None, -1
    pending, t_log, n_log = [], time.perf_counter(), 0

    def do_eval(step):
        nonlocal scores, last_eval
        compiled = "eval" in parallel.compiled
        scores = evaluate_dataset(parallel, state, eval_loader(), config.task)
        writer.write(step, "eval", scores)
        if not compiled:
            writer.write(step, "compile", parallel.compiled["eval"])
        last_eval = step
        return {config.best_metric: float(scores[config.best_metric])}

    bar = tqdm(total=total_steps, initial=start, desc=f"train {config.name}", unit="step", disable=not primary,
               dynamic_ncols=True)

    def flush():  # NaN/Inf checked here, and always before a checkpoint can record steps past one
        nonlocal skipped, pending, t_log, n_log
        last = ckpts.latest_step()
        intact = (f"the checkpoints in {ckpts.directory} (latest: step {last}) are intact" if last else
                  "no checkpoint was saved yet")
        skipped += _flush(pending, config.nonfinite, writer, schedule, n_log, t_log, bar, intact)
        pending, t_log, n_log = [], time.perf_counter(), 0

    step = start
    stop.deferred = True  # from here a signal finishes the step and checkpoints
    try:
        while step < stop_at and not _stop_requested(stop, step, min(config.log_every_steps, 10)):
            batch = next(train_iter)  # already on the devices (DevicePrefetch)
            step_rng = jax.random.fold_in(state.rng, step)
            if step == start:  # compiled ahead of the first call, so that its seconds are logged apart
                writer.write(step + 1, "compile", parallel.compile_ahead("train", state, batch, step_rng))
            state, m = parallel.train_step(state, batch, step_rng)
            pending.append((step, m))
            step += 1
            n_log += config.batch_size
            bar.update(1)
            saving = step % eval_every == 0 or step == total_steps
            if step % config.log_every_steps == 0 or step == stop_at or saving:
                flush()
            if saving:
                ckpts.save(step, state.checkpoint_tree(), train_iter, meta, do_eval(step))
        flush()
        if last_eval != step and step > start:
            ckpts.save(step, state.checkpoint_tree(), train_iter, meta, do_eval(step) if step == total_steps else None)
    except BaseException:
        with contextlib.suppress(Exception):  # keep the original error
            writer.close()
            ckpts.close()
        raise
    finally:
        bar.close()
    ckpts.close()
    writer.close()
    if primary:
        skipped = _count_skipped(workdir, step)
    if step < total_steps:
        why = (f"{stop.signal} received" if stop.signal else f"{stop.elsewhere} received by another process"
               if stop.elsewhere else f"stop_at_step={stop_at}")
        saved = f"step {step}/{total_steps} is checkpointed in {workdir}" if step else "nothing was saved yet"
        print(f"{why}: {saved}" + (f" (skipped {skipped} non-finite steps)" if skipped else "")
              + "; run the same command again to resume")
        signame = stop.signal or stop.elsewhere
        return {"step": step, "stopped": True, **({"signal": signame} if signame else {})}
    if primary:
        from segjax import metrics
        logs.plot(workdir, class_names)
        if config.task != "saliency":
            print(metrics.format_table(scores, class_names))
        print(f"{config.name}: step {step}, {config.best_metric} {scores[config.best_metric]:.4f}"
              + (f", skipped {skipped} non-finite steps" if skipped else "") + f"; workdir {workdir}")
    return {"step": step, **scores}


def _check_num_classes(data, config, root) -> None:
    """Labels >= num_classes would make the loss NaN at step 1; say so before compiling anything."""
    try:
        names = list(data.class_names(config.dataset, root)) if config.task == "segmentation" else []
    except Exception:  # a data set without names: nothing to compare
        names = []
    if len(names) > config.num_classes:
        raise SegjaxError(f"config.num_classes={config.num_classes} but data set '{config.dataset}' has {len(names)} "
                          f"classes ({', '.join(names[:5])}, ...); use --config.num_classes={len(names)}")


def _stop_requested(stop, step: int, every: int) -> bool:
    """Whether to leave the training loop now. Several processes must stop at the same step (the
    checkpoint is collective) although a signal may reach them at different steps or only some of
    them: they compare notes every `every` steps (one tiny collective that waits for the devices)."""
    if jax.process_count() == 1:
        return stop.signal is not None
    if step % every:
        return False
    signum = distributed.max_over_processes(int(signal.Signals[stop.signal]) if stop.signal else 0)
    if signum and stop.signal is None:  # not stop.signal: a later signal here must not count as a second one
        stop.elsewhere = signal.Signals(signum).name
    return bool(signum)


def _prepare_data(data, config, root: str, primary: bool) -> None:
    """Process 0 builds the data set first; the others then find it built (on a shared file system)
    or build their own copy (on local disks), never two writers on one directory at once."""
    def prepare():
        data.prepare(config.dataset, root, config.manual_dir or None, progress=primary, **config.data_options.to_dict())

    if jax.process_count() == 1:
        prepare()
        return
    from jax.experimental import multihost_utils

    if primary:
        prepare()
    multihost_utils.sync_global_devices("segjax: data prepared by process 0")
    if not primary:
        prepare()


def _count_skipped(workdir: str, step: int) -> int:
    """Non-finite steps skipped up to `step` over every session of this run (a resume replays some steps)."""
    return len({s for r in logs.read_metrics(workdir) if r.get("split") == "train"
                for s in r.get("nonfinite_steps", []) if s <= step})


def _class_names(data, config):
    try:
        names = list(data.class_names(config.dataset))
    except Exception:  # a data set without names: numbers
        names = []
    return names if len(names) == config.num_classes else [str(i) for i in range(config.num_classes)]


def _flush(pending, policy: str, writer, schedule, images: int, t0: float, bar, intact: str = "") -> int:
    """Fetches the pending step metrics, checks them for NaN/Inf, logs their mean; returns skipped steps."""
    if not pending:
        return 0
    values = jax.device_get([m for _, m in pending])
    bad = [s + 1 for (s, _), v in zip(pending, values) if int(v["nonfinite"])]
    if bad and policy != "skip":
        raise SegjaxError(f"non-finite loss or gradient at step {bad[0]} (update not applied); "
                          + (f"{intact}; " if intact else "") + "lower the learning rate, or set "
                          "--config.nonfinite=skip to skip such steps")
    step = pending[-1][0] + 1
    good = [v for v in values if not int(v["nonfinite"])] or values
    record = {k: float(np.mean([v[k] for v in good])) for k in ("loss", "grad_norm")}
    record["lr"] = float(schedule(step - 1))
    record["images_per_s"] = images / max(time.perf_counter() - t0, 1e-9)
    if bad:
        record["skipped_steps"] = len(bad)
        record["nonfinite_steps"] = bad
    writer.write(step, "train", record)
    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", img_s=f"{record['images_per_s']:.1f}")
    return len(bad)
