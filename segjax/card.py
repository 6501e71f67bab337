"""`ModelCard`: what a trained model is, written once.

A checkpoint's meta (`meta/` of a training step, `segjax.json` of a converted checkpoint) and an
export's `model.json` all carry one card, written by `ModelCard.to_meta` and read by
`ModelCard.from_meta`; every fallback for checkpoints older than a field lives in `from_meta`.
Each source builds its card in one place: `from_config` (training), `segjax.convert.convert_state_dict`
(PyTorch weights) and `from_meta` (anything saved).

    card = ModelCard.from_meta(meta)
    model = card.build()                        # models.create(card.model, card.num_classes, **card.model_kwargs)
    probs = card.task.activate(logits)          # the Task owns what differs for saliency
    x = card.normalise(rgb_uint8)
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

import numpy as np

from segjax import tasks
from segjax.errors import SegjaxError
from segjax.files import jsonable

# Keys of the meta dict that the card reads itself; every other key (config, layout, source, ...) is
# kept in `extra` and written back unchanged.
_FIELDS = ("model", "model_kwargs", "num_classes", "task", "class_names", "dataset", "in_channels", "mean",
           "std", "output_stride", "crf")


@dataclasses.dataclass(frozen=True)
class ModelCard:
    model: str                              # registry name (segjax.models.names())
    num_classes: int
    model_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # JSON form, without num_classes
    task: tasks.Task = tasks.SEGMENTATION
    class_names: tuple[str, ...] = ()
    dataset: str | None = None              # the data set it was trained on (None: converted weights)
    in_channels: int = 3
    mean: tuple[float, ...] = ()            # input normalisation, 0-1 scale, one per band
    std: tuple[float, ...] = ()
    output_stride: Any = None               # int or (sh, sw) of the coarsest feature map; None: not measured
    crf: Mapping[str, Any] | None = None    # the dense CRF's parameters for these weights (segjax.crf)
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    # ------------------------------------------------------------------ sources

    @classmethod
    def from_config(cls, config, class_names) -> "ModelCard":
        """The card of a training run's recipe (segjax.config) and its data set's class names."""
        from segjax import config as config_lib
        return cls(model=config.model, num_classes=int(config.num_classes),
                   model_kwargs=jsonable(config.model_kwargs.to_dict()), task=tasks.get(config.task),
                   class_names=tuple(class_names), dataset=config.dataset, in_channels=int(config.in_channels),
                   mean=tuple(float(v) for v in config.mean), std=tuple(float(v) for v in config.std),
                   extra={"config": json.loads(config_lib.to_json(config))})

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any], where: str = "checkpoint") -> "ModelCard":
        """The card a checkpoint's meta, a segjax.json or a model.json records, with the rules for files
        written before a field existed: task from the model name, ImageNet normalisation, 3 bands, class
        names from the data set (else numbers)."""
        if not meta.get("model"):
            raise SegjaxError(f"{where}: the meta does not name its model; it was not written by segjax")
        kwargs = dict(meta.get("model_kwargs") or {})
        num_classes = int(meta.get("num_classes") or kwargs.get("num_classes") or 0)
        kwargs.pop("num_classes", None)
        if num_classes < 1:
            raise SegjaxError(f"{where}: the checkpoint does not say its number of classes")
        task = tasks.get(meta["task"]) if meta.get("task") else tasks.for_model(meta["model"])
        in_channels = int(meta.get("in_channels") or 3)
        from segjax.data.transforms import IMAGENET_MEAN, IMAGENET_STD
        mean = tuple(float(v) for v in (meta.get("mean") or IMAGENET_MEAN))
        std = tuple(float(v) for v in (meta.get("std") or IMAGENET_STD))
        names = _class_names(meta.get("class_names"), meta.get("dataset"), num_classes, task)
        stride = meta.get("output_stride")
        return cls(model=meta["model"], num_classes=num_classes, model_kwargs=kwargs, task=task,
                   class_names=names, dataset=meta.get("dataset"), in_channels=in_channels, mean=mean, std=std,
                   output_stride=tuple(stride) if isinstance(stride, list) else stride,
                   crf=dict(meta["crf"]) if meta.get("crf") else None,
                   extra={k: v for k, v in meta.items() if k not in _FIELDS})

    def to_meta(self) -> dict:
        """The JSON dict that `from_meta` reads back to an equal card."""
        meta = {"model": self.model, "model_kwargs": {"num_classes": self.num_classes, **self.model_kwargs},
                "num_classes": self.num_classes, "task": self.task.name, "class_names": list(self.class_names),
                "dataset": self.dataset, "in_channels": self.in_channels, "mean": list(self.mean),
                "std": list(self.std)}
        if self.output_stride is not None:
            meta["output_stride"] = jsonable(self.output_stride)
        if self.crf:
            meta["crf"] = dict(self.crf)
        return jsonable({**meta, **self.extra})

    # ------------------------------------------------------------------ uses

    def build(self, **overrides):
        """The flax module the card describes (overrides: dtype, axis_name, ...)."""
        from segjax import models
        return models.create(self.model, self.num_classes, **{**self.model_kwargs, **overrides})

    @property
    def palette(self) -> list[list[int]] | None:
        return self.task.palette(self.num_classes)

    def normalise(self, image: np.ndarray) -> np.ndarray:
        """uint8 (or uint16) (..., H, W, C) image -> the float32 input the model was trained on."""
        scale = 65535.0 if np.asarray(image).dtype == np.uint16 else 255.0
        return ((np.asarray(image, np.float32) / scale - np.asarray(self.mean, np.float32))
                / np.asarray(self.std, np.float32))

    def replace(self, **changes) -> "ModelCard":
        return dataclasses.replace(self, **changes)


def _class_names(names, dataset, num_classes: int, task: tasks.Task) -> tuple[str, ...]:
    if names and len(names) == num_classes:
        return tuple(str(n) for n in names)
    if task.class_names(num_classes):
        return tuple(task.class_names(num_classes))
    from segjax import data
    return tuple(data.names_or_numbers(dataset, num_classes))
