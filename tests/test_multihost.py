"""Multi-host training: when `segjax.distributed` initialises, the loader's per-process slices of one
global batch stream, and `segjax train` as 2 processes on localhost (CPU, gloo collectives) landing
on the same parameters as 1 process with the same global batch, through a stop and resume."""
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import portpicker
import pytest

from segjax import data, distributed
from segjax.errors import SegjaxError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID",
                "OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "SEGJAX_DISTRIBUTED", *distributed.ENV_VARS.values())


@pytest.fixture
def clean_env(monkeypatch):
    for var in CLUSTER_VARS:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


# ------------------------------------------------------------------------------------ when to initialise

def test_plan_single_process_flags_env_and_cluster(clean_env):
    assert distributed.plan() is None  # nothing set: one process, no jax.distributed
    assert distributed.plan("h:1", 1, 0) is None
    assert distributed.plan("10.0.0.1:1234", 4, 3) == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4,
                                                        "process_id": 3}
    clean_env.setenv("SEGJAX_COORDINATOR_ADDRESS", "node0:999")
    clean_env.setenv("SEGJAX_NUM_PROCESSES", "2")
    clean_env.setenv("SEGJAX_PROCESS_ID", "1")
    assert distributed.plan() == {"coordinator_address": "node0:999", "num_processes": 2, "process_id": 1}
    assert distributed.plan(process_id=0)["process_id"] == 0  # a flag beats the environment
    for var in distributed.ENV_VARS.values():
        clean_env.delenv(var)
    # srun with 2 tasks: JAX's SLURM detector fills everything in
    for var, value in (("SLURM_JOB_ID", "7"), ("SLURM_STEP_NODELIST", "n[1-2]"), ("SLURM_NTASKS", "2"),
                       ("SLURM_PROCID", "1"), ("SLURM_LOCALID", "0")):
        clean_env.setenv(var, value)
    assert distributed.detected_cluster() == ("SlurmCluster", 2)
    assert distributed.plan() == {}
    assert distributed.plan(coordinator_address="n1:5000") == {"coordinator_address": "n1:5000"}
    clean_env.setenv("SEGJAX_DISTRIBUTED", "0")
    assert distributed.plan() is None
    clean_env.setenv("SEGJAX_DISTRIBUTED", "1")
    clean_env.setenv("SLURM_NTASKS", "1")  # a one-task job stays single-process
    assert distributed.plan() is None


def test_cluster_environments_without_jax_internals(clean_env):
    clean_env.setenv("OMPI_MCA_orte_hnp_uri", "123.0;tcp://10.0.0.1:5000")
    clean_env.setenv("OMPI_COMM_WORLD_SIZE", "4")
    assert distributed.detected_cluster() == ("OmpiCluster", 4) and distributed.plan() == {}
    clean_env.delenv("OMPI_MCA_orte_hnp_uri")
    clean_env.setenv("TPU_WORKER_HOSTNAMES", "w0,w1,w2")
    assert distributed.detected_cluster() == ("GkeTpuCluster", 3)
    clean_env.delenv("TPU_WORKER_HOSTNAMES")
    assert distributed.detected_cluster() is None and distributed.plan() is None
    clean_env.setenv("SEGJAX_DISTRIBUTED", "jax")  # a Cloud TPU VM pod: JAX asks the metadata server
    assert distributed.plan() == {}


@pytest.mark.parametrize("args, message", [
    (("h:1", 2, None), "--process-id"),
    ((None, 2, 0), "--coordinator-address"),
    (("h:1", 2, 2), "--process-id=2: must be in [0, 2)"),
    (("h:1", 0, 0), "--num-processes=0"),
    (("no-port", 2, 0), "expected HOST:PORT"),
])
def test_incomplete_or_bad_flags_are_one_line_errors(clean_env, args, message):
    with pytest.raises(SegjaxError, match=message.replace("[", r"\[").replace(")", r"\)")):
        distributed.plan(*args)


