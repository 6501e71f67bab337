"""Preemption: a real SIGTERM / SIGINT sent to a real `segjax train` subprocess at named points (first step's
compile, data loading, eval, checkpoint write) finishes the step, checkpoints, exits 128 + signal with a resume
message; running the same command again resumes, and the chain ends with the uninterrupted run's params."""
import json
import os
import re
import signal

import pytest

from tests.train_harness import Run, assert_same_params, final_params, reference_run

pytestmark = pytest.mark.e2e  # `segjax train` subprocesses receiving SIGTERM / SIGINT

RECIPE = ("--config.num_steps=10", "--config.eval_every_steps=4", "--config.keep_checkpoints=2")


def steps_saved(workdir):
    return sorted(int(n) for n in os.listdir(workdir / "checkpoints") if n.isdigit())


def test_signals_at_each_point_checkpoint_and_resume_to_the_uninterrupted_result(tmp_path_factory):
    data_dir, straight = reference_run(tmp_path_factory, *RECIPE)
    workdir = tmp_path_factory.mktemp("preempted") / "run"
    # (pause point, signal, step the run stops at): each run resumes where the previous one stopped
    chain = [("compile:1", signal.SIGTERM, 1),      # during the first step's compile: that step still completes
             ("data:2", signal.SIGINT, (2, 3)),     # reading a batch (for step 3, or ahead when prefetching)
             ("eval:1", signal.SIGTERM, 4),         # during the evaluation at step 4: eval and checkpoint finish
             ("checkpoint:1", signal.SIGINT, 8)]    # while step 8 is being checkpointed: the write completes
    resumed_from = 0
    for pause, sig, stopped_at in chain:
        run = Run(workdir, data_dir, *RECIPE, pause=pause)
        assert run.wait_paused() == pause.split(":")[0]
        run.proc.send_signal(sig)
        run.release()
        rc, out, err = run.finish()
        assert rc == 128 + sig, (pause, rc, out, err)
        if isinstance(stopped_at, tuple):  # the step under way when the loader was reading finished
            found = re.search(rf"{sig.name} received: step (\d+)/10", out)
            assert found and int(found[1]) in stopped_at, out
            stopped_at = int(found[1])
        assert f"{sig.name} received: step {stopped_at}/10 is checkpointed in {workdir}" in out, out
        assert "run the same command again to resume" in out
        assert "Traceback" not in err, err
        assert (f"resuming {workdir} from step {resumed_from}/10" in out) == (resumed_from > 0), out
        assert max(steps_saved(workdir)) == stopped_at
        resumed_from = stopped_at
    rc, out, err = Run(workdir, data_dir, *RECIPE).finish()
    assert rc == 0, err
    assert f"resuming {workdir} from step 8/10" in out
    assert_same_params(final_params(workdir, 10), final_params(straight, 10))
    # the logged learning rates of the four-times-interrupted run are the straight run's, step for step
    def lrs(w):
        return {r["step"]: r["lr"] for r in map(json.loads, open(w / "metrics.jsonl")) if r["split"] == "train"}
    assert lrs(workdir) == lrs(straight) and len(lrs(workdir)) == 10


def test_a_signal_before_the_first_step_stops_at_once_without_a_checkpoint(tmp_path_factory):
    data_dir, _ = reference_run(tmp_path_factory, *RECIPE)
    workdir = tmp_path_factory.mktemp("early") / "run"
    run = Run(workdir, data_dir, *RECIPE, pause="setup:1")
    run.wait_paused()
    run.proc.send_signal(signal.SIGTERM)
    run.release()
    rc, out, err = run.finish()
    assert rc == 143, (rc, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: SIGTERM received before the first step"), err
    assert not os.path.isdir(workdir / "checkpoints") or steps_saved(workdir) == []
