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

import numpy as np
import tensorflow_datasets as tfds

from segjax.data import registry
from segjax.errors import SegjaxError, writes_to

NAMES = registry.names()


def default_data_dir() -> str:
    return os.environ.get("SEGJAX_DATA_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "segjax", "data")


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


def _check_manual_dir(entry: registry.DataSet, name: str, manual_dir: str | None, flag: str) -> str:
    if manual_dir is None or not os.path.isdir(manual_dir) or not os.listdir(manual_dir):
        where = f"{manual_dir}: missing or empty" if manual_dir else "no manual dir given"
        raise SegjaxError(f"{where}: '{name}' needs a manual dir holding {entry.manual_hint()}; download it there "
                          f"and pass {flag}")
    return os.path.abspath(manual_dir)


def prepare(name: str, data_dir: str | None = None, manual_dir: str | None = None, *,
            manifest=None, progress: bool = True, manual_dir_flag: str = "--manual-dir", **options) -> dict[str, int]:
    """Builds data set `name` (idempotent: a prepared one is left alone) and returns its split sizes.

    `voc2012`, `voc2012_aug`, `drive`, `duts` read `manual_dir`; `folder` reads it with `manifest` (a
    dict or JSON path, see segjax.data.folder), its `manifest.json`, or in the common layout, and
    `folder:<name>` opens a prepared one (or builds it so named); `synthetic` takes `options`
    (image_size, num_train, num_val, max_objects, seed) and regenerates when they change.
    `manual_dir_flag` is how the running command spells the manual dir in its errors (the training
    loop: "--config.manual_dir=DIR").
    """
    data_dir = os.path.abspath(data_dir or default_data_dir())
    with writes_to(data_dir, "--data-dir (or $SEGJAX_DATA_DIR)"):
        return _prepare(name, data_dir, manual_dir, manifest, progress, manual_dir_flag, options)


def _prepare(name, data_dir, manual_dir, manifest, progress, flag, options) -> dict[str, int]:
    entry, suffix = registry.lookup(name)
    if options and not entry.options:
        takers = [n for n in registry.names() if registry.lookup(n)[0].options]
        raise SegjaxError(f"options {sorted(options)} only apply to {', '.join(repr(t) for t in takers)}, not '{name}'")
    if entry.prepare is not None:
        return entry.prepare(entry.location(data_dir)[0], progress=progress, build=_build, **options)
    unknown = sorted(set(options) - set(entry.options))
    if unknown:
        raise SegjaxError(f"options {unknown} do not apply to '{name}'; it takes {', '.join(entry.options)}")
    if entry.config is not None or suffix is not None:
        prepared = _prepared_dir(entry, data_dir, suffix)
        if prepared is not None and (entry.config is not None or manifest is None):
            _check_channels(prepared, options)
            return {split: info.num_examples for split, info in tfds.builder_from_directory(prepared).info.splits.items()}
    if entry.manual:
        manual_dir = _check_manual_dir(entry, name, manual_dir, flag)
    root, _, config = entry.location(data_dir, suffix) if (entry.config or suffix) else (data_dir, None, None)
    builder = entry.builder(root, config, manual_dir, manifest, **options)
    if builder.is_prepared():
        _check_channels(str(builder.data_dir), options)
        return _build(builder, None, progress)
    return _build(builder, manual_dir, progress)


def _stored_channels(builder_dir: str) -> int:
    path = os.path.join(builder_dir, "metadata.json")
    if not os.path.isfile(path):
        return 3
    with open(path) as f:
        return int(json.load(f).get("in_channels", 3))


def _check_channels(builder_dir: str, options: dict) -> None:
    """A data set prepared with one band count is not silently reused for another."""
    wanted = options.get("in_channels")
    if wanted is not None and _stored_channels(builder_dir) != wanted:
        raise SegjaxError(f"{builder_dir}: prepared with in_channels={_stored_channels(builder_dir)}, not {wanted}; "
                          "remove that folder to rebuild it, or prepare it under another name")


def _versions(config_dir: str) -> list[str]:
    versions = sorted(os.listdir(config_dir), key=lambda v: tuple(int(x) for x in v.split(".") if x.isdigit())) \
        if os.path.isdir(config_dir) else []
    return [v for v in versions if os.path.isfile(os.path.join(config_dir, v, "dataset_info.json"))]


def _prepared_dir(entry: registry.DataSet, data_dir: str, suffix: str | None) -> str | None:
    root, builder, config = entry.location(data_dir, suffix)
    config_dir = os.path.join(root, builder, config)
    versions = _versions(config_dir)
    return os.path.join(config_dir, versions[-1]) if versions else None


def _builder_dir(name: str, data_dir: str | None) -> str:
    data_dir = os.path.abspath(data_dir or default_data_dir())
    entry, suffix = registry.lookup(name)
    found = _prepared_dir(entry, data_dir, suffix) if (entry.config or suffix) else None
    if found is None:
        raise SegjaxError(f"data set '{name}' is not prepared in {data_dir}; run `segjax data prepare "
                          f"{name.split(':')[0]} --data-dir {data_dir}` first")
    return found


class SegmentationSource:
    """Random access over a prepared split: {"image": uint8 (H, W, 3) (uint16 (H, W, C) for a multi-band
    folder data set), "segmentation_mask": uint8 (H, W), "file_name": str}. Picklable, so grain worker processes can hold it."""

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


def in_channels(name: str, data_dir: str | None = None) -> int:
    """The image band count of a prepared data set: 3 (RGB) unless a multi-band folder data set."""
    entry, _ = registry.lookup(name)
    if entry.class_names is not None:  # the built-in data sets are RGB
        return 3
    return _stored_channels(_builder_dir(name, data_dir))


def known_class_names(name: str | None, data_dir: str | None = None) -> list[str]:
    """The data set's class names, or [] where it can give none (unknown, not prepared here, unnamed)."""
    try:
        return list(class_names(name, data_dir)) if name else []
    except Exception:  # noqa: BLE001  no names to give is an answer here, not an error
        return []


def names_or_numbers(name: str | None, num_classes: int, data_dir: str | None = None) -> list[str]:
    """The data set's class names when it has exactly `num_classes`, else "0", "1", ..."""
    names = known_class_names(name, data_dir)
    return names if len(names) == num_classes else [str(i) for i in range(num_classes)]


def class_names(name: str, data_dir: str | None = None) -> tuple[str, ...]:
    entry, _ = registry.lookup(name)
    if entry.class_names is not None:
        return tuple(entry.class_names)
    with open(os.path.join(_builder_dir(name, data_dir), "metadata.json")) as f:
        return tuple(json.load(f)["class_names"])
