"""`segjax eval`: scores of a checkpoint on a data set split, optionally multi-scale + flip (DeepLab v3).

The checkpoint says which model, classes, data set and normalisation it was trained with; a
converted PyTorch checkpoint (which knows no data set) needs `dataset=`.
"""
from __future__ import annotations

from segjax import checkpoint, inference
from segjax.errors import SegjaxError

DEEPLAB_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
# Multi-scale rule -> scales: DeepLab v3's averaged softmax, DeepLab v2's max of logits at 1, 0.75, 0.5.
MS_SCALES = {"mean-probs": DEEPLAB_SCALES, "max-logits": (0.5, 0.75, 1.0)}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def load_for_inference(path: str):
    """(TrainState for inference, meta) from a workdir, a step directory or a variables checkpoint."""
    from segjax import models
    from segjax import train as T

    variables, meta = checkpoint.load_variables(path)
    kw = dict(meta.get("model_kwargs") or {})
    num_classes = int(meta.get("num_classes") or kw.pop("num_classes", 0) or 0)
    kw.pop("num_classes", None)
    if not num_classes:
        raise SegjaxError(f"{path}: the checkpoint does not say its number of classes")
    model = models.create(meta["model"], num_classes, **kw)
    from segjax.convert import check_fits, model_shapes
    check_fits(variables, model_shapes(model), f"{path} (saved as model={meta['model']}, num_classes={num_classes})")
    task = meta.get("task") or ("saliency" if meta["model"].startswith("u2net") else "segmentation")
    return T.inference_state(model, variables, task, num_classes), meta


def evaluate(path: str, *, dataset: str | None = None, split: str | None = None, data_dir: str | None = None,
             multi_scale: bool = False, flip: bool = False, batch_size: int = 8,
             ms_rule: str = "mean-probs") -> tuple[dict, list[str], dict]:
    """Returns (scores, class names, checkpoint meta)."""
    from segjax import data
    from segjax import train as T
    from segjax.trainer import evaluate_dataset

    state, meta = load_for_inference(path)
    config = meta.get("config", {})
    dataset = dataset or meta.get("dataset")
    if not dataset:
        raise SegjaxError(f"{path}: the checkpoint does not name its data set; pass --dataset NAME")
    split = split or config.get("eval_split", "val")
    data_dir = data_dir or config.get("data_dir") or data.default_data_dir()
    if dataset == "synthetic":
        data.prepare("synthetic", data_dir, progress=False, **config.get("data_options", {}))
    source = data.open_source(dataset, split, data_dir)
    try:
        names = list(data.class_names(dataset, data_dir))
    except Exception:  # a data set without names
        names = []
    if state.task == "segmentation" and len(names) > state.num_classes:
        raise SegjaxError(f"{path}: the checkpoint predicts {state.num_classes} classes but data set '{dataset}' has "
                          f"{len(names)}; evaluate it on the data set it was trained on (--dataset)")
    if ms_rule not in MS_SCALES:
        raise SegjaxError(f"--ms-rule {ms_rule}: choose one of {', '.join(MS_SCALES)}")
    if multi_scale and ms_rule == "max-logits" and not inference.supports_max_logits(state.apply_fn.__self__):
        raise SegjaxError(f"--ms-rule max-logits: model {meta['model']} has no logits at its own output stride; "
                          "use --ms-rule mean-probs")
    scales = MS_SCALES[ms_rule] if multi_scale else tuple(config.get("eval_scales", (1.0,)))
    import jax
    parallel = T.DataParallel(T.make_mesh(), scales, flip or bool(config.get("eval_flip", False)), ms_rule)
    batch_size = max(batch_size - batch_size % jax.device_count(), jax.device_count())
    loader = data.make_eval_loader(source, batch_size=batch_size, base_size=config.get("base_size"), mean=tuple(meta.get("mean", IMAGENET_MEAN)),
                                   std=tuple(meta.get("std", IMAGENET_STD)))
    scores = evaluate_dataset(parallel, parallel.put_state(state), loader, state.task)
    if len(names) != state.num_classes:
        names = [str(i) for i in range(state.num_classes)]
    return scores, names, meta
