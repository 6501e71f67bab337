"""`segjax eval`: scores of a checkpoint on a data set split, optionally multi-scale + flip; and the
evaluation loop the training run shares.

The checkpoint says which model, classes, data set and normalisation it was trained with; a
converted PyTorch checkpoint (which knows no data set) needs `dataset=`.
"""
from __future__ import annotations

import jax

from segjax import inference, metrics, tasks
from segjax import step as S
from segjax.errors import SegjaxError

MS_SCALES = inference.MS_SCALES


def evaluate_dataset(parallel: S.DataParallel, variables: dict, loader, task: str | tasks.Task) -> dict:
    """Sums the eval step over a loader on the host in int64/float64; returns the task's scores."""
    total, running = None, None
    for batch in _then_none(loader):  # a batch's sums are fetched once the next batch is dispatched
        if batch is not None:
            batch = parallel.put_batch(batch)
            parallel.compile_ahead("eval", variables, batch)  # timed, the first time only (parallel.compiled)
        previous, running = running, (None if batch is None else parallel.eval_step(variables, batch))
        if previous is not None:
            total = metrics.accumulate(total, jax.device_get(previous))
    if total is None:
        raise SegjaxError("the evaluation split is empty")
    return tasks.get(task).scores(total)


def _then_none(iterable):
    yield from iterable
    yield None


def evaluate_tiled(loaded: inference.InferenceModel, loader, tile, overlap: float = 0.25, tile_batch: int = 4,
                   scales=(1.0,), flip: bool = False, ms_rule: str = "mean-probs") -> dict:
    """Scores with sliding-window inference (segjax.tiling), image by image (loader batches of 1)."""
    from segjax import tiling

    card = loaded.card
    probs_fn = tiling.make_probs_fn(loaded.apply_fn, loaded.variables, scales, flip, card.task, ms_rule)
    total = None
    for batch in loader:
        for image, mask in zip(batch["image"], batch["mask"]):
            probs = tiling.predict_tiled(probs_fn, image, tile, overlap, tile_batch,
                                         output_stride=loaded.output_stride)
            sums = card.task.eval_sums(probs[None], mask[None], card.num_classes)
            total = metrics.accumulate(total, jax.device_get(sums))
    if total is None:
        raise SegjaxError("the evaluation split is empty")
    return card.task.scores(total)


def evaluate_crf(loaded: inference.InferenceModel, loader, crf_params: dict, scales=(1.0,), flip: bool = False,
                 ms_rule: str = "mean-probs") -> dict:
    """Scores of the CRF-refined probabilities (segjax.crf), image by image (loader batches of 1): the model's
    probabilities at the image's size (its padding cropped off), then the CRF on them and the image."""
    from segjax import crf

    card = loaded.card
    probs_fn = jax.jit(lambda variables, x: inference.predict_probs(loaded.apply_fn, variables, x, scales, flip,
                                                                    card.task, ms_rule))
    refine = crf.refiner(crf_params)
    total = None
    for batch in loader:
        for x, mask, (h, w) in zip(batch["image"], batch["mask"], batch["valid_hw"]):
            probs = probs_fn(loaded.variables, x[None])[0, :h, :w]
            refined = refine(crf.image_uint8(x[:h, :w], card.mean, card.std), probs)
            sums = card.task.eval_sums(refined[None], mask[None, :h, :w], card.num_classes)
            total = metrics.accumulate(total, jax.device_get(sums))
    if total is None:
        raise SegjaxError("the evaluation split is empty")
    return card.task.scores(total)


def evaluate(path: str, *, dataset: str | None = None, split: str | None = None, data_dir: str | None = None,
             multi_scale: bool = False, flip: bool = False, batch_size: int = 8,
             ms_rule: str = "mean-probs", tile=None, overlap: float = 0.25,
             tile_batch: int = 4, crf: dict | None = None) -> tuple[dict, list[str], inference.InferenceModel]:
    """Returns (scores, class names, the loaded model). `tile` (H, W): sliding-window inference. `crf`: refine
    with the fully connected CRF, {} for the checkpoint's own values (else segjax.crf.DEFAULTS) or overrides
    of them; the scores then hold "crf", the values used."""
    from segjax import data

    loaded = inference.load_for_inference(path)
    card = loaded.card
    crf_params = _crf_params(crf, card, tile)
    config = card.extra.get("config", {})
    dataset = dataset or card.dataset
    if not dataset:
        raise SegjaxError(f"{path}: the checkpoint does not name its data set; pass --dataset NAME")
    if ms_rule not in MS_SCALES:
        raise SegjaxError(f"--ms-rule {ms_rule}: choose one of {', '.join(MS_SCALES)}")
    if multi_scale and ms_rule == "max-logits" and not inference.supports_max_logits(loaded.model):
        raise SegjaxError(f"--ms-rule max-logits: model {card.model} has no logits at its own output stride; "
                          "use --ms-rule mean-probs")
    split = split or config.get("eval_split", "val")
    data_dir = data_dir or config.get("data_dir") or data.default_data_dir()
    if dataset == "synthetic":
        data.prepare("synthetic", data_dir, progress=False, **config.get("data_options", {}))
    source = data.open_source(dataset, split, data_dir)
    names = data.known_class_names(dataset, data_dir)
    if card.task.labels_are_classes and len(names) > card.num_classes:
        raise SegjaxError(f"{path}: the checkpoint predicts {card.num_classes} classes but data set '{dataset}' "
                          f"has {len(names)}; evaluate it on the data set it was trained on (--dataset)")
    scales = MS_SCALES[ms_rule] if multi_scale else tuple(config.get("eval_scales", (1.0,)))
    flip = flip or bool(config.get("eval_flip", False))
    if tile is not None or crf_params is not None:
        loader = data.make_eval_loader(source, batch_size=1, base_size=config.get("base_size"),
                                       mean=card.mean, std=card.std)
        scores = (evaluate_crf(loaded, loader, crf_params, scales, flip, ms_rule) if crf_params is not None
                  else evaluate_tiled(loaded, loader, tile, overlap, tile_batch, scales, flip, ms_rule))
    else:
        parallel = S.DataParallel(S.make_mesh(), loaded.apply_fn, num_classes=card.num_classes, task=card.task,
                                  scales=scales, flip=flip, ms_rule=ms_rule)
        batch_size = max(batch_size - batch_size % jax.device_count(), jax.device_count())
        loader = data.make_eval_loader(source, batch_size=batch_size, base_size=config.get("base_size"),
                                       mean=card.mean, std=card.std)
        scores = evaluate_dataset(parallel, parallel.put_state(loaded.variables), loader, card.task)
    if crf_params is not None:
        scores["crf"] = crf_params
    return scores, data.names_or_numbers(dataset, card.num_classes, data_dir), loaded


def _crf_params(overrides: dict | None, card, tile) -> dict | None:
    from segjax import crf

    if overrides is None:
        return None
    crf.check_usable(card.task, card.model, tile)
    return crf.resolve_params(card.crf, **overrides)
