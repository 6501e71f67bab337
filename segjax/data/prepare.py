"""Build the tfds data sets (`prepare`) and open them for random access (`open_source`).

    <data_dir>/voc2012_segmentation/{voc2012,voc2012_aug}/1.0.0/     real VOC (array_record)
    <data_dir>/segmentation_folder/{drive,duts,<manifest name>}/1.0.0/
    <data_dir>/synthetic/raw/VOCdevkit/VOC2012/...                   generated files, VOC layout
    <data_dir>/synthetic/voc2012_segmentation/voc2012/1.0.0/         ...read by the VOC builder

Nothing here imports TensorFlow: tfds writes array_record files and `as_data_source` decodes with
PIL, so building and reading work without it (`tfds.load`/`as_numpy` would not).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil

import numpy as np
import tensorflow_datasets as tfds

from segjax.data import folder, synthetic, voc
from segjax.errors import SegjaxError, writes_to

NAMES = ("voc2012", "voc2012_aug", "drive", "duts", "folder", "synthetic")


def default_data_dir() -> str:
    return os.environ.get("SEGJAX_DATA_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "segjax", "data")


def _location(name: str, data_dir: str) -> tuple[str, str, str]:
    """(tfds root, builder name, config name) of a data set."""
    if name in ("voc2012", "voc2012_aug"):
        return data_dir, "voc2012_segmentation", name
    if name == "synthetic":
        return os.path.join(data_dir, "synthetic"), "voc2012_segmentation", "voc2012"
    config = name.split(":", 1)[1] if name.startswith("folder:") else name
    return data_dir, "segmentation_folder", config


@contextlib.contextmanager
def _one_line_errors(progress: bool):
    """tfds wraps exceptions raised inside generators; surface our own one-line SegjaxError."""
    (tfds.enable_progress_bar if progress else tfds.disable_progress_bar)()
    try:
        yield
    except Exception as e:
        cause = e
        while cause is not None and not isinstance(cause, SegjaxError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise SegjaxError(str(cause).splitlines()[0]) from None


def _build(builder, manual_dir: str | None, progress: bool) -> dict[str, int]:
    config = tfds.download.DownloadConfig(manual_dir=manual_dir)
    with _one_line_errors(progress):
        builder.download_and_prepare(download_config=config, file_format="array_record")
    return {split: info.num_examples for split, info in builder.info.splits.items()}


def _check_manual_dir(name: str, manual_dir: str | None) -> str:
    if manual_dir is None or not os.path.isdir(manual_dir) or not os.listdir(manual_dir):
        need = {"voc2012": voc.VOC_TAR, "voc2012_aug": f"{voc.VOC_TAR} and {voc.SBD_TGZ}",
                "drive": "the extracted DRIVE folders (training/, test/)",
                "duts": "the extracted DUTS-TR/ and DUTS-TE/"}.get(name, "the image and mask folders")
        raise SegjaxError(f"{manual_dir or 'no --manual-dir'}: '{name}' needs a manual dir holding {need} "
                          "(or the extracted folders); pass --manual-dir")
    return os.path.abspath(manual_dir)


def prepare(name: str, data_dir: str | None = None, manual_dir: str | None = None, *,
            manifest=None, progress: bool = True, **synthetic_opts) -> dict[str, int]:
    """Builds data set `name` (idempotent: a prepared one is left alone) and returns its split sizes.

    `voc2012`, `voc2012_aug`, `drive`, `duts` read `manual_dir`; `folder` also needs `manifest` (a dict
    or JSON path, see segjax.data.folder); `synthetic` takes `synthetic_opts` (image_size, num_train,
    num_val, max_objects, seed) and regenerates when they change.
    """
    data_dir = os.path.abspath(data_dir or default_data_dir())
    with writes_to(data_dir, "--data-dir (or $SEGJAX_DATA_DIR)"):
        return _prepare(name, data_dir, manual_dir, manifest, progress, **synthetic_opts)


def _prepare(name, data_dir, manual_dir, manifest, progress, **synthetic_opts) -> dict[str, int]:
    if name == "synthetic":
        return _prepare_synthetic(data_dir, progress, **synthetic_opts)
    if synthetic_opts:
        raise SegjaxError(f"options {sorted(synthetic_opts)} only apply to 'synthetic', not '{name}'")
    if name in ("voc2012", "voc2012_aug"):
        builder = voc.Voc2012Segmentation(config=name, data_dir=data_dir)
    elif name in folder.PRESETS:
        builder = folder.SegmentationFolder(config=name, data_dir=data_dir)
    elif name == "folder":
        if manifest is None:
            raise SegjaxError("'folder' needs a manifest (--manifest FILE.json); see segjax/data/folder.py")
        builder = folder.SegmentationFolder(config=folder.folder_config(manifest), data_dir=data_dir)
    else:
        raise SegjaxError(f"unknown data set '{name}'; choose one of {', '.join(NAMES)}")
    if builder.is_prepared():
        return _build(builder, None, progress)
    return _build(builder, _check_manual_dir(name, manual_dir), progress)


def _prepare_synthetic(data_dir: str, progress: bool, **opts) -> dict[str, int]:
    unknown = set(opts) - set(synthetic.DEFAULTS)
    if unknown:
        raise SegjaxError(f"unknown synthetic options {sorted(unknown)}; valid: {sorted(synthetic.DEFAULTS)}")
    params = {**synthetic.DEFAULTS, **opts}
    root = os.path.join(data_dir, "synthetic")
    params_file = os.path.join(root, "params.json")
    builder = voc.Voc2012Segmentation(config="voc2012", data_dir=root)
    if os.path.isfile(params_file):
        with open(params_file) as f:
            if json.load(f) == params and builder.is_prepared():
                return _build(builder, None, progress)
        shutil.rmtree(root)  # other parameters: start over rather than mix two data sets
        builder = voc.Voc2012Segmentation(config="voc2012", data_dir=root)
    raw = os.path.join(root, "raw")
    synthetic.write_voc(raw, progress=progress, **params)
    sizes = _build(builder, raw, progress)
    with open(params_file, "w") as f:
        json.dump(params, f)
    return sizes


def _builder_dir(name: str, data_dir: str | None) -> str:
    data_dir = os.path.abspath(data_dir or default_data_dir())
    root, builder, config = _location(name, data_dir)
    config_dir = os.path.join(root, builder, config)
    versions = sorted(os.listdir(config_dir), key=lambda v: tuple(int(x) for x in v.split(".") if x.isdigit())) \
        if os.path.isdir(config_dir) else []
    versions = [v for v in versions if os.path.isfile(os.path.join(config_dir, v, "dataset_info.json"))]
    if not versions:
        raise SegjaxError(f"data set '{name}' is not prepared in {data_dir}; run `segjax data prepare "
                          f"{name.split(':')[0]} --data-dir {data_dir}` first")
    return os.path.join(config_dir, versions[-1])


class SegmentationSource:
    """Random access over a prepared split: {"image": uint8 (H, W, 3), "segmentation_mask": uint8 (H, W),
    "file_name": str}. Picklable, so grain worker processes can hold it."""

    def __init__(self, builder_dir: str, split: str):
        self.builder_dir, self.split = builder_dir, split
        builder = tfds.builder_from_directory(builder_dir)
        if split not in builder.info.splits:
            raise SegjaxError(f"{builder_dir}: no split '{split}'; it has {', '.join(builder.info.splits)}")
        self._source = builder.as_data_source(split=split)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index) -> dict:
        ex = self._source[int(index)]
        name = ex["file_name"]
        return {"image": ex["image"], "segmentation_mask": np.asarray(ex["segmentation_mask"])[..., 0],
                "file_name": name.decode() if isinstance(name, bytes) else str(name)}

    def __getstate__(self):
        return {"builder_dir": self.builder_dir, "split": self.split}

    def __setstate__(self, state):
        self.__init__(state["builder_dir"], state["split"])

    def __repr__(self):
        return f"SegmentationSource({self.builder_dir!r}, split={self.split!r}, len={len(self)})"


def open_source(name: str, split: str, data_dir: str | None = None) -> SegmentationSource:
    """Random-access source of a prepared split (`folder:<manifest name>` for custom folders)."""
    return SegmentationSource(_builder_dir(name, data_dir), split)


def class_names(name: str, data_dir: str | None = None) -> tuple[str, ...]:
    if name in ("voc2012", "voc2012_aug"):
        return voc.CLASS_NAMES
    if name == "synthetic":
        return synthetic.CLASS_NAMES
    if name in folder.PRESETS:
        return tuple(folder.PRESETS[name]["class_names"])
    with open(os.path.join(_builder_dir(name, data_dir), "metadata.json")) as f:
        return tuple(json.load(f)["class_names"])
