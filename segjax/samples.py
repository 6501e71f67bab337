"""Pictures of predictions: a grid of fixed validation samples, one row each: image | truth | prediction.

Segmentation rows show labels in the VOC palette (void white); saliency rows show the mask and the
predicted probability map in grey. Training writes one grid per evaluation to
`<workdir>/samples/step_<N>.png` and to TensorBoard ("samples").
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

GAP = 2  # white pixels between cells


def _palette() -> np.ndarray:
    from segjax.data.synthetic import voc_palette

    palette = np.asarray(voc_palette(), np.uint8).reshape(256, 3).copy()
    palette[255] = 255  # void: white, not VOC's cream
    return palette


def grid(images: np.ndarray, masks: np.ndarray, probs: np.ndarray, task: str = "segmentation",
         valid_hw=None) -> np.ndarray:
    """(rows, 3 columns) uint8 RGB picture; `images` are 0-255 RGB (K, H, W, 3), `masks` (K, H, W),
    `probs` (K, H, W, C); `valid_hw` (K, 2) crops each sample to its image (eval batches are padded)."""
    palette = _palette()
    rows = []
    for k in range(len(images)):
        h, w = (int(v) for v in valid_hw[k]) if valid_hw is not None else images[k].shape[:2]
        if h == 0 or w == 0:  # a filler example of the last eval batch
            continue
        image = _rgb(np.clip(np.rint(images[k][:h, :w]), 0, 255).astype(np.uint8))
        mask = np.asarray(masks[k][:h, :w]).astype(np.int64)
        if task == "saliency":
            truth = np.where(mask == 255, 128, np.clip(mask, 0, 1) * 255).astype(np.uint8)
            pred = np.rint(np.clip(probs[k][:h, :w, 0], 0, 1) * 255).astype(np.uint8)
            cells = [image, np.repeat(truth[..., None], 3, -1), np.repeat(pred[..., None], 3, -1)]
        else:
            cells = [image, palette[np.clip(mask, 0, 255)], palette[probs[k][:h, :w].argmax(-1)]]
        rows.append(cells)
    if not rows:
        return np.full((1, 1, 3), 255, np.uint8)
    cell_h = max(c.shape[0] for r in rows for c in r)
    cell_w = max(c.shape[1] for r in rows for c in r)
    out = np.full((len(rows) * (cell_h + GAP) - GAP, 3 * (cell_w + GAP) - GAP, 3), 255, np.uint8)
    for i, cells in enumerate(rows):
        for j, cell in enumerate(cells):
            y, x = i * (cell_h + GAP), j * (cell_w + GAP)
            out[y:y + cell.shape[0], x:x + cell.shape[1]] = cell
    return out


def _rgb(image: np.ndarray) -> np.ndarray:
    """The first three bands of a multi-band image; one band (or two: the first) as grey."""
    return image[..., :3] if image.shape[-1] >= 3 else np.repeat(image[..., :1], 3, -1)


def save(workdir: str, step: int, picture: np.ndarray) -> str:
    """Writes `<workdir>/samples/step_<step>.png` (through a temporary file); returns its path."""
    folder = os.path.join(workdir, "samples")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"step_{step}.png")
    Image.fromarray(picture).save(path + ".tmp", format="PNG")
    os.replace(path + ".tmp", path)
    return path