def test_bad_env_value_names_the_variable(clean_env):
    clean_env.setenv("SEGJAX_NUM_PROCESSES", "two")
    with pytest.raises(SegjaxError, match="SEGJAX_NUM_PROCESSES='two': expected an integer"):
        distributed.plan()


# ------------------------------------------------------------------------------------ data per process

class IndexSource:
    """Example i is an image filled with 10*i, so a batch shows which records it holds."""

    def __len__(self):
        return 10

    def __getitem__(self, i):
        return {"image": np.full((8, 8, 3), 10 * int(i), np.uint8), "segmentation_mask": np.zeros((8, 8), np.uint8)}


def test_processes_get_their_rows_of_the_one_process_global_batches():
    kw = dict(crop_size=8, base_size=8, scale_range=(1.0, 1.0), hflip=True, seed=5)
    whole = iter(data.make_train_loader(IndexSource(), batch_size=4, shard_index=0, shard_count=1, **kw))
    parts = [iter(data.make_train_loader(IndexSource(), batch_size=2, shard_index=p, shard_count=2, **kw))
             for p in range(2)]
    for _ in range(6):  # 10 records, global batch 4: crosses two epoch boundaries (reshuffled)
        batch = next(whole)
        local = [next(it) for it in parts]
        for k in ("image", "mask"):  # same records, same augmentation (flip) per global position
            np.testing.assert_array_equal(np.concatenate([b[k] for b in local]), batch[k])


# ------------------------------------------------------------------------------------ 2 processes end to end

RECIPE = '''
import sys
sys.path.insert(0, {repo!r})
from tests import tiny_model
from segjax.config import base_config


def get_config():
    c = base_config()
    c.name = "tiny_multihost"
    c.model = tiny_model.NAME
    c.model_kwargs = {{"features": 4}}
    c.num_classes = 5
    c.data_options = {{"image_size": 24, "num_train": 16, "num_val": 6}}
    c.base_size = 24
    c.crop_size = 16
    c.batch_size = 4              # global: 4 on 1 device, 2 + 2 on 2 processes
    c.eval_batch_size = 4
    c.num_steps = 6               # 4 steps per epoch: crosses an epoch boundary
    c.eval_every_steps = 3
    c.log_every_steps = 1
    c.optimizer = "sgd"
    c.learning_rate = 0.1
    c.lr_mult = {{}}
    c.keep_checkpoints = 1
    return c
'''
TIMEOUT = 240


def _launch(recipe, workdir, data_dir, num_processes, *extra):
    """`segjax train` as `num_processes` processes on 127.0.0.1: (processes, their log files)."""
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=1"}
    for var in CLUSTER_VARS:
        env.pop(var, None)
    cmd = [sys.executable, "-m", "segjax.cli", "train", "--config", str(recipe), "--workdir", str(workdir),
           f"--config.data_dir={data_dir}", *extra]
    if num_processes > 1:
        cmd += ["--coordinator-address", f"127.0.0.1:{portpicker.pick_unused_port()}",
                "--num-processes", str(num_processes)]
    procs, logs = [], []
    for i in range(num_processes):
        logs.append(tempfile.TemporaryFile("w+"))
        procs.append(subprocess.Popen(cmd + (["--process-id", str(i)] if num_processes > 1 else []), env=env,
                                      stdout=logs[-1], stderr=subprocess.STDOUT, cwd=REPO))
    return procs, logs


def _collect(procs, logs, returncode=0):
    """Waits (bounded) for every process; asserts their exit status; returns their outputs."""
    try:
        for p in procs:
            p.wait(timeout=TIMEOUT)
    finally:
        for p in procs:  # never leave a process waiting on its peer
            if p.poll() is None:
                p.kill()
                p.wait()
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    for p, out in zip(procs, outputs):
        assert p.returncode == returncode, out[-3000:]
    return outputs


def _train(recipe, workdir, data_dir, num_processes, *extra):
    return _collect(*_launch(recipe, workdir, data_dir, num_processes, *extra))


