"""`segjax predict`: masks for image files.

Segmentation: `<stem>.png` (class indices, VOC palette) and `<stem>_overlay.jpg` (colours over the image).
Saliency (U2-Net): `<stem>_saliency.png` (grey, min-max normalised as U-2-Net's test script does)
and `<stem>_cutout.png` (the image with the saliency map as alpha).
Output paths that would overwrite an input, or collide with each other, are refused.
"""
from __future__ import annotations

import contextlib
import os
import sys

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


def expand_inputs(paths: list[str], huge_ok: bool = False) -> list[str]:
    """Image files as given, a folder as its files (sorted); every one is checked to be an image that can
    be read (its header: PIL's, or tifffile's for a TIFF) before any model is loaded or anything is written.
    huge_ok: accept images above PIL's decompression-bomb limit (tiled prediction reads them in bands)."""
    from segjax import imagefiles

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
        h, w = imagefiles.image_size(path, huge_ok=huge_ok)
        if huge_ok and h * w > imagefiles.PIL_PIXEL_LIMIT and not imagefiles.is_tiff(path):
            print(f"info: {path} is {h}x{w} ({h * w / 1e6:.0f} Mpixel), above PIL's decompression-bomb limit "
                  f"({imagefiles.PIL_PIXEL_LIMIT / 1e6:.0f} Mpixel); reading it anyway, for tiled prediction",
                  file=sys.stderr)
    return files


def colour_mask(labels: np.ndarray) -> Image.Image:
    """A palette PNG image of uint8 (H, W) labels that shares their memory (no copy)."""
    from segjax.data.synthetic import voc_palette

    labels = np.ascontiguousarray(labels, np.uint8)
    img = Image.frombuffer("P", (labels.shape[1], labels.shape[0]), labels, "raw", "P", 0, 1)
    img.putpalette(voc_palette())
    return img


