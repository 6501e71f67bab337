"""Tiled (sliding-window) inference for images larger than a model can take whole.

Rules (see docs/tiling.md):

- **Geometry.** Tiles of one shape (th, tw) start on a regular grid 0, step, 2 step, ... along each
  axis, step = tile - round(overlap * tile) rounded *down* to a multiple of the model's output stride
  (so the realised overlap is never smaller than asked, and every tile sees the model's pooling grid
  at the same phase as whole-image inference does). Tile sizes that the output stride does not divide
  are refused with the nearest valid sizes. The last tile of a row or column may reach past the image.
- **Padding.** That part is filled by *reflecting* the image at its bottom / right border (numpy's
  "reflect": the border pixel is not repeated), or with zeros of the normalised input when
  `pad="zero"`. Reflection is the default because the model then sees image-like content, not a flat
  band of the dataset's mean colour it never saw in training; the padded pixels' outputs are dropped.
  Edge tiles are never resized.
- **One compile.** Every call of `probs_fn` gets a float32 (tile_batch, th, tw, channels) array: the
  last partial batch is filled up with zero tiles whose outputs are dropped.
- **Blending.** Each tile's probabilities are weighted by a window (a linear ramp across the overlap,
  or a Gaussian with sigma = tile / 8) and the sums are divided by the summed weights. On a side that
  lies on the image border the window is flat (there is no neighbour to blend with). On a side
  shared with a neighbour the window is zero for the `margin` pixels nearest the tile edge (default
  overlap // 4): with margin >= the receptive-field radius and overlap >= 2 * margin + 1 the result
  equals whole-image inference everywhere except within that radius of a bottom / right border that
  a padded tile crosses (models without global pooling only; see docs/tiling.md).
- **Row bands.** Probabilities accumulate on the host in a band of `th` rows x the image width
  (float32 sums plus weights). Tiles are visited in raster order; when a new row of tiles starts, the
  rows above it are finished: they are normalised, written into `out` (which may be an `np.memmap`)
  and the band moves down. Host memory is the band plus two batches, device memory two batches,
  whatever the image height; only `out` (and the input image) grow with the image.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from segjax.errors import SegjaxError

WINDOWS = ("gaussian", "linear")
PADS = ("reflect", "zero")


def _pair(value, what: str) -> tuple[int, int]:
    if isinstance(value, (int, np.integer)):
        value = (value, value)
    try:
        a, b = value
        if int(a) != a or int(b) != b:
            raise ValueError
        a, b = int(a), int(b)
    except (TypeError, ValueError):
        raise SegjaxError(f"{what} {value!r}: give one positive integer or a (height, width) pair") from None
    if a < 1 or b < 1:
        raise SegjaxError(f"{what} {a}x{b}: both sizes must be positive")
    return a, b


def _nearest_multiples(t: int, s: int) -> tuple[int, int]:
    lo = max(s, t // s * s)
    hi = -(-t // s) * s
    return lo, hi


def plan_tiles(image_size: Sequence[int], tile, overlap: float = 0.25, output_stride=1,
               margin: int | None = None) -> dict:
    """The tile grid `predict_tiled` uses, after validation (SegjaxError with a one-line fix otherwise).

    Returns {"tile": (th, tw), "step": (sy, sx), "overlap": (oy, ox) pixels, "margin": (my, mx),
    "rows": [tile tops], "cols": [tile lefts]}.
    """
    h, w = int(image_size[0]), int(image_size[1])
    th, tw = _pair(tile, "tile")
    sh, sw = _pair(output_stride, "output stride")
    try:
        overlap = float(overlap)
    except (TypeError, ValueError):
        raise SegjaxError(f"overlap {overlap!r}: give a fraction of the tile in [0, 1), e.g. 0.25") from None
    if not 0.0 <= overlap < 1.0:  # also refuses NaN
        raise SegjaxError(f"overlap {overlap}: must be in [0, 1) (the fraction of a tile shared with its "
                          "neighbour; 1 or more would never advance), e.g. 0.25")
    if th % sh or tw % sw:
        (ylo, yhi), (xlo, xhi) = _nearest_multiples(th, sh), _nearest_multiples(tw, sw)
        stride = f"{sh}" if sh == sw else f"{sh}x{sw}"
        raise SegjaxError(f"tile {th}x{tw} is not a multiple of the model's output stride {stride}; "
                          f"use {ylo}x{xlo} or {yhi}x{xhi}")
    if th > h or tw > w:
        sy, sx = min(th, h // sh * sh), min(tw, w // sw * sw)
        if sy == 0 or sx == 0:
            raise SegjaxError(f"tile {th}x{tw} is larger than the image {h}x{w}, which is smaller than the "
                              f"model's output stride; predict it whole instead of tiled")
        raise SegjaxError(f"tile {th}x{tw} is larger than the image {h}x{w}; use a tile no larger than the "
                          f"image, e.g. {sy}x{sx}")
    steps, overlaps = [], []
    for t, s in ((th, sh), (tw, sw)):
        step = max(s, (t - round(overlap * t)) // s * s)
        steps.append(step)
        overlaps.append(t - step)
    if margin is None:
        margins = [o // 4 for o in overlaps]
    else:
        if int(margin) != margin or margin < 0:
            raise SegjaxError(f"margin {margin!r}: give a non-negative number of pixels")
        margins = [int(margin)] * 2
        for o, axis in zip(overlaps, ("height", "width")):
            if 2 * margins[0] >= max(o, 1) and not (o == 0 and margins[0] == 0):
                raise SegjaxError(f"margin {margin} leaves no blend across the {o}-pixel overlap in {axis}; "
                                  f"use a margin below {max(o, 1) / 2:g} or a larger overlap")

    def starts(length, t, step):
        n = 1 + max(0, math.ceil((length - t) / step))
        return [i * step for i in range(n)]

    return {"tile": (th, tw), "step": tuple(steps), "overlap": tuple(overlaps), "margin": tuple(margins),
            "rows": starts(h, th, steps[0]), "cols": starts(w, tw, steps[1])}


def window_1d(t: int, overlap: int, margin: int, kind: str = "gaussian", start_border: bool = False,
              end_border: bool = False) -> np.ndarray:
    """Blend weights along one axis of a tile (float64, length t); see the module docstring.

    linear: 0 on the `margin` pixels nearest a shared edge, then a ramp reaching 1 at `overlap - margin`
    pixels (the two ramps of neighbouring tiles sum to 1 across the overlap). gaussian:
    exp(-d^2 / (2 (t/8)^2)) of the distance d to the tile centre, flat at its peak towards a border side,
    also zero on the margins. Both are flat (1) towards a side on the image border.
    """
    x = np.arange(t, dtype=np.float64)
    if kind == "linear":
        width = max(overlap - 2 * margin, 1)
        left = np.ones(t) if start_border else np.clip((x - margin + 0.5) / width, 0.0, 1.0)
        right = np.ones(t) if end_border else np.clip((t - 1 - x - margin + 0.5) / width, 0.0, 1.0)
        return left * right
    if kind == "gaussian":
        centre, sigma = t / 2.0, t / 8.0
        d = x + 0.5 - centre
        if start_border:
            d = np.where(d < 0, 0.0, d)
        if end_border:
            d = np.where(d > 0, 0.0, d)
        g = np.exp(-(d * d) / (2 * sigma * sigma))
        if not start_border:
            g[:margin] = 0.0
        if not end_border and margin:
            g[t - margin:] = 0.0
        return g
    raise SegjaxError(f"window {kind!r}: use one of {', '.join(WINDOWS)}")


def _indices(start: int, t: int, length: int) -> np.ndarray | slice:
    if start + t <= length:
        return slice(start, start + t)
    idx = np.arange(start, start + t)
    return np.where(idx >= length, 2 * (length - 1) - idx, idx)  # reflect; pad < t <= length keeps it >= 0


def predict_tiled(probs_fn: Callable, image: np.ndarray, tile=(512, 512), overlap: float = 0.25,
                  tile_batch: int = 4, window: str = "gaussian", num_classes: int | None = None,
                  out: np.ndarray | None = None, *, output_stride=1, margin: int | None = None,
                  pad: str = "reflect", mean=None, std=None, stats: dict | None = None) -> np.ndarray:
    """(H, W, C) float32 probabilities of `image` (H, W, channels), predicted tile by tile.

    probs_fn: jitted (tile_batch, th, tw, channels) float32 -> (tile_batch, th, tw, C) probabilities;
        it is only ever called with that one shape (see `make_probs_fn`).
    image: already normalised float (mean / std None), or raw 0-255 pixels with `mean`, `std` (per
        channel, of the 0-1 range, e.g. IMAGENET_MEAN / IMAGENET_STD): tiles are then normalised on
        the host as (x / 255 - mean) / std, so the image can stay uint8 (or an np.memmap).
    tile: int or (th, tw), multiples of `output_stride` (int or pair; the model's coarsest stride,
        `segjax.analysis.output_stride(model)["feature"]`), no larger than the image.
    overlap: fraction of a tile shared with its neighbour, in [0, 1).
    window: "gaussian" or "linear"; margin: pixels of zero weight at shared tile edges (default overlap // 4).
    pad: "reflect" (default) or "zero": how a tile reaching past the bottom / right border is filled.
    num_classes: C when known (checked against probs_fn's output); out: an (H, W, C) array to write
        into (e.g. an np.memmap), else a new float32 array.
    stats: a dict filled with the grid and band figures ("tiles", "batches", "band_rows",
        "max_rows_held", "accumulator_bytes", "step", "overlap", "margin").
    """
    image_arr = image
    if getattr(image_arr, "ndim", None) != 3:
        raise SegjaxError(f"image of shape {getattr(image_arr, 'shape', None)}: pass one (height, width, "
                          "channels) array")
    h, w, cin = image_arr.shape
    plan = plan_tiles((h, w), tile, overlap, output_stride, margin)
    th, tw = plan["tile"]
    if int(tile_batch) != tile_batch or tile_batch < 1:
        raise SegjaxError(f"tile batch {tile_batch!r}: give a positive integer")
    tile_batch = int(tile_batch)
    if window not in WINDOWS:
        raise SegjaxError(f"window {window!r}: use one of {', '.join(WINDOWS)}")
    if pad not in PADS:
        raise SegjaxError(f"pad {pad!r}: use one of {', '.join(PADS)}")
    if (mean is None) != (std is None):
        raise SegjaxError("pass both mean and std (raw 0-255 image) or neither (already normalised image)")
    if mean is not None:
        mean = np.asarray(mean, np.float32).reshape(-1)
        std = np.asarray(std, np.float32).reshape(-1)
    if out is not None:
        if out.ndim != 3 or out.shape[:2] != (h, w) or (num_classes is not None and out.shape[2] != num_classes):
            want = f"({h}, {w}, {num_classes if num_classes is not None else 'C'})"
            raise SegjaxError(f"out has shape {out.shape}; it must be {want} for this image")
        num_classes = out.shape[2] if num_classes is None else num_classes

    rows, cols = plan["rows"], plan["cols"]
    (oy, ox), (my, mx) = plan["overlap"], plan["margin"]
    win_y = {(i == 0, i == len(rows) - 1): None for i in range(len(rows))}
    win_x = {(j == 0, j == len(cols) - 1): None for j in range(len(cols))}
    for k in win_y:
        win_y[k] = window_1d(th, oy, my, window, *k)
    for k in win_x:
        win_x[k] = window_1d(tw, ox, mx, window, *k)
    windows: dict = {}

    def window_of(i, j):
        key = ((i == 0, i == len(rows) - 1), (j == 0, j == len(cols) - 1))
        if key not in windows:
            windows[key] = np.outer(win_y[key[0]], win_x[key[1]]).astype(np.float32)
        return windows[key]

    tiles = [(i, j) for i in range(len(rows)) for j in range(len(cols))]

    def assemble(batch):
        x = np.zeros((tile_batch, th, tw, cin), np.float32)
        for slot, (i, j) in enumerate(batch):
            y0, x0 = rows[i], cols[j]
            ri, ci = _indices(y0, th, h), _indices(x0, tw, w)
            part = image_arr[ri] if isinstance(ri, slice) else np.take(image_arr, ri, axis=0)
            part = part[:, ci] if isinstance(ci, slice) else np.take(part, ci, axis=1)
            part = np.asarray(part, np.float32)
            if mean is not None:
                part = (part / 255.0 - mean) / std
            if pad == "zero":
                part[min(th, h - y0):] = 0.0
                part[:, min(tw, w - x0):] = 0.0
            x[slot] = part
        return x

    state = {"acc": None, "wsum": None, "top": 0, "row": 0, "held": 0, "out": out, "scratch": None}

    def allocate(c):
        state["acc"] = np.zeros((th, w, c), np.float32)
        state["wsum"] = np.zeros((th, w), np.float32)
        state["scratch"] = np.empty((th, tw, c), np.float32)
        if state["out"] is None:
            state["out"] = np.empty((h, w, c), np.float32)

    def flush(upto):
        """Normalise and write rows [top, upto); move the band down to start at `upto`."""
        top, acc, wsum = state["top"], state["acc"], state["wsum"]
        k = upto - top
        if k <= 0:
            return
        o = state["out"]
        np.divide(acc[:k], wsum[:k, :, None], out=o[top:upto], casting="same_kind")
        acc[:th - k] = acc[k:]
        acc[th - k:] = 0.0
        wsum[:th - k] = wsum[k:]
        wsum[th - k:] = 0.0
        state["top"] = upto

    def consume(batch, result):
        p = np.asarray(result)
        if p.ndim != 4 or p.shape[:3] != (tile_batch, th, tw):
            raise SegjaxError(f"probs_fn returned shape {p.shape} for tiles of shape {(tile_batch, th, tw, cin)}; "
                              "it must keep the batch, height and width")
        if num_classes is not None and p.shape[3] != num_classes:
            raise SegjaxError(f"probs_fn returned {p.shape[3]} channels but num_classes / out say {num_classes}")
        if state["acc"] is None:
            allocate(p.shape[3])
        acc, wsum, scratch = state["acc"], state["wsum"], state["scratch"]
        for slot, (i, j) in enumerate(batch):
            y0, x0 = rows[i], cols[j]
            if i != state["row"]:  # a new row of tiles: every row above it is finished
                flush(y0)
                state["row"] = i
            hy, wx = min(th, h - y0), min(tw, w - x0)
            r0 = y0 - state["top"]
            state["held"] = max(state["held"], r0 + hy)
            win = window_of(i, j)
            np.multiply(p[slot, :hy, :wx], win[:hy, :wx, None], out=scratch[:hy, :wx])
            acc[r0:r0 + hy, x0:x0 + wx] += scratch[:hy, :wx]
            wsum[r0:r0 + hy, x0:x0 + wx] += win[:hy, :wx]

    pending = None
    n_batches = 0
    for b in range(0, len(tiles), tile_batch):
        batch = tiles[b:b + tile_batch]
        result = probs_fn(assemble(batch))  # dispatched asynchronously: overlaps the host work below
        n_batches += 1
        if pending is not None:
            consume(*pending)
        pending = (batch, result)
    consume(*pending)
    flush(h)

    if stats is not None:
        stats.update({"tiles": len(tiles), "batches": n_batches, "band_rows": state["acc"].shape[0],
                      "max_rows_held": state["held"],
                      "accumulator_bytes": state["acc"].nbytes + state["wsum"].nbytes,
                      "step": plan["step"], "overlap": plan["overlap"], "margin": plan["margin"],
                      "grid": (len(rows), len(cols))})
    return state["out"]


def make_probs_fn(apply_fn: Callable, variables, scales: Sequence[float] = (1.0,), flip: bool = False,
                  task: str = "segmentation", rule: str = "mean-probs") -> Callable:
    """A jitted tile-batch -> probabilities function for `predict_tiled`, from `segjax.inference.predict_probs`.

    The variables are an argument of the jitted function (not constants baked into it); multi-scale and
    flip averaging then happen per tile.
    """
    import jax

    from segjax.inference import predict_probs

    fn = jax.jit(lambda v, x: predict_probs(apply_fn, v, x, scales=scales, flip=flip, task=task, rule=rule))
    return lambda x: fn(variables, x)
