"""`segjax predict`: masks for image files.

Segmentation: `<stem>.png` (class indices, VOC palette) and `<stem>_overlay.jpg` (colours over the image).
Saliency (U2-Net): `<stem>_saliency.png` (grey, min-max normalised as U-2-Net's test script does)
and `<stem>_cutout.png` (the image with the saliency map as alpha).
Output paths that would overwrite an input, or collide with each other, are refused.
"""
from __future__ import annotations

import os

import jax
import numpy as np
from PIL import Image

from segjax import tasks
from segjax.errors import SegjaxError


def output_paths(images: list[str], out_dir: str, task: str | tasks.Task, save_probs: bool = False) -> list[dict]:
    task = tasks.get(task)
    suffixes = {**task.suffixes, **(task.probs_suffixes if save_probs else {})}
    inputs = {os.path.realpath(p) for p in images}
    plans, seen = [], {}
    for image in images:
        stem = os.path.splitext(os.path.basename(image))[0]
        plan = {k: os.path.join(out_dir, stem + s) for k, s in suffixes.items()}
        for path in plan.values():
            real = os.path.realpath(path)
            if real in inputs:
                raise SegjaxError(f"{path} would overwrite the input image; pass another --out directory")
            if real in seen:
                raise SegjaxError(f"{image} and {seen[real]} would both write {path}; rename one or predict them apart")
            seen[real] = image
        plans.append(plan)
    return plans


def expand_inputs(paths: list[str]) -> list[str]:
    """Image files as given, a folder as its files (sorted); every one is checked to be an image PIL can
    open before any model is loaded or anything is written."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            inside = sorted(os.path.join(path, n) for n in os.listdir(path)
                            if not n.startswith(".") and os.path.isfile(os.path.join(path, n)))
            if not inside:
                raise SegjaxError(f"{path}: the folder holds no files; pass image files or a folder of images")
            files += inside
        else:
            files.append(path)
    for path in files:
        if not os.path.isfile(path):
            raise SegjaxError(f"{path}: no such image")
        try:
            with Image.open(path):
                pass
        except (OSError, SyntaxError, ValueError):  # PIL's UnidentifiedImageError is an OSError
            raise SegjaxError(f"{path}: not an image file PIL can read; remove it from the inputs (or the folder) "
                              "and pass only images") from None
    return files


def _read(path: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise SegjaxError(f"{path}: no such image")
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except OSError as e:
        raise SegjaxError(f"{path}: not an image PIL can read ({e})") from None


def colour_mask(labels: np.ndarray) -> Image.Image:
    from segjax.data.synthetic import voc_palette

    img = Image.fromarray(labels.astype(np.uint8), "P")
    img.putpalette(voc_palette())
    return img


def overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.5) -> Image.Image:
    from segjax.data.synthetic import voc_palette

    palette = np.asarray(voc_palette(), np.float32).reshape(256, 3)
    colours = palette[labels.astype(np.uint8)]
    blend = np.where((labels > 0)[..., None], (1 - alpha) * image + alpha * colours, image)
    return Image.fromarray(np.clip(np.rint(blend), 0, 255).astype(np.uint8), "RGB")


def predict(path: str, images: list[str], out_dir: str, *, multi_scale: bool = False, flip: bool = False,
            tile=None, overlap: float = 0.25, tile_batch: int = 4, save_probs: bool = False,
            crf: dict | None = None) -> list[str]:
    """Writes the outputs for each image; returns the written paths.

    tile (H, W): sliding-window inference (segjax.tiling): one compiled tile shape, blended overlaps,
    probabilities accumulated on the host band by band, so images far larger than memory allows for
    whole-image inference predict. save_probs: also `<stem>_probs.npz` (float16 (H, W, C) and the
    class names) and `<stem>_entropy.png`; saliency models write `<stem>_saliency16.png` (16-bit).
    crf: refine the probabilities with the fully connected CRF (segjax.crf): {} for the checkpoint's own
    values (else segjax.crf.DEFAULTS) or overrides of them; masks and saved probabilities are the refined ones.
    """
    from segjax import inference, tiling

    if not images:
        raise SegjaxError("no images given; pass one or more image files")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise SegjaxError(f"{out_dir}: --out must be a directory, and this is a file; pick another --out")
    images = expand_inputs(images)
    loaded = inference.load_for_inference(path)
    card = loaded.card
    refine = _crf_refiner(crf, card, tile)
    plans = output_paths(images, out_dir, card.task, save_probs)
    scales = inference.DEEPLAB_SCALES if multi_scale else (1.0,)
    if tile is not None:  # every image's tiling is checked before anything is written
        stride = loaded.output_stride
        for image_path in images:
            with Image.open(image_path) as img:
                tiling.plan_tiles((img.height, img.width), tile, overlap, stride)
        tiled_fn = tiling.make_probs_fn(loaded.apply_fn, loaded.variables, scales, flip, card.task)
    probs_fn = jax.jit(lambda variables, x: inference.predict_probs(loaded.apply_fn, variables, x, scales, flip,
                                                                    card.task))
    names = list(card.class_names)
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for image_path, plan in zip(images, plans):
        image = _read(image_path)
        if tile is not None:
            probs = tiling.predict_tiled(tiled_fn, image, tile, overlap, tile_batch, output_stride=stride,
                                         mean=card.mean, std=card.std)
        else:
            x = card.normalise(image)[None]
            probs = np.asarray(probs_fn(loaded.variables, x))[0]
            if refine is not None:
                probs = np.asarray(refine(image, probs))
        written += _write(plan, image, probs, card.task, names)
    return written


def _write(plan: dict, image: np.ndarray, probs: np.ndarray, task: str, names: list[str]) -> list[str]:
    from segjax import probmaps

    if task == "saliency":
        sal = probs[..., 0]
        sal = (sal - sal.min()) / max(float(sal.max() - sal.min()), 1e-8)
        grey = np.rint(sal * 255).astype(np.uint8)
        Image.fromarray(grey, "L").save(plan["mask"])
        Image.fromarray(np.dstack([image, grey]), "RGBA").save(plan["overlay"])
        if "saliency16" in plan:
            probmaps.saliency_png16(plan["saliency16"], probs[..., 0])
    else:
        labels = probs.argmax(-1)
        colour_mask(labels).save(plan["mask"])
        overlay(image, labels).save(plan["overlay"], quality=90)
        if "probs" in plan:
            plan["probs"] = probmaps.save_probs(plan["probs"], probs, names)
            probmaps.entropy_png(plan["entropy"], probs)
    return list(plan.values())


def _crf_refiner(overrides: dict | None, card, tile):
    from segjax import crf

    if overrides is None:
        return None
    crf.check_usable(card.task, card.model, tile)
    return crf.refiner(crf.resolve_params(card.crf, **overrides))


