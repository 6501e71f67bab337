"""Pictures of predictions: a grid of fixed validation samples, one row each: image | truth | prediction.

Each tile is enlarged by a whole factor (nearest neighbour, so label edges stay exact) until its shorter
side is at least MIN_TILE pixels. Columns are titled, the step heads the picture, each row's score (mIoU of
that sample, or MAE for saliency) stands beside it, and a legend under the grid names the colours.
Segmentation rows show labels in the VOC palette (void white); saliency rows show the mask and the
predicted probability map in grey. Training writes one grid per evaluation to
`<workdir>/samples/step_<N>.png` and to TensorBoard ("samples").
"""
from __future__ import annotations

import io
import math
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from segjax import tasks
from segjax.files import write_atomic

MIN_TILE = 192  # shorter side of an enlarged tile, in pixels
MAX_TILE = 1024  # a long, thin image is enlarged only as far as its longer side stays under this
GAP = 4  # white pixels between tiles
PAD = 10  # white margin around everything
FONT_SIZE = 15
LINE = FONT_SIZE + 9  # height of one line of text
TITLE_H = 2 * LINE  # the step, then the column titles
SCORE_W = 80  # the column of per-row scores, right of the tiles
SWATCH = 14
COLUMNS = ("image", "truth", "prediction")
INK, FAINT = (0, 0, 0), (150, 150, 150)


def _palette() -> np.ndarray:
    from segjax.data.synthetic import voc_palette

    palette = np.asarray(voc_palette(), np.uint8).reshape(256, 3).copy()
    palette[255] = 255  # void: white, not VOC's cream
    return palette


def _font():
    return ImageFont.load_default(size=FONT_SIZE)  # Pillow's built-in font: nothing to download


