"""The bad-input matrix, through the CLI: each bad input is exit status 2 and exactly one stderr line
`error: ...` naming the culprit and the fix, with nothing written or overwritten. In-process
`cli.main` for the table; real subprocesses where a process-wide setting is needed (device count)
and to show no traceback reaches the terminal."""
import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from segjax import checkpoint, cli
from tests import tiny_model
from tests.test_data_fixtures import H, W, add_member, break_voc, image_array, make_archive, write_voc

TINY = ["--config.model=" + tiny_model.NAME, "--config.model_kwargs={\"features\": 4}",
        "--config.data_options={\"image_size\": 24, \"num_train\": 8, \"num_val\": 4}",
        "--config.base_size=24", "--config.crop_size=16", "--config.batch_size=4", "--config.eval_batch_size=4",
        "--config.num_steps=2", "--config.eval_every_steps=2", "--config.log_every_steps=1",
        "--config.num_classes=5"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(argv):
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        rc = cli.main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def one_error_line(rc, stderr) -> str:
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.startswith("error:")]
    assert rc == 2, stderr[-2000:]
    assert len(lines) == 1, stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-2000:]
    return lines[0]


def tree_digest(path) -> dict:
    """{relative path: md5} of every file under path (empty when it doesn't exist)."""
    out = {}
    for d, _, files in os.walk(path):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, path)] = hashlib.md5(open(p, "rb").read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A trained tiny workdir (5 classes), the synthetic data it used, and a converted 3-class checkpoint."""
    root = tmp_path_factory.mktemp("bad")
    data_dir, workdir = root / "data", root / "run"
    rc, _, err = run_cli(["train", "--workdir", workdir, f"--config.data_dir={data_dir}", *TINY])
    assert rc == 0, err[-2000:]
    model = tiny_model._build(3, features=4)
    import jax
    variables = model.init(jax.random.PRNGKey(0), np.zeros((1, 8, 8, 3), np.float32))
    three = root / "three_classes"
    checkpoint.save_variables(str(three), variables, {"model": tiny_model.NAME, "model_kwargs": {"features": 4},
                                                      "num_classes": 3})
    return {"root": root, "data": data_dir, "workdir": workdir, "three": three}


# ------------------------------------------------------------------------------------- the table
# Each case: (id, build(env, tmp) -> (argv, paths that must stay untouched), message regex, culprit).

def _recipe(tmp, body):
    path = tmp / "recipe.py"
    path.write_text("from segjax.config import base_config\n\n\ndef get_config():\n    c = base_config()\n"
                    + "".join(f"    {line}\n" for line in body) + "    return c\n")
    return path


def config_unknown_key(env, tmp):
    return ["train", "--config", _recipe(tmp, ["c.batch_sise = 8"]), "--workdir", tmp / "w"], [tmp / "w"]


def config_wrong_type(env, tmp):
    return ["train", "--config", _recipe(tmp, ["c.batch_size = '8'"]), "--workdir", tmp / "w"], [tmp / "w"]


def override_unknown_key(env, tmp):
    return ["train", "--workdir", tmp / "w", "--config.crop_sise=8"], [tmp / "w"]


def override_wrong_type(env, tmp):
    return ["train", "--workdir", tmp / "w", "--config.crop_size=big"], [tmp / "w"]


def crop_too_large(env, tmp):
    return ["train", "--workdir", tmp / "w", *TINY, "--config.crop_size=100"], [tmp / "w"]


def crop_not_positive(env, tmp):
    return ["train", "--workdir", tmp / "w", *TINY, "--config.crop_size=0"], [tmp / "w"]


def num_classes_below_data_set(env, tmp):
    return ["train", "--workdir", tmp / "w", *TINY, f"--config.data_dir={env['data']}", "--config.num_classes=3"], []


def resume_with_other_num_classes(env, tmp):
    return (["train", "--workdir", env["workdir"], *TINY, f"--config.data_dir={env['data']}", "--config.num_classes=7",
             "--config.num_steps=4"], [env["workdir"]])


def init_checkpoint_other_num_classes(env, tmp):
    return (["train", "--workdir", tmp / "w", *TINY, f"--config.data_dir={env['data']}", "--config.num_classes=7",
             f"--config.init_checkpoint={env['workdir']}"], [env["workdir"]])


def eval_checkpoint_with_fewer_classes(env, tmp):
    return ["eval", "--checkpoint", env["three"], "--dataset", "synthetic", "--data-dir", env["data"]], [env["three"]]


def predict_checkpoint_of_another_model(env, tmp):
    lying = tmp / "lying"
    shutil.copytree(env["three"], lying)
    meta = json.loads((lying / "segjax.json").read_text())
    (lying / "segjax.json").write_text(json.dumps({**meta, "num_classes": 5}))
    image = tmp / "a.png"
    Image.fromarray(image_array(0)).save(image)
    return ["predict", "--checkpoint", lying, image, "--out", tmp / "out"], [tmp / "out", lying]


def _resnet18_pth(tmp, edit):
    torch.manual_seed(0)
    sd = torchvision.models.resnet18(weights=None, num_classes=10).state_dict()
    edit(sd)
    path = tmp / "resnet18.pth"
    torch.save(sd, path)
    return path


def convert_missing_and_unexpected_keys(env, tmp):
    def edit(sd):
        del sd["layer2.0.downsample.1.running_mean"]
        sd["layer5.0.conv1.weight"] = torch.zeros(8, 8, 3, 3)
    return ["convert", "resnet18", _resnet18_pth(tmp, edit), tmp / "out"], [tmp / "out"]


class CreatesFileWhenUnpickled:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def convert_malicious_pickle(env, tmp):
    weights = tmp / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "payload": CreatesFileWhenUnpickled(str(tmp / "pwned"))}, weights)
    return ["convert", "resnet18", weights, tmp / "out"], [tmp / "out", tmp / "pwned"]


def workdir_under_a_file(env, tmp):
    (tmp / "file").write_text("not a folder")
    return ["train", "--workdir", tmp / "file" / "w", *TINY, f"--config.data_dir={env['data']}"], [tmp / "file"]


def _images(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(names):
        Image.fromarray(image_array(k)).save(folder / name)


def predict_folder_with_a_text_file(env, tmp):
    _images(tmp / "in", ["a.png", "b.jpg"])
    (tmp / "in" / "notes.txt").write_text("not an image")
    return ["predict", "--checkpoint", env["workdir"], tmp / "in", "--out", tmp / "out"], [tmp / "out", tmp / "in"]


def predict_glob_with_a_text_file(env, tmp):
    _images(tmp / "in", ["a.png"])
    (tmp / "in" / "notes.txt").write_text("not an image")
    return (["predict", "--checkpoint", env["workdir"], tmp / "in" / "a.png", tmp / "in" / "notes.txt", "--out",
             tmp / "out"], [tmp / "out", tmp / "in"])


def predict_out_is_the_input_folder(env, tmp):
    _images(tmp / "in", ["a.png"])
    return ["predict", "--checkpoint", env["workdir"], tmp / "in" / "a.png", "--out", tmp / "in"], [tmp / "in"]


def predict_input_inside_out_with_colliding_name(env, tmp):
    _images(tmp / "in", ["a.jpg"])
    _images(tmp / "out", ["a_overlay.jpg"])
    return (["predict", "--checkpoint", env["workdir"], tmp / "in" / "a.jpg", tmp / "out" / "a_overlay.jpg",
             "--out", tmp / "out"], [tmp / "out", tmp / "in"])


def predict_out_is_a_file(env, tmp):
    _images(tmp / "in", ["a.png"])
    (tmp / "out").write_text("a file")
    return ["predict", "--checkpoint", env["workdir"], tmp / "in" / "a.png", "--out", tmp / "out"], [tmp / "in"]


def _voc(tmp, what=None):
    manual = tmp / "manual"
    write_voc(str(manual), ["2007_000001", "2007_000002", "2007_000003"], ["2007_000010"])
    if what:
        break_voc(manual, what)
    return ["data", "prepare", "voc2012", "--manual-dir", manual, "--data-dir", tmp / "d"], [manual]


def _folder(tmp, stray=False, value_map=True):
    root = tmp / "m"
    _images(root / "imgs", ["cat0.png", "cat1.png"])
    (root / "labels").mkdir()
    for name in ("cat0.png", "cat1.png"):
        m = np.zeros((H, W), np.uint8)
        m[4:, :] = 255
        Image.fromarray(m).save(root / "labels" / name)
    if stray:
        (root / "imgs" / "notes.txt").write_text("not an image")
    manifest = {"name": "cats", "class_names": ["background", "cat"],
                "splits": {"train": {"images": "imgs/*", "masks": "labels/{id}"}}}
    if value_map:
        manifest["value_map"] = {"255": 1}
    (tmp / "cats.json").write_text(json.dumps(manifest))
    return (["data", "prepare", "folder", "--manifest", tmp / "cats.json", "--manual-dir", root, "--data-dir", tmp / "d"],
            [root])


def voc_manual_dir_without_folders_or_archives(env, tmp):
    (tmp / "manual").mkdir()
    (tmp / "manual" / "readme.txt").write_text("not VOC")
    return ["data", "prepare", "voc2012", "--manual-dir", tmp / "manual", "--data-dir", tmp / "d"], [tmp / "manual"]


def voc_malicious_archive(env, tmp):
    argv, _ = _voc(tmp)
    (tmp / "archives").mkdir()
    tar = str(tmp / "archives" / "VOCtrainval_11-May-2012.tar")
    make_archive(str(tmp / "manual"), "VOCdevkit", tar)
    add_member(tar, "VOCdevkit/VOC2012/../../../escaped.txt", b"owned")
    return (["data", "prepare", "voc2012", "--manual-dir", tmp / "archives", "--data-dir", tmp / "d"],
            [tmp / "archives", tmp / "escaped.txt", tmp.parent / "escaped.txt"])


CASES = [
    ("config file: unknown key", config_unknown_key, r"recipe\.py: unknown key 'batch_sise' \(did you mean 'batch_size'\?\)", "recipe.py"),
    ("config file: wrong type", config_wrong_type, r"recipe\.py: batch_size='8' is a str, expected int", "recipe.py"),
    ("override: unknown key", override_unknown_key, r"--config\.crop_sise: unknown key 'crop_sise'; known: .*crop_size", "crop_sise"),
    ("override: wrong type", override_wrong_type, r"--config\.crop_size=big: expected an integer", "crop_size=big"),
    ("crop larger than base_size x max scale", crop_too_large,
     r"config\.crop_size=100: larger than .* 24 x 1\.1 = 26\.4, .*padding; use --config\.crop_size <= 26", "crop_size=100"),
    ("crop not positive", crop_not_positive, r"config\.crop_size=0: must be positive; pass --config\.crop_size", "crop_size=0"),
    ("num_classes below the data set's", num_classes_below_data_set,
     r"config\.num_classes=3 but data set 'synthetic' has 5 classes .*use --config\.num_classes=5", "num_classes=3"),
    ("resume with another num_classes", resume_with_other_num_classes,
     r"holds a run with num_classes=5, not 7; use another --workdir", "run"),
    ("init_checkpoint with another num_classes", init_checkpoint_other_num_classes,
     r"init_checkpoint=.* \(model=tiny_seg_test, num_classes=5\) for model=tiny_seg_test, num_classes=7 does not fit: "
     r".*shape mismatches, e\.g\. .* \(5,\) vs \(7,\)", "init_checkpoint"),
    ("eval: checkpoint with fewer classes than the data", eval_checkpoint_with_fewer_classes,
     r"three_classes: the checkpoint predicts 3 classes but data set 'synthetic' has 5; .*--dataset", "three_classes"),
    ("predict: checkpoint meta of another model", predict_checkpoint_of_another_model,
     r"lying \(saved as model=tiny_seg_test, num_classes=5\) does not fit: .*\(3,\) vs \(5,\)", "lying"),
    ("convert: missing and unexpected keys", convert_missing_and_unexpected_keys,
     r"missing 1: batch_stats/layer2/0/downsample/1/mean; unexpected 1: params/layer5/0/conv1/kernel", "resnet18"),
    ("convert: malicious pickle", convert_malicious_pickle,
     r"evil\.pth: not a plain weights file \(it pickles io\.open, which is never loaded\); save it with "
     r"torch\.save\(model\.state_dict\(\), path\)$", "evil.pth"),
    ("workdir under a regular file", workdir_under_a_file,
     r"file/w: cannot write there \(a path component is a file, not a folder\); .*pick another --workdir", "file/w"),
    ("predict: folder with a .txt", predict_folder_with_a_text_file,
     r"notes\.txt: not an image file PIL can read; remove it", "in/notes.txt"),
    ("predict: glob with a .txt", predict_glob_with_a_text_file, r"notes\.txt: not an image file PIL can read", "notes.txt"),
    ("predict: --out is the input's folder", predict_out_is_the_input_folder,
     r"a\.png would overwrite the input image; pass another --out", "a.png"),
    ("predict: input inside --out with a colliding name", predict_input_inside_out_with_colliding_name,
     r"a_overlay\.jpg would overwrite the input image; pass another --out", "a_overlay.jpg"),
    ("predict: --out is a file", predict_out_is_a_file, r"--out must be a directory, and this is a file", "out"),
    ("voc: file listed but missing", lambda env, tmp: _voc(tmp, "missing"), r"listed in .* but missing; restore", "2007_000002.jpg"),
    ("voc: empty split", lambda env, tmp: _voc(tmp, "empty"), r"empty split; list one image id per line", "val.txt"),
    ("voc: mask size differs", lambda env, tmp: _voc(tmp, "size"), r"mask is 16x14 but image .* is 16x12", "2007_000001.png"),
    ("voc: labels outside the classes", lambda env, tmp: _voc(tmp, "labels"),
     r"labels \[40\] outside \[0, 21\) and 255 \(void\); fix the mask", "2007_000001.png"),
    ("voc: RGB colour mask", lambda env, tmp: _voc(tmp, "rgb"), r"RGB colour mask where class indices", "2007_000001.png"),
    ("voc: truncated image", lambda env, tmp: _voc(tmp, "truncated"), r"corrupt or truncated image", "2007_000003.jpg"),
    ("voc: manual dir with neither folders nor archives", voc_manual_dir_without_folders_or_archives,
     r"manual dir has neither the folders nor the archives; it needs", "manual"),
    ("voc: archive member escaping its folder", voc_malicious_archive,
     r"member '.*escaped\.txt' points outside the archive; refusing", "VOCtrainval_11-May-2012.tar"),
    ("folder: 0/255 binary masks without a value map", lambda env, tmp: _folder(tmp, value_map=False),
     r"only 0 and 255, and 255 means void.*value mapping \{255: 1\}", "cat0.png"),
    ("folder: stray non-image file", lambda env, tmp: _folder(tmp, stray=True),
     r"notes\.txt: mask for image .*notes\.txt is missing; add it or remove the image", "notes.txt"),
]


@pytest.mark.parametrize("build, message, culprit", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_naming_the_culprit_and_the_fix(env, tmp_path, build, message, culprit):
    argv, keep = build(env, tmp_path)
    before = {str(p): tree_digest(p) if os.path.isdir(p) else os.path.exists(p) for p in keep}
    rc, _, err = run_cli(argv)
    line = one_error_line(rc, err)
    assert re.search(message, line), line
    assert culprit in line, line
    after = {str(p): tree_digest(p) if os.path.isdir(p) else os.path.exists(p) for p in keep}
    assert after == before  # nothing created, removed or changed
    built = [f for _, _, fs in os.walk(tmp_path / "d") for f in fs if f == "dataset_info.json"]
    assert not built  # a failed `data prepare` leaves no data set that looks prepared (tfds may keep its .config/)


# ------------------------------------------------------------------------------------- subprocesses

def assert_read_only_refused(rc, err, workdir, before) -> None:
    """A training run on a read-only workdir: one error line naming it, and the step-2 checkpoint unchanged."""
    line = one_error_line(rc, err)
    assert line == (f"error: {workdir}: cannot write there (read-only file system); make it writable or "
                    "pick another --workdir"), line
    assert tree_digest(workdir / "checkpoints") == before
    variables, meta = checkpoint.load_variables(str(workdir / "checkpoints" / "2"))
    assert meta["num_classes"] == 5 and "params" in variables


def _subprocess(argv, extra_env=None, timeout=300):
    env = dict(os.environ, **(extra_env or {}))
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    code = ("import sys; from tests import tiny_model; from segjax import cli; "
            "sys.exit(cli.main(sys.argv[1:]))")
    return subprocess.run([sys.executable, "-c", code, *map(str, argv)], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=timeout)


@pytest.mark.e2e  # a `segjax` run (subprocess or resumed training)
def test_batch_size_not_divisible_by_three_devices(env, tmp_path):
    proc = _subprocess(["train", "--workdir", tmp_path / "w", *TINY, f"--config.data_dir={env['data']}"],
                       {"XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=3",
                        "JAX_PLATFORMS": "cpu"})
    line = one_error_line(proc.returncode, proc.stderr)
    assert line == ("error: config.batch_size=4: the global batch must be a multiple of the 3 devices; "
                    "use --config.batch_size=3 or 6"), line
    assert not (tmp_path / "w").exists()


def _mount_tmpfs(path, size) -> bool:
    path.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.mark.e2e  # a `segjax` run (subprocess or resumed training)
def test_workdir_on_a_full_or_read_only_disk_keeps_its_checkpoint(env, tmp_path):
    """A real tmpfs (when this process may mount): first filled up to 60 KiB, then remounted read-only.
    Resuming must fail with one line naming the workdir; the step-2 checkpoint stays byte-identical."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "1m"):
        pytest.skip("mounting a tmpfs is not permitted; test_workdir_full_or_read_only_by_injection covers both cases")
    try:
        workdir = disk / "w"
        shutil.copytree(env["workdir"], workdir)
        free = shutil.disk_usage(disk).free
        with open(disk / "filler", "wb") as f:
            f.write(b"\0" * (free - 60 * 1024))
        before = tree_digest(workdir / "checkpoints")
        argv = ["train", "--workdir", workdir, *TINY, f"--config.data_dir={env['data']}", "--config.num_steps=4"]
        proc = _subprocess(argv)  # a real process: proves no traceback from Orbax/tensorboardX threads or exit hooks
        line = one_error_line(proc.returncode, proc.stderr)
        assert line.startswith(f"error: {workdir}: no space for the checkpoint of step 4"), line
        assert "free some space or pick another --workdir" in line
        assert tree_digest(workdir / "checkpoints") == before

        os.remove(disk / "filler")
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        rc, _, err = run_cli(argv)
        assert_read_only_refused(rc, err, workdir, before)
    finally:
        subprocess.run(["umount", str(disk)])


@pytest.mark.e2e  # a `segjax` run (subprocess or resumed training)
def test_workdir_full_or_read_only_by_injection(env, tmp_path, monkeypatch):
    """The same two cases wherever mounting is not allowed, as the training process sees them: the checkpoint
    writer's free-space query reports 60 KiB on the workdir's disk; then every write under the workdir
    fails with EROFS, as on a read-only mount. Resuming fails with one line naming the workdir, and the
    step-2 checkpoint stays byte-identical and loadable."""
    import builtins
    import errno

    workdir = tmp_path / "w"
    shutil.copytree(env["workdir"], workdir)
    before = tree_digest(workdir / "checkpoints")
    argv = ["train", "--workdir", workdir, *TINY, f"--config.data_dir={env['data']}", "--config.num_steps=4"]

    def under_workdir(path) -> bool:
        return os.path.abspath(os.fspath(path)).startswith(str(workdir))

    with monkeypatch.context() as patch:
        real_usage = shutil.disk_usage
        patch.setattr(shutil, "disk_usage",
                      lambda path: real_usage(path)._replace(free=60 * 1024) if under_workdir(path) else real_usage(path))
        rc, _, err = run_cli(argv)
    line = one_error_line(rc, err)
    assert line.startswith(f"error: {workdir}: no space for the checkpoint of step 4"), line
    assert "free some space or pick another --workdir" in line
    assert tree_digest(workdir / "checkpoints") == before

    def refused(path):
        return OSError(errno.EROFS, "Read-only file system", os.fspath(path))

    real_open, real_mkdir = builtins.open, os.mkdir

    def read_only_open(file, mode="r", *a, **k):
        if isinstance(file, (str, os.PathLike)) and set(mode) & set("wax+") and under_workdir(file):
            raise refused(file)
        return real_open(file, mode, *a, **k)

    def read_only_mkdir(path, *a, **k):
        if under_workdir(path):
            raise refused(path)
        return real_mkdir(path, *a, **k)

    with monkeypatch.context() as patch:
        patch.setattr(builtins, "open", read_only_open)
        patch.setattr(os, "mkdir", read_only_mkdir)
        rc, _, err = run_cli(argv)
    assert_read_only_refused(rc, err, workdir, before)


def test_injected_enospc_mid_write_becomes_one_line(tmp_path):
    """Where no disk can be filled: an ENOSPC raised (as the OS would) inside the write path of `segjax convert`."""
    from segjax import checkpoint as ck

    torch.manual_seed(0)
    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None, num_classes=10).state_dict(), weights)

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    original = ck.save_variables
    ck.save_variables = full
    try:
        rc, _, err = run_cli(["convert", "resnet18", weights, tmp_path / "out"])
    finally:
        ck.save_variables = original
    line = one_error_line(rc, err)
    assert line == (f"error: {tmp_path / 'out'}: cannot write there (no space left on the device); free some space "
                    "or pick another output directory"), line


