"""What differs between semantic segmentation and saliency detection, in one place.

A model's logits mean one thing or the other: C class scores (softmax, label = argmax) or one
foreground score (sigmoid, mask = p > 0.5, as U-2-Net). Everything downstream that depends on which
(the activation, labels, the evaluation sums and scores, the files `segjax predict` writes, the
colours of pictures) asks the model's `Task` instead of comparing strings:

    task = card.task                    # a Task; tasks.get("saliency") from a name
    probs = task.activate(logits)
    sums = task.eval_sums(probs, masks, num_classes)     # jittable, per batch
    scores = task.scores(metrics.accumulate(total, sums))  # on the host
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from segjax import metrics
from segjax.errors import SegjaxError


@dataclasses.dataclass(frozen=True, eq=False)  # compared and hashed by identity: two instances exist
class Task:
    name: str
    activation: str          # "softmax" over the classes or "sigmoid" of one channel
    decode: str              # how a runtime turns probabilities into the answer (model.json)
    best_metric: str         # the score that picks the best checkpoint
    suffixes: dict           # `segjax predict` outputs: key -> file-name suffix
    probs_suffixes: dict     # ... and the extra outputs of --save-probs
    labels_are_classes: bool  # mask values index the classes (a data set's class list must fit num_classes)
    score_name: str          # of one sample's score in pictures (`sample_score`)
    fixed_num_classes: int | None = None  # the one channel count the task allows (None: any)

    def activate(self, logits):
        raise NotImplementedError

    def labels(self, probs):
        """(..., H, W) int32 labels (segmentation) or 0/1 foreground (saliency) from (..., H, W, C) probs."""
        raise NotImplementedError

    def eval_sums(self, probs, masks, num_classes: int) -> dict:
        """One batch's evaluation sums, jittable; summed over batches with `metrics.accumulate`."""
        raise NotImplementedError

    def scores(self, total: dict) -> dict:
        raise NotImplementedError

    def format_scores(self, scores: dict, class_names) -> str:
        """The scores as `segjax eval` prints them."""
        return "  ".join(f"{k} {v:.4f}" for k, v in scores.items() if isinstance(v, float))

    def sample_score(self, mask: np.ndarray, probs: np.ndarray) -> float:
        """One sample's score, for pictures: (H, W) truth (255 = void) against (H, W, C) probabilities."""
        raise NotImplementedError

    def picture(self, mask: np.ndarray, probs: np.ndarray, palette: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(truth, prediction) as uint8 RGB (H, W, 3) tiles; `palette` (256, 3) colours the labels."""
        raise NotImplementedError

    def legend(self, shown: set, class_names, palette: np.ndarray) -> list[tuple]:
        """[(RGB colour or None for plain text, text)] naming what the picture's colours mean."""
        raise NotImplementedError

    def shown(self, mask: np.ndarray, probs: np.ndarray) -> set:
        """The classes a sample's tiles show (truth and prediction), for the legend."""
        return set()

    def class_names(self, num_classes: int) -> list[str] | None:
        """The names a model of this task has without a data set to name them (None: unknown)."""
        return None

    def palette(self, num_classes: int) -> list[list[int]] | None:
        return None


class _Segmentation(Task):
    def activate(self, logits):
        return jax.nn.softmax(logits, axis=-1)

    def labels(self, probs):
        return jnp.argmax(probs, axis=-1).astype(jnp.int32)

    def eval_sums(self, probs, masks, num_classes: int) -> dict:
        return {"confusion": metrics.confusion_matrix(self.labels(probs), masks, num_classes)}

    def scores(self, total: dict) -> dict:
        return metrics.scores(total["confusion"])

    def format_scores(self, scores: dict, class_names) -> str:
        return metrics.format_table(scores, class_names)

    def sample_score(self, mask, probs) -> float:
        """mIoU over the classes in the sample's truth or prediction (void pixels left out)."""
        cm = np.asarray(metrics.confusion_matrix(probs.argmax(-1), mask, probs.shape[-1]))
        return metrics.scores(cm)["miou"]

    def picture(self, mask, probs, palette):
        return palette[np.clip(mask, 0, 255)], palette[probs.argmax(-1)]

    def shown(self, mask, probs) -> set:
        return set(np.unique(mask).tolist()) | set(np.unique(probs.argmax(-1)).tolist())

    def legend(self, shown, class_names, palette):
        def name(c):
            return "void" if c == 255 else (str(class_names[c]) if class_names is not None and c < len(class_names)
                                             else str(c))
        return [(tuple(int(v) for v in palette[c]), name(c)) for c in sorted(shown)]

    def palette(self, num_classes: int) -> list[list[int]]:
        from segjax.data.synthetic import voc_palette
        pal = voc_palette()
        return [list(pal[3 * (i % 256): 3 * (i % 256) + 3]) for i in range(num_classes)]


class _Saliency(Task):
    def activate(self, logits):
        return jax.nn.sigmoid(logits)

    def labels(self, probs):
        return (probs[..., 0] > 0.5).astype(jnp.int32)

    def eval_sums(self, probs, masks, num_classes: int) -> dict:
        return metrics.saliency_sums(probs[..., 0], masks)

    def scores(self, total: dict) -> dict:
        return metrics.saliency_scores(total)

    def class_names(self, num_classes: int) -> list[str] | None:
        return ["salient"] if num_classes == 1 else None

    def sample_score(self, mask, probs) -> float:
        """The mean absolute error of the probability against the 0/1 truth (void pixels left out)."""
        valid = mask != 255
        return float(np.abs(probs[..., 0] - np.clip(mask, 0, 1))[valid].mean()) if valid.any() else float("nan")

    def picture(self, mask, probs, palette):
        truth = np.where(mask == 255, 128, np.clip(mask, 0, 1) * 255).astype(np.uint8)
        pred = np.rint(np.clip(probs[..., 0], 0, 1) * 255).astype(np.uint8)
        return np.repeat(truth[..., None], 3, -1), np.repeat(pred[..., None], 3, -1)

    def legend(self, shown, class_names, palette):
        return [(None, "truth:"), ((255, 255, 255), "salient"), ((0, 0, 0), "background"), ((128, 128, 128), "void"),
                (None, "prediction: probability, black 0 to white 1")]


SEGMENTATION = _Segmentation(
    "segmentation", "softmax", "label = argmax over the last axis", "miou",
    suffixes={"mask": ".png", "overlay": "_overlay.jpg"},
    probs_suffixes={"probs": "_probs.npy", "names": "_probs.json", "entropy": "_entropy.png"}, labels_are_classes=True, score_name="mIoU")
SALIENCY = _Saliency(
    "saliency", "sigmoid", "saliency = sigmoid(channel 0)", "max_f",
    suffixes={"mask": "_saliency.png", "overlay": "_cutout.png"},
    probs_suffixes={"saliency16": "_saliency16.png"}, labels_are_classes=False, score_name="MAE",
    fixed_num_classes=1)
TASKS = {t.name: t for t in (SEGMENTATION, SALIENCY)}


def get(task: str | Task) -> Task:
    """The Task of a name ("segmentation", "saliency"); a Task is returned as it is."""
    if isinstance(task, Task):
        return task
    try:
        return TASKS[task]
    except KeyError:
        raise SegjaxError(f"task {task!r}: use one of {', '.join(TASKS)}") from None


def for_model(model_name: str) -> Task:
    """The task a registered model was built for: the U2-Net family detects saliency, the rest segment.
    Checkpoints written before they recorded their task are read with this rule."""
    return SALIENCY if str(model_name).startswith("u2net") else SEGMENTATION
