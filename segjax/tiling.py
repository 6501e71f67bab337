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
- **Row bands.** `BandAccumulator` blends on the host in a band of `th` rows x the image width (float32
  sums plus weights). Tiles come in raster order; the first tile of a new row of tiles finishes the
  rows above it, which `finished_rows()` hands back normalised, and the band moves down.
  `iter_tiled_probs` yields those bands top to bottom (what `segjax predict --tile` writes its outputs
  from); `predict_tiled` collects them into one array (or `out`, e.g. an `np.memmap`). Host memory is
  the band plus two batches, device memory two batches, whatever the image height.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator, Sequence

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


class BandAccumulator:
    """Blends tile probabilities into a band of `th` image rows and hands back the rows no later tile reaches.

    Used like a metric: `add(probs, where)` for every tile, in raster order, and `finished_rows()`
    whenever the caller wants what is complete so far. Adding the first tile of a new row of tiles
    finishes every image row above it (they are normalised by the summed window weights and the
    band moves down); adding the grid's last tile finishes the rest. Memory: float32 sums and
    weights of `th` x W, whatever the image height.
    """

    def __init__(self, plan: dict, image_size: Sequence[int], channels: int, window: str = "gaussian"):
        (th, tw), (oy, ox), (my, mx) = plan["tile"], plan["overlap"], plan["margin"]
        self.height, self.width = int(image_size[0]), int(image_size[1])
        self.tile, self.last = (th, tw), (plan["rows"][-1], plan["cols"][-1])
        self._win_y = {k: window_1d(th, oy, my, window, *k) for k in _border_flags(plan["rows"])}
        self._win_x = {k: window_1d(tw, ox, mx, window, *k) for k in _border_flags(plan["cols"])}
        self._windows: dict = {}
        self.sums = np.zeros((th, self.width, channels), np.float32)
        self.weights = np.zeros((th, self.width), np.float32)
        self._scratch = np.empty((th, tw, channels), np.float32)
        self.top, self.remaining, self.max_rows_held = 0, len(plan["rows"]) * len(plan["cols"]), 0
        self._ready: list = []

    def window(self, y0: int, x0: int) -> np.ndarray:
        key = ((y0 == 0, y0 == self.last[0]), (x0 == 0, x0 == self.last[1]))
        if key not in self._windows:
            self._windows[key] = np.outer(self._win_y[key[0]], self._win_x[key[1]]).astype(np.float32)
        return self._windows[key]

    def add(self, probs: np.ndarray, where: tuple[int, int]) -> None:
        """Blend one tile's (th, tw, C) probabilities, whose top-left pixel is `where` = (y0, x0)."""
        y0, x0 = where
        if self.remaining <= 0 or y0 < self.top:
            raise ValueError(f"tile at {where}: tiles must be added once each, row by row (raster order)")
        if y0 > self.top:  # a new row of tiles: every image row above it is complete
            self._finish(y0)
        hy, wx = min(self.tile[0], self.height - y0), min(self.tile[1], self.width - x0)
        win = self.window(y0, x0)
        np.multiply(probs[:hy, :wx], win[:hy, :wx, None], out=self._scratch[:hy, :wx])
        self.sums[:hy, x0:x0 + wx] += self._scratch[:hy, :wx]
        self.weights[:hy, x0:x0 + wx] += win[:hy, :wx]
        self.max_rows_held = max(self.max_rows_held, hy)
        self.remaining -= 1
        if self.remaining == 0:
            self._finish(self.height)

    def _finish(self, upto: int) -> None:
        k, th = upto - self.top, self.tile[0]
        self._ready.append((self.top, self.sums[:k] / self.weights[:k, :, None]))
        self.sums[:th - k] = self.sums[k:]
        self.sums[th - k:] = 0.0
        self.weights[:th - k] = self.weights[k:]
        self.weights[th - k:] = 0.0
        self.top = upto

    def finished_rows(self) -> tuple[int, np.ndarray] | None:
        """(top, float32 (k, W, C) probabilities of image rows top .. top + k - 1) finished since the last
        call, or None when no row has been finished since."""
        if not self._ready:
            return None
        top = self._ready[0][0]
        rows = self._ready[0][1] if len(self._ready) == 1 else np.concatenate([r for _, r in self._ready])
        self._ready.clear()
        return top, rows

    @property
    def nbytes(self) -> int:
        return self.sums.nbytes + self.weights.nbytes


