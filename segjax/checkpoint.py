"""Checkpoints on disk: Orbax for arrays, a JSON file beside them for what built them.

A *variables checkpoint* is a directory holding `variables/` (Orbax, {"params", "batch_stats"})
and `segjax.json` ({"model", "model_kwargs", ...}). `segjax convert` writes one; training writes
them inside its CheckpointManager steps; `--checkpoint` accepts one, or a workdir (its best step).
"""
from __future__ import annotations

import json
import os

import jax
import numpy as np

from segjax.errors import SegjaxError

META = "segjax.json"


def save_variables(out_dir: str, variables, meta: dict) -> None:
    import orbax.checkpoint as ocp

    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(out_dir, "variables"), jax.tree_util.tree_map(np.asarray, variables), force=True)
        ckptr.wait_until_finished()
    tmp = os.path.join(out_dir, META + ".tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=2, default=str)
    os.replace(tmp, os.path.join(out_dir, META))


def load_variables(path: str):
    """Returns (variables, meta) from a variables checkpoint directory."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    meta_path = os.path.join(path, META)
    if not os.path.isfile(meta_path):
        raise SegjaxError(f"{path}: not a segjax checkpoint (no {META}); pass a workdir or a checkpoint directory")
    with open(meta_path) as f:
        meta = json.load(f)
    with ocp.StandardCheckpointer() as ckptr:
        variables = ckptr.restore(os.path.join(path, "variables"))
    return variables, meta
