"""The README's pmap example runs as written, on two host devices: the pure step under `jax.pmap`
with cross-replica BatchNorm, gradients averaged and evaluation counts summed over the devices."""
import os
import re
import subprocess
import sys

import pytest

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


@pytest.mark.e2e
def test_the_readme_pmap_example_runs_on_two_devices(tmp_path):
    text = open(README).read()
    code = re.search(r"<!-- pmap-example -->\n```python\n(.*?)```", text, re.S)[1]
    env = {**os.environ, "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    loss, pixels = proc.stdout.split()[-2:]
    assert 0 < float(loss) < 10
    assert int(pixels) == 2 * 2 * 64 * 64  # psum over both devices: each holds 2 images of 64x64