def _border_flags(starts: list) -> set:
    return {(i == 0, i == len(starts) - 1) for i in range(len(starts))}


class _TileReader:
    """Tiles of an (H, W, channels) image read one row of tiles at a time: the rows a row of tiles covers
    (reflected past the bottom border) are read once, as one slice `image[a:b]`, so an image object
    that reads rows from a file on demand (np.memmap, `segjax.imagefiles`) works as well as an array."""

    def __init__(self, image, plan: dict, pad: str, mean, std):
        self.image, self.plan, self.pad, self.mean, self.std = image, plan, pad, mean, std
        self.height, self.width = image.shape[:2]
        self._band_top, self._band = None, None

    def tile(self, y0: int, x0: int) -> np.ndarray:
        (th, tw), h, w = self.plan["tile"], self.height, self.width
        if self._band_top != y0:
            ri = _indices(y0, th, h)
            lo, hi = (ri.start, ri.stop) if isinstance(ri, slice) else (int(ri.min()), int(ri.max()) + 1)
            rows = np.asarray(self.image[lo:hi])
            self._band = rows if isinstance(ri, slice) else rows[ri - lo]
            self._band_top = y0
        ci = _indices(x0, tw, w)
        part = np.asarray(self._band[:, ci], np.float32)
        if self.mean is not None:
            part = (part / 255.0 - self.mean) / self.std
        if self.pad == "zero":
            part[min(th, h - y0):] = 0.0
            part[:, min(tw, w - x0):] = 0.0
        return part

    def batch(self, where: list, tile_batch: int) -> np.ndarray:
        th, tw = self.plan["tile"]
        x = np.zeros((tile_batch, th, tw, self.image.shape[2]), np.float32)
        for slot, (y0, x0) in enumerate(where):
            x[slot] = self.tile(y0, x0)
        return x


def _checked(image, tile, overlap, tile_batch, window, output_stride, margin, pad, mean, std):
    """The plan and the normalised options of a tiled prediction, or a SegjaxError saying what to fix."""
    if getattr(image, "ndim", None) != 3:
        raise SegjaxError(f"image of shape {getattr(image, 'shape', None)}: pass one (height, width, "
                          "channels) array")
    plan = plan_tiles(image.shape[:2], tile, overlap, output_stride, margin)
    if int(tile_batch) != tile_batch or tile_batch < 1:
        raise SegjaxError(f"tile batch {tile_batch!r}: give a positive integer")
    if window not in WINDOWS:
        raise SegjaxError(f"window {window!r}: use one of {', '.join(WINDOWS)}")
    if pad not in PADS:
        raise SegjaxError(f"pad {pad!r}: use one of {', '.join(PADS)}")
    if (mean is None) != (std is None):
        raise SegjaxError("pass both mean and std (raw 0-255 image) or neither (already normalised image)")
    if mean is not None:
        mean, std = np.asarray(mean, np.float32).reshape(-1), np.asarray(std, np.float32).reshape(-1)
    return plan, int(tile_batch), mean, std


