"""`segjax train | eval | predict` end to end on tiny data (in-process with a tiny registered model), and
one real subprocess for the one-line error on a bad override."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from segjax import cli
from tests import tiny_model

pytestmark = pytest.mark.e2e  # a trained workdir through `segjax train`, then eval / predict / export

TINY = ["--config.model=" + tiny_model.NAME, "--config.model_kwargs={\"features\": 4}",
        "--config.data_options={\"image_size\": 24, \"num_train\": 16, \"num_val\": 8}",
        "--config.base_size=24", "--config.crop_size=16", "--config.batch_size=4", "--config.eval_batch_size=8",
        "--config.num_steps=4", "--config.eval_every_steps=2", "--config.log_every_steps=1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    workdir = root / "run"
    rc = cli.main(["train", "--workdir", str(workdir), f"--config.data_dir={root / 'data'}", *TINY])
    return rc, root, workdir


def test_train_writes_metrics_events_plots_and_checkpoints(trained, capsys):
    rc, root, workdir = trained
    assert rc == 0
    records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    train = [r for r in records if r["split"] == "train"]
    evals = [r for r in records if r["split"] == "eval"]
    assert [r["step"] for r in train] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in train)
    assert {"lr", "images_per_s", "grad_norm"} <= set(train[0])
    assert [r["step"] for r in evals] == [2, 4] and len(evals[-1]["iou"]) == 5
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir / "tensorboard"))
    for png in ("loss.png", "lr.png", "miou.png", "class_iou.png"):
        with Image.open(workdir / png) as im:
            assert im.size[0] > 100
    assert json.load(open(workdir / "config.json"))["num_steps"] == 4
    best = max(evals, key=lambda r: (r["miou"], r["step"]))["step"]
    assert sorted(os.listdir(workdir / "checkpoints")) == sorted({"4", str(best)})  # latest 1 + best


def test_each_eval_writes_a_grid_of_the_same_validation_samples(trained):
    from segjax import samples
    rc, root, workdir = trained
    assert sorted(os.listdir(workdir / "samples")) == ["step_2.png", "step_4.png"]
    first, last = (np.asarray(Image.open(workdir / "samples" / f"step_{s}.png").convert("RGB")) for s in (2, 4))
    cell = 24 * 8  # 24x24 validation images, each tile enlarged 8x to reach samples.MIN_TILE
    assert first.shape == last.shape and first.shape[1] == 2 * samples.PAD + 3 * (cell + samples.GAP) + samples.SCORE_W
    assert first.shape[0] > samples.PAD + samples.TITLE_H + 4 * cell + 3 * samples.GAP  # 4 rows, then the legend
    palette = {tuple(c) for c in samples._palette()[[0, 1, 2, 3, 4, 255]]}
    for row in range(4):
        (xi, y), (xt, _) = (samples.cell_origin(row, column, cell, cell) for column in (0, 1))
        np.testing.assert_array_equal(first[y:y + cell, xi:xi + cell], last[y:y + cell, xi:xi + cell])  # same image
        truth = first[y:y + cell, xt:xt + cell]
        np.testing.assert_array_equal(truth, last[y:y + cell, xt:xt + cell])
        np.testing.assert_array_equal(truth, np.repeat(np.repeat(truth[::8, ::8], 8, 0), 8, 1))  # nearest neighbour
        assert {tuple(c) for c in truth.reshape(-1, 3)} <= palette
    assert not np.array_equal(first[:samples.PAD + samples.LINE], last[:samples.PAD + samples.LINE])  # the step
    assert [step for step, tag in tensorboard_images(workdir / "tensorboard")] == [2, 4]


def tensorboard_images(folder):
    """(step, tag) of every image summary in the event files (TFRecord framing, tensorboardX's protos)."""
    import struct
    from tensorboardX.proto import event_pb2

    found = []
    for name in sorted(os.listdir(folder)):
        raw = open(os.path.join(folder, name), "rb").read()
        at = 0
        while at < len(raw):
            (length,) = struct.unpack("<Q", raw[at:at + 8])
            event = event_pb2.Event.FromString(raw[at + 12:at + 12 + length])
            at += 16 + length
            found += [(event.step, v.tag) for v in event.summary.value if v.HasField("image")]
    return found


def test_eval_prints_the_table_of_the_best_checkpoint(trained, capsys):
    rc, root, workdir = trained
    records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    best = max((r for r in records if r["split"] == "eval"), key=lambda r: (r["miou"], r["step"]))
    assert cli.main(["eval", "--workdir", str(workdir), "--data-dir", str(root / "data")]) == 0
    out = capsys.readouterr().out
    for name in ("background", "disc", "square", "triangle", "ring", "mIoU"):
        assert name in out
    assert f"mIoU {100 * best['miou']:.2f}" in out  # same numbers as validation during training
    assert cli.main(["eval", "--checkpoint", str(workdir / "checkpoints" / "4"), "--data-dir", str(root / "data"),
                     "--multi-scale", "--flip"]) == 0
    assert "mIoU" in capsys.readouterr().out


def test_predict_writes_palette_masks_and_overlays_and_refuses_to_overwrite(trained, tmp_path, capsys):
    rc, root, workdir = trained
    images = []
    for i, size in enumerate([(20, 28), (17, 17)]):  # odd sizes too
        path = tmp_path / f"img{i}.jpg"
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)
        images.append(str(path))
    out = tmp_path / "pred"
    assert cli.main(["predict", "--checkpoint", str(workdir), *images, "--out", str(out)]) == 0
    for i, size in enumerate([(20, 28), (17, 17)]):
        with Image.open(out / f"img{i}.png") as mask:
            assert mask.mode == "P" and mask.size == (size[1], size[0])
            assert max(np.asarray(mask).ravel()) < 5
        with Image.open(out / f"img{i}_overlay.jpg") as ov:
            assert ov.size == (size[1], size[0])
    png = tmp_path / "same.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(png)
    assert cli.main(["predict", "--checkpoint", str(workdir), str(png), "--out", str(tmp_path)]) == 2
    assert "would overwrite the input" in capsys.readouterr().err


