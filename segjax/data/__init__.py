"""Data: tfds builders (VOC 2012 / SBD, image folders, synthetic), and the grain input pipeline.

    prepare(name, data_dir, manual_dir, ...) -> {split: size}     build once (idempotent)
    open_source(name, split, data_dir)        -> random-access source of examples
    make_train_loader(source, ...) / make_eval_loader(source, ...) -> grain loaders of numpy batches
    class_names(name)
"""
from segjax.data.prepare import NAMES, class_names, default_data_dir, open_source, prepare

__all__ = ["NAMES", "class_names", "default_data_dir", "open_source", "prepare"]