def test_errors_not_about_the_disk_keep_their_traceback(tmp_path):
    """writes_to converts only the OS refusing a write under its directory: other errors are real bugs."""
    from segjax.errors import SegjaxError, writes_to

    with pytest.raises(KeyError):
        with writes_to(str(tmp_path), "--workdir"):
            raise KeyError("a bug")
    with pytest.raises(PermissionError):  # a refused path elsewhere is not the workdir's fault
        with writes_to(str(tmp_path / "w"), "--workdir"):
            raise PermissionError(13, "Permission denied", "/etc/other")
    with pytest.raises(SegjaxError, match="read-only file system"):
        with writes_to(str(tmp_path / "w"), "--workdir"):
            raise OSError(30, "Read-only file system", str(tmp_path / "w" / "config.json"))


@pytest.mark.e2e  # a `segjax` run (subprocess or resumed training)
def test_malicious_pickle_through_the_cli_prints_no_traceback_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    weights = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "payload": CreatesFileWhenUnpickled(str(marker))}, weights)
    proc = _subprocess(["convert", "resnet18", weights, tmp_path / "out"])
    line = one_error_line(proc.returncode, proc.stderr)
    assert "evil.pth: not a plain weights file" in line
    assert not marker.exists() and not (tmp_path / "out").exists()
