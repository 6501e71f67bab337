"""Crash safety: SIGKILL at named points inside a checkpoint write leaves the last complete checkpoint, which
the next start resumes from (ending with the uninterrupted run's params); a workdir whose latest checkpoint is
corrupt falls back to the previous one with a warning, and one with no usable checkpoint is an error.

The SIGKILL chain runs `segjax train` subprocesses; the corruption cases run on TrainCheckpoints.restore_latest
(what the training loop calls at start), with one of them, and the no-checkpoint error, through the loop too."""
import glob
import os
import shutil
import signal

import pytest

from segjax import checkpoint
from segjax import config as config_lib
from segjax.errors import SegjaxError
from segjax.train import train_and_evaluate
from tests.train_harness import TINY, Run, assert_same_params, final_params, reference_run

pytestmark = pytest.mark.e2e  # `segjax train` subprocesses (SIGKILL mid-write; the reference run)

RECIPE = ("--config.num_steps=10", "--config.eval_every_steps=4", "--config.keep_checkpoints=2")


def listing(workdir):
    return sorted(os.listdir(workdir / "checkpoints"))


def test_sigkill_inside_a_checkpoint_write_resumes_from_the_last_complete_one(tmp_path_factory):
    data_dir, straight = reference_run(tmp_path_factory, *RECIPE)
    workdir = tmp_path_factory.mktemp("killed") / "run"
    # checkpoints at steps 4, 8, 10; every run is killed while writing step 8, so each restart resumes from 4
    for n, point in enumerate(["ckpt_arrays:2", "ckpt_data:1", "ckpt_commit:1"]):
        run = Run(workdir, data_dir, *RECIPE, pause=point)
        run.wait_paused()
        assert any(name.startswith("8.") for name in listing(workdir)), listing(workdir)  # write under way
        run.proc.send_signal(signal.SIGKILL)
        rc, out, err = run.finish()
        assert rc == -signal.SIGKILL
        assert "4" in listing(workdir) and "8" not in listing(workdir), (point, listing(workdir))
        if n:  # the previous run was killed mid-write: warned about, cleaned up, resumed from step 4
            assert f"resuming {workdir} from step 4/10" in out, out
            assert "a checkpoint write that never finished" in err, err
    rc, out, err = Run(workdir, data_dir, *RECIPE).finish()
    assert rc == 0, err
    assert f"resuming {workdir} from step 4/10" in out and "never finished" in err
    assert not any("tmp" in name for name in listing(workdir)), listing(workdir)
    assert_same_params(final_params(workdir, 10), final_params(straight, 10))


def in_process_config(data_dir, *extra):
    return config_lib.apply_overrides(config_lib.load_config(None),
                                      [*TINY, *RECIPE, f"--config.data_dir={data_dir}", *extra])


def largest_array_file(step_dir):
    files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)]
    return max(files, key=os.path.getsize)


CORRUPTIONS = {
    "truncated array file": lambda d: os.truncate(largest_array_file(d), os.path.getsize(largest_array_file(d)) // 2),
    "missing array metadata": lambda d: os.remove(os.path.join(d, "state", "_METADATA")),
    "garbage data-iterator JSON": lambda d: open(os.path.join(d, "data", "process_0-of-1.json"), "w").write("{oops"),
    "garbage meta JSON": lambda d: open(os.path.join(d, "meta", "metadata"), "w").write("not json"),
    "missing state item": lambda d: shutil.rmtree(os.path.join(d, "state")),
}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    return reference_run(tmp_path_factory, *RECIPE)


class RecordingIterator:
    """Stands in for the data iterator: records the state a restore hands it."""
    state = None

    def get_state(self):
        return {}

    def set_state(self, state):
        self.state = state


def restore_latest(workdir):
    """What the training loop does at start, on TrainCheckpoints itself: (step, restored state, iterator state)."""
    iterator = RecordingIterator()
    with checkpoint.TrainCheckpoints(str(workdir), keep=2) as ckpts:
        step, tree = ckpts.restore_latest(None, iterator)
    return step, tree, iterator.state


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one(finished, tmp_path, capsys, corruption):
    data_dir, straight = finished
    workdir = tmp_path / "run"
    shutil.copytree(straight, workdir)
    assert "10" in listing(workdir) and "8" in listing(workdir)
    CORRUPTIONS[corruption](str(workdir / "checkpoints" / "10"))
    step, tree, iterator_state = restore_latest(workdir)
    assert step == 8 and int(tree["step"]) == 8 and iterator_state is not None  # resumes from 8, not from scratch
    assert_same_params(final_params(workdir, 8), final_params(straight, 8))
    err = capsys.readouterr().err
    assert f"checkpoint {workdir / 'checkpoints' / '10'} cannot be restored" in err, err
    assert f"moved {workdir / 'corrupt_checkpoints' / '10'} aside; resuming from step 8" in err, err
    assert "10" not in listing(workdir) and os.path.isdir(workdir / "corrupt_checkpoints" / "10")


def test_training_on_after_a_corrupt_checkpoint_recreates_it(finished, tmp_path, capsys):
    """End to end through the training loop (in process): step 10's array file truncated, the run resumes
    from 8 and re-creates step 10, equal to the straight run's."""
    data_dir, straight = finished
    workdir = tmp_path / "run"
    shutil.copytree(straight, workdir)
    CORRUPTIONS["truncated array file"](str(workdir / "checkpoints" / "10"))
    result = train_and_evaluate(in_process_config(data_dir), str(workdir))
    assert result["step"] == 10
    err = capsys.readouterr().err
    assert f"moved {workdir / 'corrupt_checkpoints' / '10'} aside; resuming from step 8" in err, err
    assert_same_params(final_params(workdir, 10), final_params(straight, 10))


def test_a_leftover_orbax_tmp_dir_is_ignored_and_removed(finished, tmp_path, capsys):
    data_dir, straight = finished
    workdir = tmp_path / "run"
    shutil.copytree(straight, workdir)
    os.rename(workdir / "checkpoints" / "10", workdir / "checkpoints" / "10.orbax-checkpoint-tmp")
    step, tree, _ = restore_latest(workdir)
    assert step == 8 and int(tree["step"]) == 8
    assert "checkpoint write that never finished" in capsys.readouterr().err
    assert not any("tmp" in name for name in listing(workdir)), listing(workdir)


def test_no_usable_checkpoint_is_an_error_not_a_fresh_start(finished, tmp_path):
    data_dir, straight = finished
    workdir = tmp_path / "run"
    shutil.copytree(straight, workdir)
    steps = [n for n in listing(workdir) if n.isdigit()]
    for step in steps:
        os.remove(workdir / "checkpoints" / step / "state" / "_METADATA")
    for _ in range(2):  # and again: nothing was moved or overwritten by the first attempt
        with pytest.raises(SegjaxError, match=f"{workdir / 'checkpoints'}: none of its checkpoints .* can be "
                                              "restored; move that directory aside"):
            restore_latest(workdir)
        assert [n for n in listing(workdir) if n.isdigit()] == steps
    # the training loop turns that into its error, not a fresh start
    with pytest.raises(SegjaxError, match="none of its checkpoints"):
        train_and_evaluate(in_process_config(data_dir), str(workdir))
