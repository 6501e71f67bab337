"""Data: tfds builders (VOC 2012 / SBD, image folders, synthetic) and the grain input pipeline.

    prepare(name, data_dir, manual_dir, ...) -> {split: size}         build once (idempotent)
    open_source(name, split, data_dir)        -> random-access source of examples
    make_train_loader(source, ...)            -> grain DataLoader of augmented numpy batches
    make_eval_loader(source, ...)             -> fixed-shape eval batches (+ valid_hw to crop logits)
    class_names(name)
"""
from segjax.data.pipeline import crop_logits, make_eval_loader, make_train_loader
from segjax.data.prepare import NAMES, class_names, default_data_dir, open_source, prepare
from segjax.data.transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "NAMES", "class_names", "crop_logits", "default_data_dir",
           "make_eval_loader", "make_train_loader", "open_source", "prepare"]