def enlarge(tile: np.ndarray) -> np.ndarray:
    """`tile` repeated by a whole factor (nearest neighbour) so its shorter side reaches MIN_TILE."""
    h, w = tile.shape[:2]
    factor = max(1, min(math.ceil(MIN_TILE / max(1, min(h, w))), MAX_TILE // max(h, w)))
    return np.repeat(np.repeat(tile, factor, 0), factor, 1)


def row_score(mask: np.ndarray, probs: np.ndarray, task: str | tasks.Task) -> float:
    """One sample's score: mIoU over the classes in its truth or prediction (void pixels left out), or
    for saliency the mean absolute error of the probability against the 0/1 truth."""
    return tasks.get(task).sample_score(np.asarray(mask).astype(np.int64), probs)


def _row_tiles(image, mask, probs, task: tasks.Task, palette: np.ndarray) -> list[np.ndarray]:
    image = _rgb(np.clip(np.rint(image), 0, 255).astype(np.uint8))
    return [enlarge(t) for t in (image, *task.picture(mask, probs, palette))]


def grid(images: np.ndarray, masks: np.ndarray, probs: np.ndarray, task: str | tasks.Task = tasks.SEGMENTATION,
         valid_hw=None, *, step: int | None = None, class_names=None) -> np.ndarray:
    """The labelled picture as uint8 RGB (height, width, 3). `images` are 0-255 RGB (K, H, W, 3), `masks`
    (K, H, W), `probs` (K, H, W, C); `valid_hw` (K, 2) crops each sample to its image (eval batches are
    padded); `class_names` name the legend's colours (default: the class numbers)."""
    palette, task = _palette(), tasks.get(task)
    rows, scores, classes = [], [], set()
    for k in range(len(images)):
        h, w = (int(v) for v in valid_hw[k]) if valid_hw is not None else images[k].shape[:2]
        if h == 0 or w == 0:  # a filler example of the last eval batch
            continue
        mask, p = np.asarray(masks[k][:h, :w]).astype(np.int64), np.asarray(probs[k][:h, :w], np.float32)
        rows.append(_row_tiles(images[k][:h, :w], mask, p, task, palette))
        scores.append(row_score(mask, p, task))
        classes |= task.shown(mask, p)
    if not rows:
        return np.full((1, 1, 3), 255, np.uint8)
    cell_h = max(t.shape[0] for r in rows for t in r)
    cell_w = max(t.shape[1] for r in rows for t in r)
    width = 2 * PAD + 3 * (cell_w + GAP) + SCORE_W
    legend = _legend(task.legend(classes, class_names, palette), width - 2 * PAD)
    grid_h = len(rows) * (cell_h + GAP) - GAP
    canvas = Image.new("RGB", (width, PAD + TITLE_H + grid_h + GAP + legend.height + PAD), "white")
    for i, tiles in enumerate(rows):
        for j, tile in enumerate(tiles):
            x, y = cell_origin(i, j, cell_h, cell_w)
            canvas.paste(Image.fromarray(tile), (x, y))
    _label(ImageDraw.Draw(canvas), step, scores, task, cell_h, cell_w)
    canvas.paste(legend, (PAD, PAD + TITLE_H + grid_h + GAP))
    return np.asarray(canvas)


def cell_origin(row: int, column: int, cell_h: int, cell_w: int) -> tuple[int, int]:
    """(x, y) of a tile's top-left corner in the picture."""
    return PAD + column * (cell_w + GAP), PAD + TITLE_H + row * (cell_h + GAP)


def _label(draw: ImageDraw.ImageDraw, step, scores, task: tasks.Task, cell_h: int, cell_w: int) -> None:
    font = _font()
    heading = "validation samples" if step is None else f"step {step}: validation samples"
    draw.text((PAD, PAD), heading, fill=INK, font=font)
    for j, title in enumerate(COLUMNS):
        x, _ = cell_origin(0, j, cell_h, cell_w)
        draw.text((x + cell_w // 2, PAD + LINE + LINE // 2), title, fill=INK, font=font, anchor="mm")
    score_x = PAD + 3 * (cell_w + GAP) + SCORE_W // 2
    draw.text((score_x, PAD + LINE + LINE // 2), task.score_name, fill=INK, font=font, anchor="mm")
    for i, score in enumerate(scores):
        _, y = cell_origin(i, 0, cell_h, cell_w)
        text = "n/a" if math.isnan(score) else f"{score:.3f}"
        draw.text((score_x, y + cell_h // 2), text, fill=INK, font=font, anchor="mm")


def _legend(entries: list[tuple], width: int) -> Image.Image:
    """Colour swatches with their names (`Task.legend`), wrapped into lines `width` pixels wide."""
    font = _font()
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    placed, x, y = [], 0, 0
    for colour, text in entries:
        w = (SWATCH + 5 if colour is not None else 0) + int(draw.textlength(text, font=font)) + 16
        if x and x + w > width:
            x, y = 0, y + LINE
        placed.append((x, y, colour, text))
        x += w
    legend = Image.new("RGB", (width, y + LINE), "white")
    draw = ImageDraw.Draw(legend)
    for x, y, colour, text in placed:
        if colour is not None:
            top = y + (LINE - SWATCH) // 2
            draw.rectangle((x, top, x + SWATCH - 1, top + SWATCH - 1), fill=colour, outline=FAINT)
            x += SWATCH + 5
        draw.text((x, y + LINE // 2), text, fill=INK, font=font, anchor="lm")
    return legend


def _rgb(image: np.ndarray) -> np.ndarray:
    """The first three bands of a multi-band image; one band (or two: the first) as grey."""
    return image[..., :3] if image.shape[-1] >= 3 else np.repeat(image[..., :1], 3, -1)


def save(workdir: str, step: int, picture: np.ndarray) -> str:
    """Writes `<workdir>/samples/step_<step>.png` (through a temporary file); returns its path. A picture of
    at most 256 colours is stored with a palette, losslessly; any other as optimized RGB."""
    folder = os.path.join(workdir, "samples")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"step_{step}.png")
    rgb = picture.reshape(-1, 3).astype(np.uint32)
    # one 24-bit key per pixel: a 1-D unique is ~50x faster than np.unique(..., axis=0) on rows
    colours, index = np.unique(rgb[:, 0] << 16 | rgb[:, 1] << 8 | rgb[:, 2], return_inverse=True)
    if len(colours) <= 256:
        image = Image.frombytes("P", picture.shape[1::-1], index.astype(np.uint8).tobytes())
        palette = np.stack([colours >> 16, colours >> 8 & 255, colours & 255], axis=1).astype(np.uint8)
        image.putpalette(palette.tobytes())
    else:
        image = Image.fromarray(picture)
    png = io.BytesIO()
    image.save(png, format="PNG", optimize=True)
    write_atomic(path, png.getvalue())
    return path
