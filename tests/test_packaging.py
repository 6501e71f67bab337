"""A wheel (not the editable install) carries the recipes and every verb: built, installed into a fresh venv,
and run from there (help of every verb, training the default recipe, exporting the checkpoint).

The fresh venv sees this environment's installed packages only through links, and only those that the wheel's
own `Requires-Dist` (followed through each dependency's requirements) names. So the venv has what
`pip install segjax` (no extras) would give it: a dependency the code needs but the wheel's metadata omits
fails here, and so does an extra's package the code imports unguarded. Linking works the same from a
virtualenv, a conda-style environment or the system interpreter, unlike `--system-site-packages`, which
exposes the base interpreter's packages and not an enclosing venv's.
"""
import email.parser
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = ["--config.model_kwargs={\"base_channels\": 4, \"bilinear\": true}",
        "--config.data_options={\"image_size\": 24, \"num_train\": 16, \"num_val\": 8}",
        "--config.base_size=24", "--config.crop_size=16", "--config.batch_size=4", "--config.eval_batch_size=8",
        "--config.num_steps=20", "--config.eval_every_steps=20", "--config.log_every_steps=10"]
VERBS = ["train", "eval", "predict", "export", "inspect", "convert", "data"]
DATA_VERBS = ["prepare", "check"]


def run(cmd, cwd, env, timeout=600, status=0):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == status, f"{cmd}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


# ------------------------------------------------------------------------ the wheel's dependency closure

def _wheel_requirements(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as zf:
        (meta,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        return email.parser.Parser().parsestr(zf.read(meta).decode()).get_all("Requires-Dist") or []


def _wanted(requirement: str, extras: frozenset) -> Requirement | None:
    """The requirement, when its marker holds for this interpreter and one of the requested extras."""
    req = Requirement(requirement)
    if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in ("", *extras)):
        return req
    return None


def dependency_closure(requirements: list[str]) -> list[importlib.metadata.Distribution]:
    """The installed distributions that `requirements` pull in, transitively, with their requested extras."""
    found, todo = {}, [(r, frozenset()) for r in requirements]
    while todo:
        requirement, extras = todo.pop()
        req = _wanted(requirement, extras)
        if req is None:
            continue
        name = canonicalize_name(req.name)
        try:
            dist = importlib.metadata.distribution(req.name)
        except importlib.metadata.PackageNotFoundError:
            pytest.fail(f"{req.name} (required through the wheel's metadata) is not installed in this environment")
        seen_extras = found.get(name, (None, None))[1]
        wanted_extras = frozenset(canonicalize_name(e) for e in req.extras)
        if seen_extras is not None and wanted_extras <= seen_extras:
            continue
        all_extras = wanted_extras | (seen_extras or frozenset())
        found[name] = (dist, all_extras)
        todo += [(r, all_extras) for r in dist.requires or []]
    return [dist for dist, _ in found.values()]


def _is_namespace_dir(path: Path) -> bool:
    """A folder that several distributions may fill (a namespace package such as google/), linked file by file."""
    return path.is_dir() and not path.is_symlink() and not (path / "__init__.py").exists() \
        and not path.name.endswith((".dist-info", ".egg-info", ".libs", ".data"))


def link_distribution(dist: importlib.metadata.Distribution, site: Path) -> int:
    """Symlink the files and folders of `dist` into `site`; folders shared with other distributions are
    recreated so that only this distribution's part of them shows. Returns the number of links made."""
    base = Path(dist.locate_file(""))
    files = dist.files
    if files is None:  # no RECORD: its top-level modules and its metadata folder
        top = (dist.read_text("top_level.txt") or "").split()
        files = [Path(t) for t in top] + [Path(dist._path.name)]
    links = 0
    for rel in files:
        parts = Path(rel).parts
        if not parts or parts[0] == ".." or parts[0] == "__pycache__":
            continue  # console scripts and the like live outside site-packages
        depth = 1
        while depth < len(parts) and _is_namespace_dir(base.joinpath(*parts[:depth])):
            depth += 1
        source, target = base.joinpath(*parts[:depth]), site.joinpath(*parts[:depth])
        if target.exists() or target.is_symlink() or not source.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(source)
        links += 1
    return links


def _venv_site_packages(venv: Path) -> Path:
    out = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                         capture_output=True, text=True, check=True).stdout.strip()
    return Path(out)


# ----------------------------------------------------------------------------------------------- test

