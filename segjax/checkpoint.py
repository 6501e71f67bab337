"""Checkpoints on disk: Orbax for arrays, a JSON file beside them for what built them.

A *variables checkpoint* is a directory holding `variables/` (Orbax, {"params", "batch_stats"})
and `segjax.json` ({"model", "model_kwargs", ...}); `segjax convert` writes one.

Training keeps `<workdir>/checkpoints/<step>/` through an Orbax CheckpointManager (written to a
temporary directory and renamed: atomic), each step holding the items
    state/   {"step", "params", "batch_stats", "opt_state", "rng"}  (collective save on many hosts)
    data/    the data iterator's position, one JSON file per process
    meta/    {"model", "model_kwargs", "num_classes", "task", "config"}
The latest `keep` steps are kept, plus the best one by a validation metric. A process killed mid-write
leaves only `<step>.orbax-checkpoint-tmp` (warned about and removed at the next start); resuming falls
back past steps that fail to restore (TrainCheckpoints.restore_latest). `--checkpoint`
accepts a variables checkpoint, one step directory, or a workdir (its best step).
"""
from __future__ import annotations

import json
import os
import shutil
import sys

import jax
import numpy as np

from segjax.files import write_atomic
from segjax.errors import SegjaxError

META = "segjax.json"


def save_variables(out_dir: str, variables, meta: dict) -> None:
    import orbax.checkpoint as ocp

    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(out_dir, "variables"), jax.tree_util.tree_map(np.asarray, variables), force=True)
        ckptr.wait_until_finished()
    write_atomic(os.path.join(out_dir, META), json.dumps(meta, indent=2, default=str))


def load_variables(path: str):
    """Returns (variables, meta) from a variables checkpoint, a training step directory or a workdir."""
    import orbax.checkpoint as ocp

    path = resolve(path)
    meta_path = os.path.join(path, META)
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
        with ocp.StandardCheckpointer() as ckptr:
            variables = ckptr.restore(os.path.join(path, "variables"), _local_target(ckptr, os.path.join(path, "variables")))
        return variables, meta
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as ckptr:
        meta = ckptr.restore(os.path.join(path, "meta"))
    with ocp.StandardCheckpointer() as ckptr:
        state = ckptr.restore(os.path.join(path, "state"), _local_target(ckptr, os.path.join(path, "state")))
    return {"params": state["params"], "batch_stats": state.get("batch_stats", {})}, meta


def _local_target(ckptr, directory: str):
    """The saved tree's shapes and dtypes on this process's first device: a checkpoint written by a
    multi-process run (arrays over several hosts' devices) then loads in one process too."""
    tree = ckptr.metadata(directory).item_metadata
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                                  getattr(tree, "tree", tree))


def _is_step_dir(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "state")) and os.path.isdir(os.path.join(path, "meta"))


def resolve(path: str) -> str:
    """`--checkpoint PATH`: a variables checkpoint or step directory as is; a workdir or its
    `checkpoints/` root (Orbax's) -> its best step (the latest where no step has scores)."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(path):
        raise SegjaxError(f"{path}: no such checkpoint or workdir")
    if os.path.isfile(os.path.join(path, META)) or _is_step_dir(path):
        return path
    workdir = path if os.path.isdir(os.path.join(path, CHECKPOINTS)) else \
        os.path.dirname(path) if os.path.basename(path) == CHECKPOINTS else None
    if workdir is None:
        raise SegjaxError(f"{path}: not a segjax checkpoint (no {META}, state/ or checkpoints/); "
                          f"pass a workdir or a checkpoint directory")
    with TrainCheckpoints(workdir, read_only=True) as ckpts:
        step = ckpts.best_step()
        if step is None:
            raise SegjaxError(f"{workdir}: workdir has no finished checkpoint yet; train first "
                              f"(segjax train --workdir {workdir})")
        return os.path.join(ckpts.directory, str(step))


# ------------------------------------------------------------------------------ training checkpoints

_SAVE_OVERHEAD = 256 * 1024  # Orbax's metadata files, one disk block each at least


def _check_space(directory: str, step: int, tree) -> None:
    """Refuses a save the disk can't hold before Orbax writes anything: running out of space midway
    fails inside Orbax's writer threads, noisily. Older checkpoints are untouched either way."""
    need = sum(int(getattr(x, "nbytes", 0)) for x in jax.tree_util.tree_leaves(tree)) + _SAVE_OVERHEAD
    free = shutil.disk_usage(directory).free
    if free < need:
        workdir = os.path.dirname(directory)
        raise SegjaxError(f"{workdir}: no space for the checkpoint of step {step} (needs about {need / 2**20:.2f} MiB, "
                          f"{free / 2**20:.2f} MiB free); free some space or pick another --workdir")


CHECKPOINTS = "checkpoints"


class IteratorState:
    """Adapts a data iterator's get_state()/set_state() to grain's per-process Orbax handler."""

    def __init__(self, iterator):
        self.iterator = iterator

    def get_state(self) -> bytes:
        state = self.iterator.get_state()
        if isinstance(state, bytes):
            return json.dumps({"bytes": state.decode()}).encode()
        return json.dumps({"json": state}).encode()

    def set_state(self, raw: bytes) -> None:
        saved = json.loads(raw.decode())
        self.iterator.set_state(saved["bytes"].encode() if "bytes" in saved else saved["json"])

    def start_prefetch(self) -> None:  # grain's handler calls this after restoring
        if hasattr(self.iterator, "start_prefetch"):
            self.iterator.start_prefetch()


