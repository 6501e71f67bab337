"""`segjax train` (the real CLI `main`) in a subprocess, with the tiny test model and named fault hooks.

    python -m tests.train_harness --workdir W --config.KEY=VALUE ...   (the tiny recipe TINY, then these)

Environment (test-only; nothing here is imported by segjax itself):
  SEGJAX_TEST_PAUSE="POINT:K"  the K-th time (1-based, counted in this process) execution reaches POINT,
      write the file $SEGJAX_TEST_MARKER and wait there until "$SEGJAX_TEST_MARKER.go" exists (or 60 s),
      so a test can send a signal or SIGKILL at exactly that point. POINTs:
        setup        before the model is built (data ready, no step yet)
        compile      before the train step is compiled (ahead of its first call)
        data         inside next(train iterator)
        eval         before an evaluation pass
        checkpoint   before TrainCheckpoints.save
        ckpt_arrays  inside the checkpoint write: temporary directory made, train-state arrays not yet written
        ckpt_data    inside the checkpoint write: while the data iterator's state is being serialized
        ckpt_commit  inside the checkpoint write: every item written, before the commit (rename)
  SEGJAX_TEST_INF_STEPS="5,6"  the images of those (1-based) training steps are +inf, inside the jitted step.
"""
import os
import sys
import time

from tests import tiny_model  # noqa: F401  registers the tiny model in this process

TINY = ["--config.model=" + tiny_model.NAME, "--config.model_kwargs={\"features\": 4}",
        "--config.data_options={\"image_size\": 24, \"num_train\": 16, \"num_val\": 8}",
        "--config.base_size=24", "--config.crop_size=16", "--config.batch_size=4", "--config.eval_batch_size=8",
        "--config.log_every_steps=1", "--config.warmup_epochs=0.5"]

_counts: dict = {}


def _pause(point: str) -> None:
    spec = os.environ.get("SEGJAX_TEST_PAUSE", "")
    if not spec.startswith(point + ":"):
        return
    _counts[point] = _counts.get(point, 0) + 1
    if _counts[point] != int(spec.split(":")[1]):
        return
    marker = os.environ["SEGJAX_TEST_MARKER"]
    with open(marker + ".tmp", "w") as f:
        f.write(point)
    os.replace(marker + ".tmp", marker)
    deadline = time.monotonic() + 60
    while not os.path.exists(marker + ".go") and time.monotonic() < deadline:
        time.sleep(0.02)


def _install_hooks() -> None:
    import jax.numpy as jnp
    import orbax.checkpoint as ocp
    from orbax.checkpoint._src.path import atomicity
    from segjax import checkpoint, data, evaluate, step, train

    inf_steps = [int(s) for s in os.environ.get("SEGJAX_TEST_INF_STEPS", "").split(",") if s]
    if inf_steps:
        clean_step = step.train_step

        def poisoned_step(state, batch, rng, **kw):
            bad = jnp.isin(state.step + 1, jnp.asarray(inf_steps))
            return clean_step(state, dict(batch, image=jnp.where(bad, jnp.inf, batch["image"])), rng, **kw)
        step.train_step = poisoned_step  # DataParallel jits the module's train_step when it is built

    init = step.DataParallel.__init__

    def parallel_init(self, *a, **k):
        init(self, *a, **k)
        step_fn, calls = self.train_step, []

        def first_call_pauses(*args):
            if not calls:
                calls.append(1)
                _pause("compile")
            return step_fn(*args)

        def lower(*args):  # the trainer compiles the step ahead of its first call
            if not calls:
                calls.append(1)
                _pause("compile")
            return step_fn.lower(*args)
        first_call_pauses.lower = lower
        self.train_step = first_call_pauses
    step.DataParallel.__init__ = parallel_init

    make_loader = data.make_train_loader

    class PausingIterator:
        def __init__(self, inner):
            self.inner = inner

        def __iter__(self):
            return self

        def __next__(self):
            _pause("data")
            return next(self.inner)

        def __getattr__(self, name):  # get_state / set_state / start_prefetch
            return getattr(self.inner, name)

    data.make_train_loader = lambda *a, **k: PausingIterator(iter(make_loader(*a, **k)))

    evaluate_dataset = evaluate.evaluate_dataset

    def pausing_evaluate(*a, **k):
        _pause("eval")
        return evaluate_dataset(*a, **k)
    evaluate.evaluate_dataset = pausing_evaluate

    def wrap(owner, name, point):
        original = getattr(owner, name)

        def paused(*a, **k):
            _pause(point)
            return original(*a, **k)
        setattr(owner, name, paused)

    def wrap_async(owner, name, point):
        original = getattr(owner, name)

        async def paused(*a, **k):
            _pause(point)
            return await original(*a, **k)
        setattr(owner, name, paused)

    wrap(train, "build_model", "setup")
    wrap(checkpoint.TrainCheckpoints, "save", "checkpoint")
    wrap(checkpoint.IteratorState, "get_state", "ckpt_data")
    wrap_async(ocp.StandardCheckpointHandler, "async_save", "ckpt_arrays")
    wrap_async(atomicity.AtomicRenameTemporaryPath, "finalize", "ckpt_commit")


