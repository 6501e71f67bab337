"""Data: tfds builders (VOC 2012 / SBD, image folders, synthetic) and the grain input pipeline.

    prepare(name, data_dir, manual_dir, ...) -> {split: size}         build once (idempotent)
    open_source(name, split, data_dir)        -> random-access source of examples
    make_train_loader(source, ...)            -> grain DataLoader of augmented numpy batches
    make_eval_loader(source, ...)             -> fixed-shape eval batches (+ valid_hw to crop logits)
    class_names(name)
    in_channels(name)                         -> image bands of a prepared data set (3 = RGB)
    check(name_or_dir, ...)                   -> CheckReport (segjax.data.check)

The data sets themselves are entries of segjax.data.registry. The grain pipeline is imported on first
use, so code that only needs the constants or the builders (segjax.convert, `segjax data`) skips it.
"""
from segjax.data.prepare import (NAMES, class_names, default_data_dir, in_channels, known_class_names,
                                 names_or_numbers, open_source, prepare)
from segjax.data.check import CheckReport, check  # noqa: E402  (after prepare: it reads through it)
from segjax.data.transforms import IMAGENET_MEAN, IMAGENET_STD

_LAZY = {"make_eval_loader": "segjax.data.pipeline", "make_train_loader": "segjax.data.pipeline"}

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "NAMES", "CheckReport", "check", "class_names", "known_class_names", "names_or_numbers", "default_data_dir",
           "in_channels", "make_eval_loader", "make_train_loader", "open_source", "prepare"]


def __getattr__(name):
    if name == "pipeline":
        import importlib

        return importlib.import_module("segjax.data.pipeline")
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'segjax.data' has no attribute {name!r}")