class TrainCheckpoints:
    """`<workdir>/checkpoints`: Orbax CheckpointManager keeping the latest `keep` plus the best step."""

    def __init__(self, workdir: str, keep: int = 2, best_metric: str = "miou", read_only: bool = False):
        import orbax.checkpoint as ocp
        from orbax.checkpoint.checkpoint_managers import preservation_policy as pp
        import grain.checkpoint  # noqa: F401  registers the iterator handler's args

        self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINTS)
        self.best_metric = best_metric
        if not read_only:
            for name in unfinished_writes(self.directory):
                _warn(f"ignoring {os.path.join(self.directory, name)}: a checkpoint write that never finished "
                      f"(the process was stopped while saving); it is removed")
        policy = pp.AnyPreservationPolicy([
            pp.LatestN(n=max(keep, 1)),
            pp.BestN(get_metric_fn=lambda m: m.get(best_metric, float("-inf")), n=1, keep_checkpoints_without_metrics=False),
        ])
        # best_fn only makes Orbax persist the metrics (so the best step survives a restart).
        options = ocp.CheckpointManagerOptions(preservation_policy=policy, create=not read_only,
                                               best_fn=lambda m: m.get(best_metric, float("-inf")),
                                               read_only=read_only, enable_async_checkpointing=False,
                                               cleanup_tmp_directories=not read_only)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        """The kept step with the highest best_metric (Orbax's best_fn); the latest where none has scores."""
        return self.manager.best_step()

    def save(self, step: int, state_tree, iterator, meta: dict, metrics: dict | None = None) -> None:
        import orbax.checkpoint as ocp
        import grain.checkpoint as gcp

        _check_space(self.directory, step, state_tree)
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state_tree),
            data=gcp.CheckpointSave(IteratorState(iterator)),
            meta=ocp.args.JsonSave(meta),
        )
        self.manager.save(step, args=args, metrics=metrics, force=True)
        self.manager.wait_until_finished()

    def read_meta(self, step: int) -> dict:
        import orbax.checkpoint as ocp

        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, step: int, state_target, iterator) -> tuple:
        """Restores `state_target`'s structure (abstract or concrete arrays with shardings) and the iterator."""
        import orbax.checkpoint as ocp
        import grain.checkpoint as gcp

        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(state_target),
            data=gcp.CheckpointRestore(IteratorState(iterator)),
            meta=ocp.args.JsonRestore(),
        )
        restored = self.manager.restore(step, args=args)
        return restored["state"], restored["meta"]

    def restore_latest(self, state_target, iterator, check_meta=None) -> tuple:
        """(step, state tree) of the newest step that restores; (None, None) when no step was ever committed.

        A step that fails to restore (truncated or missing files, bad JSON, a missing item) is skipped with a
        warning; once an older one restores, the broken ones move to <workdir>/corrupt_checkpoints/ (kept for
        inspection; a later save may reuse their step numbers). `check_meta(meta)` may raise SegjaxError
        (a different recipe): that propagates. Steps that exist but none restores -> SegjaxError naming the
        directory: never a silent fresh start.
        """
        broken = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                meta = self.read_meta(step)
                if check_meta is not None:
                    check_meta(meta)
                tree, _ = self.restore(step, state_target, iterator)
            except SegjaxError:
                raise
            except Exception as e:  # noqa: BLE001  anything unreadable: try the step before
                why = (str(e).strip().splitlines() or [""])[0][:160]
                _warn(f"checkpoint {os.path.join(self.directory, str(step))} cannot be restored "
                      f"({type(e).__name__}: {why}); trying the one before")
                broken.append(step)
                continue
            for bad in broken:
                _warn(f"moved {self._set_aside(bad)} aside; resuming from step {step}")
            if broken:
                self.manager.reload()
            return step, tree
        if broken:
            raise SegjaxError(f"{self.directory}: none of its checkpoints (steps {', '.join(map(str, broken))}) can be "
                              f"restored; move that directory aside to train from scratch, or use another --workdir")
        return None, None

    def _set_aside(self, step: int) -> str:
        source = os.path.join(self.directory, str(step))
        target = os.path.join(os.path.dirname(self.directory), CORRUPT, str(step))
        n = 1
        while os.path.exists(target):
            target = os.path.join(os.path.dirname(self.directory), CORRUPT, f"{step}.{n}")
            n += 1
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.rename(source, target)
        return target


CORRUPT = "corrupt_checkpoints"


def unfinished_writes(directory: str) -> list[str]:
    """Orbax's temporary step directories: writes that were never committed (renamed)."""
    if not os.path.isdir(directory):
        return []
    return sorted(n for n in os.listdir(directory) if ".orbax-checkpoint-tmp" in n)


def _warn(message: str) -> None:
    if jax.process_index() == 0:
        print(f"warning: {message}", file=sys.stderr, flush=True)