def iter_tiled_probs(probs_fn: Callable, image, tile=(512, 512), overlap: float = 0.25, tile_batch: int = 4,
                     window: str = "gaussian", num_classes: int | None = None, *, output_stride=1,
                     margin: int | None = None, pad: str = "reflect", mean=None, std=None,
                     stats: dict | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Yields (top, probs): float32 (k, W, C) probabilities of image rows top .. top + k - 1, from the top
    of the image to its bottom, as the row bands finish. Arguments as `predict_tiled`; the options are
    checked before the first band is computed (SegjaxError)."""
    plan, tile_batch, mean, std = _checked(image, tile, overlap, tile_batch, window, output_stride, margin,
                                           pad, mean, std)
    return _tiled_bands(probs_fn, image, plan, tile_batch, window, num_classes, pad, mean, std, stats)


def _tiled_bands(probs_fn, image, plan, tile_batch, window, num_classes, pad, mean, std, stats):
    reader, (th, tw) = _TileReader(image, plan, pad, mean, std), plan["tile"]
    where = [(y0, x0) for y0 in plan["rows"] for x0 in plan["cols"]]
    acc, pending, n_batches = None, None, 0
    for b in range(0, len(where) + tile_batch, tile_batch):
        batch = where[b:b + tile_batch]
        # Dispatched asynchronously: the device works on this batch while the host blends the previous one.
        result = probs_fn(reader.batch(batch, tile_batch)) if batch else None
        n_batches += bool(batch)
        if pending is not None:
            p = np.asarray(pending[1])
            if p.ndim != 4 or p.shape[:3] != (tile_batch, th, tw):
                raise SegjaxError(f"probs_fn returned shape {p.shape} for tiles of shape "
                                  f"{(tile_batch, th, tw, image.shape[2])}; it must keep the batch, height and width")
            if num_classes is not None and p.shape[3] != num_classes:
                raise SegjaxError(f"probs_fn returned {p.shape[3]} channels but num_classes / out say {num_classes}")
            acc = acc or BandAccumulator(plan, image.shape[:2], p.shape[3], window)
            for slot, yx in enumerate(pending[0]):
                acc.add(p[slot], yx)
            done = acc.finished_rows()
            if done is not None:
                yield done
        pending = (batch, result) if batch else None
    if stats is not None:
        stats.update({"tiles": len(where), "batches": n_batches, "band_rows": acc.sums.shape[0],
                      "max_rows_held": acc.max_rows_held, "accumulator_bytes": acc.nbytes,
                      "step": plan["step"], "overlap": plan["overlap"], "margin": plan["margin"],
                      "grid": (len(plan["rows"]), len(plan["cols"]))})


def predict_tiled(probs_fn: Callable, image: np.ndarray, tile=(512, 512), overlap: float = 0.25,
                  tile_batch: int = 4, window: str = "gaussian", num_classes: int | None = None,
                  out: np.ndarray | None = None, *, output_stride=1, margin: int | None = None,
                  pad: str = "reflect", mean=None, std=None, stats: dict | None = None) -> np.ndarray:
    """(H, W, C) float32 probabilities of `image` (H, W, channels), predicted tile by tile.

    probs_fn: jitted (tile_batch, th, tw, channels) float32 -> (tile_batch, th, tw, C) probabilities;
        it is only ever called with that one shape (see `make_probs_fn`).
    image: already normalised float (mean / std None), or raw 0-255 pixels with `mean`, `std` (per
        channel, of the 0-1 range, e.g. IMAGENET_MEAN / IMAGENET_STD): tiles are then normalised on
        the host as (x / 255 - mean) / std, so the image can stay uint8 (or an np.memmap, or any
        object with `.shape` whose row slices `image[a:b]` give arrays).
    tile: int or (th, tw), multiples of `output_stride` (int or pair; the model's coarsest stride,
        `segjax.analysis.output_stride(model)["feature"]`), no larger than the image.
    overlap: fraction of a tile shared with its neighbour, in [0, 1).
    window: "gaussian" or "linear"; margin: pixels of zero weight at shared tile edges (default overlap // 4).
    pad: "reflect" (default) or "zero": how a tile reaching past the bottom / right border is filled.
    num_classes: C when known (checked against probs_fn's output); out: an (H, W, C) array to write
        into (e.g. an np.memmap), else a new float32 array. `iter_tiled_probs` yields the same
        probabilities band by band instead, for outputs that need not hold the whole image.
    stats: a dict filled with the grid and band figures ("tiles", "batches", "band_rows",
        "max_rows_held", "accumulator_bytes", "step", "overlap", "margin", "grid").
    """
    h, w = getattr(image, "shape", (0, 0))[:2]
    if out is not None:
        if out.ndim != 3 or out.shape[:2] != (h, w) or (num_classes is not None and out.shape[2] != num_classes):
            want = f"({h}, {w}, {num_classes if num_classes is not None else 'C'})"
            raise SegjaxError(f"out has shape {out.shape}; it must be {want} for this image")
        num_classes = out.shape[2] if num_classes is None else num_classes
    bands = iter_tiled_probs(probs_fn, image, tile, overlap, tile_batch, window, num_classes,
                             output_stride=output_stride, margin=margin, pad=pad, mean=mean, std=std, stats=stats)
    for top, probs in bands:
        if out is None:
            out = np.empty((h, w, probs.shape[2]), np.float32)
        out[top:top + len(probs)] = probs
    return out


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
