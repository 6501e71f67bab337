"""Multi-process start-up: when and how to call `jax.distributed.initialize`.

`segjax train` runs as one process per host (or per GPU); every process runs the same command. The
processes find each other through, in this order:
  1. arguments (the CLI's --coordinator-address HOST:PORT --num-processes N --process-id I);
  2. SEGJAX_COORDINATOR_ADDRESS, SEGJAX_NUM_PROCESSES, SEGJAX_PROCESS_ID;
  3. a cluster scheduler's environment: SLURM (srun), Open MPI (mpirun), TPU pods on GKE (CLUSTERS).
Values missing from 1 and 2 are filled in from 3. With none of them, or a single process, nothing
is initialised and training runs in this one process. SEGJAX_DISTRIBUTED=0 turns 3 off;
SEGJAX_DISTRIBUTED=jax hands the detection to JAX (Cloud TPU VM pods, found through their metadata).

`initialize` must run before anything else uses JAX in the process (before the first array).
"""
from __future__ import annotations

import os

from segjax.errors import SegjaxError

ENV_VARS = {"coordinator_address": "SEGJAX_COORDINATOR_ADDRESS", "num_processes": "SEGJAX_NUM_PROCESSES",
            "process_id": "SEGJAX_PROCESS_ID"}
FLAGS = {"coordinator_address": "--coordinator-address", "num_processes": "--num-processes",
         "process_id": "--process-id"}


# Schedulers JAX's auto-detection knows, by the environment each documents for its tasks:
# (name, variable that says we run under it, variable holding the number of processes).
CLUSTERS = (
    ("SlurmCluster", "SLURM_JOB_ID", "SLURM_NTASKS"),                 # srun
    ("OmpiCluster", "OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE"),  # mpirun (Open MPI)
    ("GkeTpuCluster", "TPU_WORKER_HOSTNAMES", None),                  # TPU pods on GKE: one host per name
)


def detected_cluster() -> tuple[str, int] | None:
    """(name, process count) of a cluster scheduler this process runs under, or None.

    Read from the schedulers' documented environment variables (CLUSTERS), the ones JAX's
    `jax.distributed.initialize()` completes its arguments from. Cloud TPU VM pods announce
    themselves only through the metadata server, which JAX queries: set SEGJAX_DISTRIBUTED=jax there
    and `plan` leaves the whole detection to `jax.distributed.initialize()`.
    """
    if os.environ.get("SEGJAX_DISTRIBUTED", "").strip().lower() in ("0", "off", "false", "no"):
        return None
    for name, present, count in CLUSTERS:
        if not os.environ.get(present, "").strip():
            continue
        if count is None:
            return name, len([h for h in os.environ[present].split(",") if h.strip()])
        try:
            return name, int(os.environ.get(count, ""))
        except ValueError:  # a half-configured environment: JAX would fail on it too; treat as absent
            continue
    return None


def _parse_int(raw, where: str) -> int:
    try:
        return int(raw)
    except (TypeError, ValueError):
        raise SegjaxError(f"{where}={raw!r}: expected an integer") from None


def plan(coordinator_address: str | None = None, num_processes: int | None = None,
         process_id: int | None = None) -> dict | None:
    """The keyword arguments `initialize` passes to jax.distributed.initialize, or None for one process.

    {} means "let JAX read everything from the detected cluster"; partial arguments are completed
    from the cluster by JAX.
    """
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes, "process_id": process_id}
    where = {k: FLAGS[k] for k in given}
    for key, var in ENV_VARS.items():
        if given[key] is None and os.environ.get(var, "").strip():
            given[key], where[key] = os.environ[var].strip(), var
    explicit = {k: v for k, v in given.items() if v is not None}
    for key in ("num_processes", "process_id"):
        if key in explicit:
            explicit[key] = _parse_int(explicit[key], where[key])
    cluster = detected_cluster()
    if not explicit:
        if os.environ.get("SEGJAX_DISTRIBUTED", "").strip().lower() == "jax":
            return {}  # jax.distributed.initialize() detects the cluster itself (Cloud TPU VM pods)
        return {} if cluster and cluster[1] > 1 else None
    n = explicit.get("num_processes")
    if n is not None and n < 1:
        raise SegjaxError(f"{where['num_processes']}={n}: the number of processes must be >= 1")
    if n == 1:
        return None
    missing = [k for k in given if k not in explicit]
    if missing and cluster is None:
        raise SegjaxError(f"multi-process training needs {FLAGS[missing[0]]} (or {ENV_VARS[missing[0]]}) too: "
                          "give all of --coordinator-address HOST:PORT --num-processes N --process-id I")
    if n is not None and "process_id" in explicit and not 0 <= explicit["process_id"] < n:
        raise SegjaxError(f"{where['process_id']}={explicit['process_id']}: must be in [0, {n}) for "
                          f"{n} processes")
    address = explicit.get("coordinator_address")
    if address is not None:
        host, _, port = str(address).rpartition(":")
        if not host or not port.isdigit():
            raise SegjaxError(f"{where['coordinator_address']}={address!r}: expected HOST:PORT, e.g. "
                              "10.0.0.1:1234 (process 0's host, a free port)")
    return explicit


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Joins this process to the others (see the module docstring); True when running multi-process.

    Call it before any other JAX use in the process. Calling it again is a no-op.
    """
    import jax

    if jax.distributed.is_initialized():
        return True
    kwargs = plan(coordinator_address, num_processes, process_id)
    if kwargs is None:
        return False
    # Cross-process collectives on CPU (recent JAX defaults to gloo; older ones had none).
    if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(**kwargs)
    except (RuntimeError, ValueError) as e:
        shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) or "from the cluster environment"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SegjaxError(f"jax.distributed.initialize({shown}) failed: {first}; every process must run the "
                          "same command with its own --process-id, and process 0's port must be reachable") from e
    return True


def max_over_processes(value: int) -> int:
    """The largest `value` over all processes, on every process (one tiny collective when
    multi-process): how processes agree, e.g. to stop together on a signal only some of them got."""
    import jax

    if jax.process_count() == 1:
        return int(value)
    import numpy as np
    from jax.experimental import multihost_utils

    return int(np.max(multihost_utils.process_allgather(np.asarray(value, np.int32))))