def overlay_rows(image: np.ndarray, labels: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """uint8 (k, W, 3): the class colours blended over rows of the image where the label is not background."""
    from segjax.data.synthetic import voc_palette

    palette = np.asarray(voc_palette(), np.float32).reshape(256, 3)
    blend = np.where((labels > 0)[..., None], (1 - alpha) * image + alpha * palette[labels], image)
    return np.clip(np.rint(blend), 0, 255).astype(np.uint8)


def predict(path: str, images: list[str], out_dir: str, *, multi_scale: bool = False, flip: bool = False,
            tile=None, overlap: float = 0.25, tile_batch: int = 4, save_probs: bool = False,
            crf: dict | None = None) -> list[str]:
    """Writes the outputs for each image; returns the written paths.

    tile (H, W): sliding-window inference (segjax.tiling). Probabilities are produced band by band and
    every output is written band by band from them: labels and the entropy map into uint8 (H, W) arrays,
    the overlay as a JPEG 16 rows at a time, the probabilities into an .npy on disk; the whole image's
    probabilities are never held. Inputs above PIL's size limit are accepted, and TIFFs are read from
    the file band by band (`segjax.imagefiles`). save_probs: also `<stem>_probs.npy` (float16 (H, W, C))
    with `<stem>_probs.json` (the class names) and `<stem>_entropy.png`; saliency models write
    `<stem>_saliency16.png` (16-bit). Each image's files appear only when all of them are complete:
    on an error (a full disk, a corrupt file) that image's partial files are removed, earlier images'
    files are kept. crf: refine the probabilities with the fully connected CRF (segjax.crf): {} for the
    checkpoint's own values (else segjax.crf.DEFAULTS) or overrides of them; masks and saved probabilities
    are the refined ones (whole images only: it is refused with `tile`).
    """
    from segjax import inference

    if not images:
        raise SegjaxError("no images given; pass one or more image files")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise SegjaxError(f"{out_dir}: --out must be a directory, and this is a file; pick another --out")
    images = expand_inputs(images, huge_ok=tile is not None)
    loaded = inference.load_for_inference(path)
    refine = _crf_refiner(crf, loaded.card, tile)
    plans = output_paths(images, out_dir, loaded.card.task, save_probs)
    scales = inference.DEEPLAB_SCALES if multi_scale else (1.0,)
    bands_of = (_tiled_bands(loaded, images, scales, flip, tile, overlap, tile_batch) if tile is not None
                else _whole_image_bands(loaded, scales, flip, refine))
    names = list(loaded.card.class_names)
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for image_path, plan in zip(images, plans):
        written += _predict_image(image_path, plan, bands_of, loaded, names, huge_ok=tile is not None)
    return written


def _whole_image_bands(loaded, scales, flip, refine=None):
    """image rows -> one band: (0, float32 (H, W, C) probabilities of the whole image), CRF-refined when
    `refine` is given."""
    from segjax import inference

    card = loaded.card
    probs_fn = jax.jit(lambda variables, x: inference.predict_probs(loaded.apply_fn, variables, x, scales, flip,
                                                                    card.task))

    def bands(image):
        pixels = np.asarray(image[0:image.shape[0]])
        probs = np.asarray(probs_fn(loaded.variables, card.normalise(pixels)[None]))[0]
        yield 0, probs if refine is None else np.asarray(refine(pixels, probs))
    return bands


def _crf_refiner(overrides: dict | None, card, tile):
    from segjax import crf

    if overrides is None:
        return None
    crf.check_usable(card.task, card.model, tile)
    return crf.refiner(crf.resolve_params(card.crf, **overrides))


def _tiled_bands(loaded, images, scales, flip, tile, overlap, tile_batch):
    """image rows -> the tiled probabilities band by band; every image's tiling is checked first, before
    anything is written."""
    from segjax import imagefiles, tiling

    stride, card = loaded.output_stride, loaded.card
    for image_path in images:
        tiling.plan_tiles(imagefiles.image_size(image_path, huge_ok=True), tile, overlap, stride)
    probs_fn = tiling.make_probs_fn(loaded.apply_fn, loaded.variables, scales, flip, card.task)
    return lambda image: tiling.iter_tiled_probs(probs_fn, image, tile, overlap, tile_batch, output_stride=stride,
                                                 mean=card.mean, std=card.std)


def _predict_image(image_path: str, plan: dict, bands_of, loaded, names: list[str], huge_ok: bool) -> list[str]:
    from segjax import imagefiles

    image = imagefiles.open_rows(image_path, huge_ok=huge_ok)
    files, outputs = _PartialFiles(plan), None
    try:
        shape = (*image.shape[:2], loaded.card.num_classes)
        outputs = _WRITERS[loaded.card.task](files, image, shape, names)
        for top, probs in bands_of(image):
            outputs.add(top, probs)
        outputs.finish()
        files.commit()
    except BaseException:
        if outputs is not None:
            outputs.abandon()
        files.discard()
        raise
    finally:
        if isinstance(image, imagefiles.TiffRows):
            image.close()
    return list(plan.values())


class _PartialFiles:
    """An image's output files, written under temporary names (`<name>.partial`) and renamed to their own
    names only once all of them are complete; `discard` removes whatever was written."""

    def __init__(self, plan: dict):
        self.plan = plan
        self.opened: list[str] = []

    def path(self, key: str) -> str:
        temp = self.plan[key] + ".partial"
        self.opened.append(temp)
        return temp

    def commit(self) -> None:
        for temp in self.opened:
            os.replace(temp, temp[:-len(".partial")])

    def discard(self) -> None:
        for temp in self.opened:
            with contextlib.suppress(FileNotFoundError):
                os.remove(temp)


class SegmentationFiles:
    """The palette mask, overlay and (--save-probs) probabilities and entropy of one image, from bands of
    its probabilities: labels and entropy go into uint8 (H, W) arrays, the overlay and the probabilities
    to their files as the bands arrive."""

    def __init__(self, files: _PartialFiles, image, shape: tuple, names: list[str]):
        from segjax import imagefiles, probmaps

        h, w, c = shape
        if c > 256:
            raise SegjaxError(f"{c} classes do not fit a palette PNG (at most 256)")
        self.files, self.image = files, image
        self.labels = np.empty((h, w), np.uint8)
        self.overlay = imagefiles.JpegStripWriter(files.path("overlay"), h, w, quality=90)
        self.probs = self.entropy = None
        if "probs" in files.plan:
            self.probs = probmaps.ProbsWriter(files.path("probs"), shape)
            probmaps.write_names(files.path("names"), names, c)
            self.entropy = np.empty((h, w), np.uint8)

    def add(self, top: int, probs: np.ndarray) -> None:
        from segjax import probmaps

        rows = slice(top, top + len(probs))
        labels = self.labels[rows]
        labels[:] = probs.argmax(-1)
        self.overlay.write(overlay_rows(self.image[rows], labels))
        if self.probs is not None:
            self.probs.write(top, probs)
            self.entropy[rows] = probmaps.entropy_uint8(probs)

    def abandon(self) -> None:
        self.overlay.abandon()

    def finish(self) -> None:
        colour_mask(self.labels).save(self.files.path("mask"), format="PNG")
        self.overlay.close()
        if self.entropy is not None:
            Image.frombuffer("L", self.entropy.shape[::-1], self.entropy, "raw", "L", 0, 1).save(
                self.files.path("entropy"), format="PNG")


class SaliencyFiles:
    """The grey saliency map (min-max normalised, as U-2-Net's test script does), the cut-out (the image with
    the map as alpha) and (--save-probs) the 16-bit map of one image. The map is kept as uint16
    round(p * 65535), the 16-bit PNG's values; the grey map is normalised by the float map's min and max."""

    def __init__(self, files: _PartialFiles, image, shape: tuple, names: list[str]):
        self.files, self.image = files, image
        self.map16 = np.empty(shape[:2], np.uint16)
        self.low, self.high = np.inf, -np.inf

    def add(self, top: int, probs: np.ndarray) -> None:
        p = probs[..., 0]
        self.low, self.high = min(self.low, float(p.min())), max(self.high, float(p.max()))
        self.map16[top:top + len(p)] = np.round(np.clip(p, 0.0, 1.0) * 65535.0)

    def abandon(self) -> None:
        pass  # nothing is open between calls

    def finish(self) -> None:
        from segjax import probmaps

        h, w = self.map16.shape
        grey = np.empty((h, w), np.uint8)
        cutout = np.empty((h, w, 4), np.uint8)
        span = max(self.high - self.low, 1e-8)
        for top in range(0, h, 256):
            rows = slice(top, min(h, top + 256))
            grey[rows] = np.rint((self.map16[rows] / 65535.0 - self.low) / span * 255).clip(0, 255)
            cutout[rows, :, :3], cutout[rows, :, 3] = self.image[rows], grey[rows]
        Image.frombuffer("L", (w, h), grey, "raw", "L", 0, 1).save(self.files.path("mask"), format="PNG")
        Image.frombuffer("RGBA", (w, h), cutout, "raw", "RGBA", 0, 1).save(self.files.path("overlay"), format="PNG")
        if "saliency16" in self.files.plan:
            probmaps.saliency_png16(self.files.path("saliency16"), self.map16)


_WRITERS = {tasks.SEGMENTATION: SegmentationFiles, tasks.SALIENCY: SaliencyFiles}  # a task's output files
