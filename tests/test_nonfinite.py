"""Non-finite steps via the CLI: +inf images injected into the jitted step at a chosen step (a deterministic fault).
Default: a one-line error naming the step, status 2, the checkpoints before it intact; --config.nonfinite=skip
resumes that workdir, skips the step and counts it (metrics.jsonl and the final message)."""
import json
import os

import jax
import numpy as np
import pytest

from segjax import checkpoint
from tests.train_harness import Run, reference_run

pytestmark = pytest.mark.e2e  # `segjax train` subprocesses with poisoned steps

RECIPE = ("--config.num_steps=10", "--config.eval_every_steps=4", "--config.keep_checkpoints=2")


def train_records(workdir):
    return [r for r in map(json.loads, open(workdir / "metrics.jsonl")) if r["split"] == "train"]


def test_inf_stops_with_the_step_then_skip_resumes_and_counts(tmp_path_factory):
    data_dir, _ = reference_run(tmp_path_factory, *RECIPE)
    workdir = tmp_path_factory.mktemp("nonfinite") / "run"
    rc, out, err = Run(workdir, data_dir, *RECIPE, inf_steps=[6]).finish()
    assert rc == 2, (out, err)
    lines = [line for line in err.strip().splitlines() if not line.startswith("train ")]  # tqdm's bar
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error: non-finite loss or gradient at step 6 (update not applied); "
                               f"the checkpoints in {workdir / 'checkpoints'} (latest: step 4) are intact"), lines[0]
    assert "--config.nonfinite=skip" in lines[0]
    # the fault was caught before any checkpoint recorded it; the one before is complete and finite
    assert sorted(os.listdir(workdir / "checkpoints")) == ["4"]
    assert [r["step"] for r in train_records(workdir)] == [1, 2, 3, 4, 5]
    variables, meta = checkpoint.load_variables(str(workdir))
    assert meta["model"] == "tiny_seg_test"
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(variables))

    rc, out, err = Run(workdir, data_dir, *RECIPE, "--config.nonfinite=skip", inf_steps=[6]).finish()
    assert rc == 0, err
    assert f"resuming {workdir} from step 4/10" in out
    assert "step 10" in out and "skipped 1 non-finite steps" in out, out
    records = {r["step"]: r for r in train_records(workdir)}
    assert records[6]["skipped_steps"] == 1 and records[6]["nonfinite_steps"] == [6]
    assert not any("skipped_steps" in r for s, r in records.items() if s != 6)
    assert all(np.isfinite(r["loss"]) for s, r in records.items() if s != 6)
    variables, _ = checkpoint.load_variables(str(workdir / "checkpoints" / "10"))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(variables))
