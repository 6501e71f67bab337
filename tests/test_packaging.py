"""A wheel (not the editable install) carries the recipes: built, installed into a fresh venv, and trained from.

The venv reuses this environment's site-packages for the dependencies (`--system-site-packages`), so only
segjax itself comes from the wheel; the test checks that the venv imports the wheel's copy, not the
editable checkout that is also visible through those site-packages.
"""
import json
import os
import shutil
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = ["--config.model_kwargs={\"base_channels\": 4, \"bilinear\": true}",
        "--config.data_options={\"image_size\": 24, \"num_train\": 16, \"num_val\": 8}",
        "--config.base_size=24", "--config.crop_size=16", "--config.batch_size=4", "--config.eval_batch_size=8",
        "--config.num_steps=20", "--config.eval_every_steps=20", "--config.log_every_steps=10"]


def run(cmd, cwd, env, timeout=600):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_a_wheel_installed_into_a_fresh_venv_trains_the_default_recipe(tmp_path):
    # Build from a copy of what the wheel is made of, so the build writes nothing into the checkout.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    shutil.copytree(os.path.join(ROOT, "segjax"), src / "segjax", ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(PYTHONNOUSERSITE="1", JAX_PLATFORMS="cpu", PIP_DISABLE_PIP_VERSION_CHECK="1",
               SEGJAX_DATA_DIR=str(tmp_path / "data"))
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"),
         str(src)], tmp_path, env)
    (wheel,) = (tmp_path / "dist").glob("segjax-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "segjax/configs/synthetic_unet.py" in names and "segjax/configs/__init__.py" in names

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], tmp_path, env)
    python = venv / "bin" / "python"
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
         str(wheel)], tmp_path, env)
    where = run([str(python), "-c", "import segjax.config as c; print(c.__file__); print(c.CONFIG_DIR)"],
                tmp_path, env).split()
    assert all(p.startswith(str(venv)) for p in where), where  # the wheel's copy, not the editable checkout

    workdir = tmp_path / "run"
    out = run([str(venv / "bin" / "segjax"), "train", "--workdir", str(workdir), *TINY], tmp_path, env)
    assert "synthetic_unet: step 20" in out, out
    assert os.path.isdir(workdir / "checkpoints" / "20")
    assert json.load(open(workdir / "config.json"))["name"] == "synthetic_unet"