def main(argv) -> int:
    from segjax import cli

    _install_hooks()
    return cli.main(["train", *TINY, *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


# ------------------------------------------------------------------------------ for the tests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Run:
    """One `python -m tests.train_harness ...` subprocess, optionally paused at `pause` ("POINT:K")."""

    def __init__(self, workdir, data_dir, *overrides, pause=None, inf_steps=None):
        import subprocess

        self.marker = os.path.join(str(workdir) + ".marker")
        for path in (self.marker, self.marker + ".go"):
            if os.path.exists(path):
                os.remove(path)
        env = {k: v for k, v in os.environ.items() if not k.startswith("SEGJAX_TEST_")}
        env.update(SEGJAX_TEST_MARKER=self.marker, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
        if pause:
            env["SEGJAX_TEST_PAUSE"] = pause
        if inf_steps:
            env["SEGJAX_TEST_INF_STEPS"] = ",".join(map(str, inf_steps))
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.train_harness", "--workdir", str(workdir),
                                      f"--config.data_dir={data_dir}", *overrides], cwd=ROOT, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def wait_paused(self, timeout=120) -> str:
        """Blocks until the process sits at its pause point; returns the point's name."""
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.marker):
            if self.proc.poll() is not None:
                out, err = self.proc.communicate()
                raise AssertionError(f"exited with {self.proc.returncode} before pausing:\n{out}\n{err}")
            if time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError("never reached its pause point")
            time.sleep(0.02)
        with open(self.marker) as f:
            return f.read()

    def release(self) -> None:
        open(self.marker + ".go", "w").close()

    def finish(self, timeout=180) -> tuple:
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out, err


def final_params(workdir, step):
    """Params and BatchNorm statistics of `<workdir>/checkpoints/<step>` as numpy leaves (with their paths)."""
    import jax
    import numpy as np
    from segjax import checkpoint

    variables, _ = checkpoint.load_variables(os.path.join(str(workdir), "checkpoints", str(step)))
    return [(jax.tree_util.keystr(p), np.asarray(x)) for p, x in jax.tree_util.tree_leaves_with_path(variables)]


def assert_same_params(a, b, atol=1e-6):
    import numpy as np

    assert [k for k, _ in a] == [k for k, _ in b] and len(a) > 0
    for (k, x), (_, y) in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=0, atol=atol, err_msg=k)


_references: dict = {}


def reference_run(tmp_path_factory, *overrides) -> tuple:
    """(data_dir, workdir) of one uninterrupted subprocess run per `overrides`, shared by this pytest session."""
    if overrides not in _references:
        root = tmp_path_factory.mktemp("reference")
        data_dir = _references.get("data") or root / "data"
        _references["data"] = data_dir
        rc, out, err = Run(root / "run", data_dir, *overrides).finish()
        assert rc == 0, err
        _references[overrides] = (data_dir, root / "run")
    return _references[overrides]
