"""Input channels other than RGB: multi-band 16-bit TIFF folder data sets, and RGB weights converted
to N input channels (docs/in_channels.md)."""
import io
import json
import re

import numpy as np
import pytest
import tifffile
from PIL import Image

from segjax import data
from segjax.data import validate
from segjax.errors import SegjaxError

MEAN, STD = (0.5,) * 4, (0.25,) * 4


def _write_tiff(path, array):
    tifffile.imwrite(path, array, photometric="minisblack", planarconfig="contig")


def make_bands(root, num_train=6, num_val=2, size=24, bands=4, seed=0):
    """root/{train,val}/images/<i>.tif (uint16, `bands` bands) + masks/<i>.png (3 classes)."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", num_train), ("val", num_val)):
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir(parents=True)
        for i in range(n):
            _write_tiff(root / split / "images" / f"{i}.tif",
                        rng.integers(0, 65536, (size, size, bands), dtype=np.uint16))
            mask = rng.integers(0, 3, (size, size), dtype=np.uint8)
            mask[0, 0], mask[0, 1] = 0, 2  # every mask holds classes 0..2: 3 classes
            Image.fromarray(mask, "L").save(root / split / "masks" / f"{i}.png")
    return root


def test_four_band_uint16_folder_prepares_and_loads_normalised_by_65535(tmp_path):
    root = make_bands(tmp_path / "bands")
    data_dir = str(tmp_path / "d")
    sizes = data.prepare("folder", data_dir, str(root), progress=False, in_channels=4)
    assert sizes == {"train": 6, "val": 2}
    assert data.in_channels("folder:bands", data_dir) == 4
    assert data.class_names("folder:bands", data_dir) == ("class_0", "class_1", "class_2")
    # Prepared: opening it again by name (the training loop's call) reuses it.
    assert data.prepare("folder:bands", data_dir, None, progress=False, in_channels=4) == sizes
    with pytest.raises(SegjaxError, match="prepared with in_channels=4, not 3"):
        data.prepare("folder:bands", data_dir, None, progress=False, in_channels=3)

    val = data.open_source("folder:bands", "val", data_dir)
    ex = val[0]
    written = tifffile.imread(root / "val" / "images" / "0.tif")
    assert ex["image"].dtype == np.uint16 and ex["image"].shape == (24, 24, 4)
    np.testing.assert_array_equal(ex["image"], written)

    batch = next(iter(data.make_eval_loader(val, batch_size=2, pad_multiple=8, mean=MEAN, std=STD,
                                            shard_index=0, shard_count=1)))
    assert batch["image"].shape == (2, 24, 24, 4) and batch["image"].dtype == np.float32
    np.testing.assert_allclose(batch["image"][0], (written / 65535.0 - 0.5) / 0.25, rtol=0, atol=1e-5)

    train = data.open_source("folder:bands", "train", data_dir)
    loader = data.make_train_loader(train, batch_size=2, crop_size=16, base_size=24, scale_range=(1.0, 1.0),
                                    hflip=False, mean=MEAN, std=STD, shard_index=0, shard_count=1)
    batch = next(iter(loader))
    assert batch["image"].shape == (2, 16, 16, 4) and batch["mask"].shape == (2, 16, 16)
    assert np.isfinite(batch["image"]).all()
    assert batch["image"].min() >= -2.0 - 1e-6 and batch["image"].max() <= 2.0 + 1e-6
    # At scale 1 the crop is a window of a stored image: its values are exactly (x / 65535 - mean) / std.
    images = [(train[i]["image"] / 65535.0 - 0.5) / 0.25 for i in range(len(train))]
    first = batch["image"][0]
    assert any(np.allclose(first, img[t:t + 16, l:l + 16], atol=1e-4)
               for img in images for t in range(9) for l in range(9))

    # uint8_batches: the raw uint16 crops, normalised on the device by the same rule.
    raw = next(iter(data.make_train_loader(train, batch_size=2, crop_size=16, base_size=24, scale_range=(1.0, 1.0),
                                           hflip=False, mean=MEAN, std=STD, shard_index=0, shard_count=1,
                                           uint8_images=True)))
    assert raw["image"].dtype == np.uint16
    on_device = data.pipeline.normalize_on_device(raw, mean=MEAN, std=STD)["image"]
    np.testing.assert_allclose(np.asarray(on_device), batch["image"], rtol=0, atol=1e-5)


def test_eight_bit_bands_are_scaled_to_the_uint16_range(tmp_path):
    a = np.arange(5 * 6 * 2, dtype=np.uint8).reshape(5, 6, 2) * 4
    _write_tiff(tmp_path / "x.tif", a)
    bands = validate.decode_bands((tmp_path / "x.tif").read_bytes(), "x.tif", 2)
    assert bands.dtype == np.uint16
    np.testing.assert_allclose(bands / 65535.0, a / 255.0, rtol=0, atol=1e-12)
    planar = np.moveaxis(np.arange(5 * 6 * 4, dtype=np.uint16).reshape(5, 6, 4), -1, 0)  # (bands, H, W)
    tifffile.imwrite(tmp_path / "p.tif", planar, photometric="minisblack", planarconfig="separate")
    np.testing.assert_array_equal(validate.decode_bands((tmp_path / "p.tif").read_bytes(), "p.tif", 4),
                                  np.moveaxis(planar, 0, -1))


def test_band_count_mismatch_names_the_file(tmp_path):
    root = make_bands(tmp_path / "bands", num_train=3, num_val=1)
    odd = root / "train" / "images" / "1.tif"
    _write_tiff(odd, np.zeros((24, 24, 5), np.uint16))
    with pytest.raises(SegjaxError) as info:
        data.prepare("folder", str(tmp_path / "d"), str(root), progress=False, in_channels=4)
    message = str(info.value)
    assert len(message.splitlines()) == 1 and str(odd) in message and "5 band(s)" in message
    assert "in_channels=4" in message


def test_data_check_reads_an_unprepared_band_folder_as_training_does(tmp_path, capsys):
    from segjax import cli
    root = make_bands(tmp_path / "bands", num_train=3, num_val=1)
    assert data.check(str(root), in_channels=4).ok
    odd = root / "val" / "images" / "0.tif"
    _write_tiff(odd, np.zeros((24, 24, 5), np.uint16))
    report = data.check(str(root), in_channels=4)
    assert not report.ok and len(report.problems) == 1
    assert str(odd) in report.problems[0] and "5 band(s) where in_channels=4" in report.problems[0]
    assert cli.main(["data", "check", str(root), "--in-channels", "4"]) == 1
    assert str(odd) in capsys.readouterr().err
    # As an RGB data set (no in_channels) every 4-band image is named, with the in_channels that reads it.
    rgb = data.check(str(root))
    assert len(rgb.problems) == 4
    assert sum("4 bands where RGB (in_channels=3)" in p and "set in_channels=4" in p for p in rgb.problems) == 3
    assert any(str(odd) in p and "set in_channels=5" in p for p in rgb.problems)
    # A 16-bit 3-band TIFF, which PIL cannot open, is an RGB image: training stores it as 8-bit.
    rgb16 = np.random.default_rng(1).integers(0, 65536, (5, 7, 3), dtype=np.uint16)
    _write_tiff(tmp_path / "rgb16.tif", rgb16)
    stored, hw = validate.encode_image((tmp_path / "rgb16.tif").read_bytes(), "rgb16.tif")
    assert hw == (5, 7)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(stored))),
                                  np.rint(rgb16 / 257.0).astype(np.uint8))


def test_mask_with_colour_channels_names_the_file(tmp_path):
    root = make_bands(tmp_path / "bands", num_train=3, num_val=1)
    bad = root / "val" / "masks" / "0.png"
    colours = np.zeros((24, 24, 3), np.uint8)
    colours[..., 0] = 1
    Image.fromarray(colours, "RGB").save(bad)
    with pytest.raises(SegjaxError, match=re.escape(str(bad)) + ".*RGB colour mask"):
        data.prepare("folder", str(tmp_path / "d"), str(root), progress=False, in_channels=4)


def test_rgb_option_leaves_the_folder_data_set_as_before(tmp_path):
    root = tmp_path / "rgb"
    for split in ("train", "val"):
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / split / "images" / f"{i}.png")
            Image.fromarray(np.eye(8, dtype=np.uint8)).save(root / split / "masks" / f"{i}.png")
    data.prepare("folder", str(tmp_path / "d"), str(root), progress=False, in_channels=3)
    ex = data.open_source("folder:rgb", "train", str(tmp_path / "d"))[1]
    assert ex["image"].dtype == np.uint8 and ex["image"].shape == (8, 8, 3)
    assert data.in_channels("folder:rgb", str(tmp_path / "d")) == 3


# ------------------------------------------------------------------------------------- convert

def test_convert_resnet18_to_four_channels_keeps_the_grey_response(tmp_path):
    import jax.numpy as jnp
    import torch
    import torchvision

    from segjax import checkpoint, cli, convert, models

    torch.manual_seed(0)
    ref = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    torch.save(ref.state_dict(), tmp_path / "w.pth")
    rgb_vars, rgb_meta = convert.convert_state_dict("resnet18", sd)
    assert cli.main(["convert", "resnet18", str(tmp_path / "w.pth"), str(tmp_path / "out"),
                     "--set", "in_channels=4"]) == 0
    variables, _ = checkpoint.load_variables(str(tmp_path / "out"))
    assert variables["params"]["conv1"]["kernel"].shape == (7, 7, 4, 64)
    np.testing.assert_allclose(variables["params"]["conv1"]["kernel"][:, :, 2],
                               sd["conv1.weight"].mean(axis=1).transpose(1, 2, 0) * 3 / 4, rtol=1e-6)
    meta = json.loads((tmp_path / "out" / "segjax.json").read_text())
    assert meta["in_channels"] == 4 and "in_channels" not in meta["model_kwargs"]
    np.testing.assert_allclose(meta["mean"], [np.mean(rgb_meta["mean"])] * 4)
    np.testing.assert_allclose(meta["std"], [np.mean(rgb_meta["std"])] * 4)

    model = models.create("resnet18", num_classes=10)
    grey = np.random.default_rng(0).normal(size=(2, 32, 32, 1)).astype(np.float32)
    rgb = model.apply(rgb_vars, jnp.asarray(np.repeat(grey, 3, -1)), train=False)
    four = model.apply(variables, jnp.asarray(np.repeat(grey, 4, -1)), train=False)
    assert sorted(rgb) == sorted(four)
    for key in rgb:  # the logits (and whatever else the model returns)
        want, got = np.asarray(rgb[key]), np.asarray(four[key])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())

    same, meta3 = convert.convert_state_dict("resnet18", sd, in_channels=3)
    np.testing.assert_array_equal(same["params"]["conv1"]["kernel"], rgb_vars["params"]["conv1"]["kernel"])
    assert meta3 == rgb_meta and meta3["in_channels"] == 3
    with pytest.raises(SegjaxError, match="in_channels=0"):
        convert.convert_state_dict("resnet18", sd, in_channels=0)


# ------------------------------------------------------------------------------------- training

@pytest.mark.e2e  # train, eval and predict through the CLI
def test_tiny_training_run_on_four_bands(tmp_path):
    """`segjax train` on the 4-band folder set (config.in_channels reaches the data set too; the sample
    grid pictures the first three bands), then `segjax eval` of its checkpoint. (`segjax predict` reads
    images through PIL as RGB and refuses a 4-band TIFF: not covered here until it reads bands.) The model is
    the tests' tiny one: what is tested is the data path; a 4-band UNet is built and exported in test_export.py."""
    from segjax import cli
    from tests import tiny_model

    make_bands(tmp_path / "data_src" / "bands")
    data_dir, workdir = tmp_path / "d", tmp_path / "w"
    code = cli.main([
        "train", "--workdir", str(workdir),
        "--config.dataset=folder:bands", f"--config.data_dir={data_dir}",
        f"--config.manual_dir={tmp_path / 'data_src' / 'bands'}", "--config.data_options={}",
        "--config.in_channels=4", "--config.mean=0.5,0.5,0.5,0.5", "--config.std=0.25,0.25,0.25,0.25",
        "--config.num_classes=3", f"--config.model={tiny_model.NAME}", '--config.model_kwargs={"features": 4}',
        "--config.num_steps=2", "--config.eval_every_steps=2", "--config.batch_size=2",
        "--config.eval_batch_size=2", "--config.base_size=24", "--config.crop_size=16",
        "--config.warmup_epochs=0", "--config.log_every_steps=1",
    ])
    assert code == 0
    assert data.in_channels("folder:bands", str(data_dir)) == 4
    assert (workdir / "samples" / "step_2.png").is_file()
    assert cli.main(["eval", "--workdir", str(workdir), "--data-dir", str(data_dir)]) == 0
