"""Every script under experiments/ prints its help and exits 0 (imports only: nothing is compiled or run)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p.name for p in (ROOT / "experiments").iterdir() if p.suffix in (".py", ".sh"))


def test_the_scripts_are_found():
    assert {"benchmark.py", "bench_table.py", "gpu_suite.sh"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script, tmp_path):
    path = ROOT / "experiments" / script
    runner = ["bash"] if script.endswith(".sh") else [sys.executable]
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    proc = subprocess.run([*runner, str(path), "--help"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    if script.endswith(".py"):
        assert proc.stdout.startswith(f"usage: {script} [-h]"), proc.stdout[:300]
        assert "--help" in proc.stdout
    else:
        assert f"experiments/{script}" in proc.stdout and "--dry-run" in proc.stdout, proc.stdout[:300]
    assert list(tmp_path.iterdir()) == []  # printing the help writes nothing