@pytest.mark.e2e
def test_a_wheel_installed_into_a_fresh_venv_runs_every_verb(tmp_path):
    # Build from a copy of what the wheel is made of, so the build writes nothing into the checkout.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    shutil.copytree(os.path.join(ROOT, "segjax"), src / "segjax", ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(PYTHONNOUSERSITE="1", JAX_PLATFORMS="cpu", PIP_DISABLE_PIP_VERSION_CHECK="1",
               SEGJAX_DATA_DIR=str(tmp_path / "data"))
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"),
         str(src)], tmp_path, env)
    (wheel,) = (tmp_path / "dist").glob("segjax-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "segjax/configs/synthetic_unet.py" in names and "segjax/configs/__init__.py" in names

    # A venv with no site-packages but its own; the wheel goes in, then the links to its dependencies.
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path, env)
    python, segjax = str(venv / "bin" / "python"), str(venv / "bin" / "segjax")
    run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", str(wheel)],
        tmp_path, env)
    site = _venv_site_packages(venv)
    assert site != Path(sysconfig.get_path("purelib"))
    requirements = _wheel_requirements(wheel)
    closure = dependency_closure(requirements)
    names_linked = {canonicalize_name(d.metadata["Name"]) for d in closure}
    assert "segjax" not in names_linked and "jax" in names_linked and "ml-collections" in names_linked
    assert sum(link_distribution(d, site) for d in closure) > 0

    # What the venv sees: the wheel's segjax, the core dependencies (flatbuffers among them, through the
    # wheel's metadata), and no extra's package.
    probe = ("import importlib.metadata as m, importlib.util as u, json, segjax.config as c\n"
             "print(json.dumps({'files': [c.__file__, c.CONFIG_DIR], 'requires': m.requires('segjax'),\n"
             "  'found': {n: u.find_spec(n) is not None for n in ('flatbuffers', 'jax2onnx', 'onnxruntime', 'torch',"
             " 'pytest')}}))")
    seen = json.loads(run([python, "-c", probe], tmp_path, env).stdout)
    assert all(p.startswith(str(venv)) for p in seen["files"]), seen  # the wheel's copy, not the editable checkout
    assert any(canonicalize_name(Requirement(r).name) == "flatbuffers" for r in seen["requires"]), seen["requires"]
    assert seen["found"] == {"flatbuffers": True, "jax2onnx": False, "onnxruntime": False, "torch": False,
                             "pytest": False}, seen["found"]

    # Every verb's help.
    usage = run([segjax, "--help"], tmp_path, env).stdout
    assert "usage: segjax" in usage and all(v in usage for v in VERBS), usage
    for argv in [[v] for v in VERBS] + [["data", v] for v in DATA_VERBS]:
        out = run([segjax, *argv, "--help"], tmp_path, env).stdout
        assert out.startswith(f"usage: segjax {' '.join(argv)}"), (argv, out[:300])

    # Train the default recipe (tiny), then export its checkpoint: StableHLO needs no extra.
    workdir = tmp_path / "run"
    out = run([segjax, "train", "--workdir", str(workdir), *TINY], tmp_path, env).stdout
    assert "synthetic_unet: step 20" in out, out
    assert os.path.isdir(workdir / "checkpoints" / "20")
    assert json.loads((workdir / "config.json").read_text())["name"] == "synthetic_unet"

    onnx_out = tmp_path / "exported_onnx"
    refused = run([segjax, "export", "--checkpoint", str(workdir), "--onnx", str(onnx_out)], tmp_path, env, status=2)
    assert refused.stderr.startswith("error: ") and refused.stderr.count("\n") == 1, refused.stderr
    assert 'pip install "segjax[export]"' in refused.stderr and not onnx_out.exists()

    exported = tmp_path / "exported"
    out = run([segjax, "export", "--checkpoint", str(workdir), str(exported)], tmp_path, env).stdout
    assert sorted(os.listdir(exported)) == ["model.json", "model.stablehlo"], out
    manifest = json.loads((exported / "model.json").read_text())
    assert manifest["model"] == "unet" and manifest["num_classes"] == 5 and manifest["onnx"] is None, manifest

    # The artifact runs with jax alone, at a size other than the example's, in the same venv.
    call = ("import jax, numpy as np\n"
            f"exp = jax.export.deserialize(open({str(exported / 'model.stablehlo')!r}, 'rb').read())\n"
            "y = np.asarray(exp.call(np.random.default_rng(0).normal(size=(2, 48, 80, 3)).astype(np.float32)))\n"
            "print(y.shape, bool(np.isfinite(y).all()))")
    assert run([python, "-c", call], tmp_path, env).stdout.split("\n")[0] == "(2, 48, 80, 5) True"