def _final_variables(workdir):
    from segjax import checkpoint

    variables, _ = checkpoint.load_variables(os.path.join(workdir, "checkpoints", "6"))
    return variables


def _records(workdir, split):
    return [r for r in map(json.loads, open(os.path.join(workdir, "metrics.jsonl"))) if r["split"] == split]


@pytest.mark.e2e  # three `segjax train` processes
def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path):
    import jax
    from segjax import config as config_lib, train

    recipe = tmp_path / "tiny_multihost.py"
    recipe.write_text(RECIPE.format(repo=REPO))
    data_dir = tmp_path / "data"
    _train(recipe, tmp_path / "one", data_dir, 1)
    # 2 processes, stopped at step 3 (collective checkpoint + per-process iterator state) and resumed
    _train(recipe, tmp_path / "two", data_dir, 2, "--config.stop_at_step=3")
    outputs = _train(recipe, tmp_path / "two", data_dir, 2)
    assert all("resuming" in out and "from step 3/6" in out for out in outputs)
    # one iterator state per process (orbax 0.12 adds a commit_success.txt beside them, 0.11 does not)
    written = set(os.listdir(tmp_path / "two" / "checkpoints" / "6" / "data")) - {"commit_success.txt"}
    assert written == {"process_0-of-2.json", "process_1-of-2.json"}

    one, two = _final_variables(tmp_path / "one"), _final_variables(tmp_path / "two")
    diff = jax.tree_util.tree_map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), one, two)
    assert max(jax.tree_util.tree_leaves(diff)) < 1e-5, diff

    # ... and training moved them far more than that, so the agreement says something: different data
    # or un-averaged gradients on the 2 processes would show up as differences of this order.
    config = config_lib.load_config(str(recipe))
    init = train.initial_variables(config, train.build_model(config),
                                     jax.random.fold_in(jax.random.PRNGKey(config.seed), 1))
    moved = jax.tree_util.tree_map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                                   one["params"], init["params"])
    assert max(jax.tree_util.tree_leaves(moved)) > 1e-2

    # Only process 0 logs: each step once; same losses and validation scores as 1 process.
    train1, train2 = _records(tmp_path / "one", "train"), _records(tmp_path / "two", "train")
    assert [r["step"] for r in train2] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([r["loss"] for r in train2], [r["loss"] for r in train1], rtol=1e-5)
    eval1, eval2 = _records(tmp_path / "one", "eval"), _records(tmp_path / "two", "eval")
    assert [r["step"] for r in eval2] == [3, 6]
    np.testing.assert_allclose([r["miou"] for r in eval2], [r["miou"] for r in eval1], atol=1e-6)


@pytest.mark.e2e  # two `segjax train` processes
def test_a_signal_to_one_process_stops_both_at_the_same_step_with_a_checkpoint(tmp_path):
    recipe = tmp_path / "tiny_multihost.py"
    recipe.write_text(RECIPE.format(repo=REPO))
    workdir = tmp_path / "signalled"
    procs, logs = _launch(recipe, workdir, tmp_path / "data", 2, "--config.num_steps=500",
                          "--config.eval_every_steps=500")
    deadline = time.monotonic() + TIMEOUT
    metrics = workdir / "metrics.jsonl"
    while not (metrics.exists() and metrics.read_text().count('"split": "train"') >= 2):  # training is under way
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            _collect(procs, logs)  # fails with the processes' output
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)  # only process 1
    outputs = _collect(procs, logs, returncode=128 + signal.SIGTERM)
    steps = [re.search(r"step (\d+)/500 is checkpointed", out) for out in outputs]
    assert all(steps), outputs[0][-2000:]
    step = int(steps[0][1])
    assert int(steps[1][1]) == step and 2 <= step < 500
    assert "SIGTERM received by another process" in outputs[0] and "SIGTERM received:" in outputs[1]
    assert os.listdir(workdir / "checkpoints") == [str(step)]