def test_tiled_predict_and_eval_match_whole_image_inference(trained, tmp_path, capsys):
    """The tiny model's receptive field is 7 pixels: with tiles of 16 overlapping by 12 (3 pixels of zero
    weight at each shared edge) every pixel is predicted from a tile that sees all of its field. 36x44 is
    covered by the tile grid exactly, so no edge tile is padded (padding is reflected, not the model's zeros)."""
    rc, root, workdir = trained
    image = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(5).integers(0, 255, (36, 44, 3), dtype=np.uint8)).save(image)
    whole, tiled = tmp_path / "whole", tmp_path / "tiled"
    assert cli.main(["predict", "--checkpoint", str(workdir), str(image), "--out", str(whole), "--save-probs"]) == 0
    assert cli.main(["predict", "--checkpoint", str(workdir), str(image), "--out", str(tiled), "--save-probs",
                     "--tile", "16", "16", "--overlap", "0.75", "--tile-batch", "3"]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tiled / "big.png")), np.asarray(Image.open(whole / "big.png")))
    from segjax import probmaps
    (p_whole, _), (p_tiled, names) = (probmaps.load_probs(str(d / "big_probs.npy")) for d in (whole, tiled))
    assert p_tiled.dtype == np.float16 and p_tiled.shape == (36, 44, 5)
    np.testing.assert_allclose(p_tiled.astype(np.float32), p_whole.astype(np.float32), atol=2e-3)
    assert names[:2] == ["background", "disc"]
    with Image.open(tiled / "big_entropy.png") as entropy:
        assert entropy.size == (44, 36)
    capsys.readouterr()
    assert cli.main(["eval", "--workdir", str(workdir), "--data-dir", str(root / "data")]) == 0
    table = capsys.readouterr().out
    assert cli.main(["eval", "--workdir", str(workdir), "--data-dir", str(root / "data"), "--tile", "16", "16",
                     "--overlap", "0.75"]) == 0
    assert capsys.readouterr().out == table
    assert cli.main(["predict", "--checkpoint", str(workdir), str(image), "--out", str(tmp_path / "no"),
                     "--tile", "64", "64"]) == 2
    assert "larger than the image 36x44" in capsys.readouterr().err and not (tmp_path / "no").exists()
    assert cli.main(["predict", "--checkpoint", str(workdir), str(image), "--out", str(tmp_path / "no"),
                     "--tile", "16", "16", "--overlap", "1"]) == 2
    assert "overlap" in capsys.readouterr().err and not (tmp_path / "no").exists()


def test_export_of_a_trained_workdir(trained, tmp_path, capsys):
    rc, root, workdir = trained
    out = tmp_path / "exported"
    assert cli.main(["export", "--checkpoint", str(workdir), str(out)]) == 0
    assert {"model.stablehlo", "model.json"} <= set(os.listdir(out))
    info = json.loads((out / "model.json").read_text())
    assert info["class_names"][:2] == ["background", "disc"] and len(info["input"]["mean"]) == 3
    capsys.readouterr()
    assert cli.main(["export", "--checkpoint", str(workdir), str(tmp_path / "no"), "--fixed-size", "32", "32",
                     "--onnx-fixed-size", "48", "48"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--onnx-fixed-size 48 48 differ" in err[0] and not (tmp_path / "no").exists()


@pytest.mark.parametrize("flag", [["--onnx"], ["--onnx-fixed-size", "32", "32"]])
def test_onnx_export_without_the_export_extra_names_it_before_reading_the_checkpoint(flag, tmp_path, capsys,
                                                                                     monkeypatch):
    monkeypatch.setitem(sys.modules, "jax2onnx", None)  # as on `pip install segjax` without [export]
    out = tmp_path / "exported"
    assert cli.main(["export", "--checkpoint", str(tmp_path / "no_such_run"), str(out), *flag]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ONNX export needs jax2onnx") and \
        err[0].endswith('pip install "segjax[export]"'), err
    assert not out.exists() and not (tmp_path / "no_such_run").exists()


def test_bad_override_is_a_one_line_error_with_status_2(tmp_path):
    env = dict(os.environ, SEGJAX_DATA_DIR=str(tmp_path / "data"))
    for arg, expected in (("--config.batch_sise=8", "unknown key 'batch_sise'"),
                          ("--config.batch_size=eight", "expected an integer")):
        proc = subprocess.run([sys.executable, "-m", "segjax.cli", "train", "--workdir", str(tmp_path / "w"), arg],
                              capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], proc.stderr
    assert not (tmp_path / "w").exists()  # nothing was started
