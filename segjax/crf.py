"""DeepLab's fully connected CRF (Krähenbühl & Koltun, 2011) as pydensecrf computes it, in pure JAX.

The model is pydensecrf's `DenseCRF2D` as the DeepLab reproductions set it up
(`unary_from_softmax`, `addPairwiseGaussian(sxy=pos_xy_std, compat=pos_w)`,
`addPairwiseBilateral(sxy=bi_xy_std, srgb=bi_rgb_std, rgbim=image, compat=bi_w)`, `inference(iterations)`):

    unary        U_i(l) = -log(max(p_i(l), 1e-5))
    smoothness   k_g(i, j) = exp(-|x_i - x_j|^2 / (2 pos_xy_std^2))                  weight pos_w
    appearance   k_b(i, j) = exp(-|x_i - x_j|^2 / (2 bi_xy_std^2) - |I_i - I_j|^2 / (2 bi_rgb_std^2))   weight bi_w

with x the pixel's (column, row) and I its RGB value (0-255). Potts compatibility; each kernel is applied
with pydensecrf's default NORMALIZE_SYMMETRIC,

    K̃ Q = n ⊙ K (n ⊙ Q),    n_i = 1 / sqrt((K 1)_i + 1e-20),

where K's sums run over every pixel, i itself included. Mean-field inference (`DenseCRF::inference`):

    Q = softmax(-U);   `iterations` times:   Q = softmax(-U + pos_w K̃_g Q + bi_w K̃_b Q).

The smoothness kernel K_g depends only on the pixel grid, so it is computed exactly: a Gaussian is separable,
so K_g Q is one 1-D filter along the columns and one along the rows, truncated at 4 pos_xy_std (pixels
further away weigh less than exp(-8)); n_g comes from the same filter. pydensecrf approximates it with a
lattice too; the labels still agree with its on at least 99% of pixels (measured in docs/crf.md).

The appearance kernel K_b is pydensecrf's permutohedral-lattice filter (Adams, Baek & Davis, 2010), built as
its `Permutohedral` builds it, so that the labels agree with pydensecrf's and not only with the exact Gaussian:
- each feature vector f (d values: x/σ, y/σ[, r/σ, g/σ, b/σ]) is elevated onto the plane sum = 0 of
  R^{d+1}, scaled by sqrt(2/3) (d+1) / sqrt((k+1)(k+2)) per axis k;
- its enclosing simplex is found by rounding to the nearest multiple of d+1 and ranking the remainders;
  its d+1 corners are lattice points, weighted by the barycentric coordinates;
- splat (sum the weighted values onto the lattice points), blur along each of the d+1 lattice directions
  with the kernel [1/2, 1, 1/2] (a missing neighbour counts as zero), slice (the weighted sum back at
  each pixel) times alpha = 1 / (1 + 2^-d).
The overall scale of the filter cancels in the symmetric normalisation.

Static shapes: a pixel's d+1 corners give N (d+1) candidate lattice points for N pixels, which is the
capacity. They are made unique by one sort on (32-bit hash, key); a point's blur neighbours are found by
binary search on the hash, each hit checked against the full key (d = 2 keys are their own hash). The
lattice is built once per image; an iteration is then one segment sum (splat), 2 (d+1) row gathers (blur)
and one gather (slice) per kernel, over (lattice points, classes) arrays.

`dense_crf_exact` is the same mean field with exact dense Gaussians, O(N^2) memory: the oracle the lattice
and the separable filter are tested against, for small images.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from segjax import tasks
from segjax.errors import SegjaxError

# kazuto1011/deeplab-pytorch's values (configs/voc12.yaml and cocostuff*.yaml, CRF section): the generic default.
DEFAULTS = {"iterations": 10, "pos_w": 3.0, "pos_xy_std": 1.0, "bi_w": 4.0, "bi_xy_std": 67.0, "bi_rgb_std": 3.0}
PARAMS = tuple(DEFAULTS)
UNARY_CLIP = 1e-5  # pydensecrf.utils.unary_from_softmax's clip
# The values each converted reproduction evaluated its with-CRF row with; `segjax convert` writes them to segjax.json.
KAZUTO_VOC = dict(DEFAULTS)  # kazuto1011/deeplab-pytorch DeepLab v2: 76.65 -> 77.93 mIoU, VOC12 val
LARGEFOV_PORT = {"iterations": 10, "pos_w": 3.0, "pos_xy_std": 3.0, "bi_w": 5.0, "bi_xy_std": 140.0,
                 "bi_rgb_std": 5.0}  # wangleihitcs/DeepLab-V1-PyTorch main.py: 65.44 -> 69.60 mIoU, VOC12 val
_CANDIDATES = 3  # lattice points compared per hash lookup: a miss needs 4 points sharing one 32-bit hash


def dense_crf(image, probs, *, iterations=10, pos_w=3.0, pos_xy_std=1.0, bi_w=4.0, bi_xy_std=67.0,
              bi_rgb_std=3.0) -> jax.Array:
    """Refined probabilities, (H, W, C) float32, from uint8 RGB `image` (H, W, 3) and softmax `probs` (H, W, C).

    Jittable and vmappable (batch with `jax.vmap`); under `jit` the parameters may be traced values, and
    are checked only where they are concrete. See the module docstring for the model and its numerics.
    """
    probs = _check(image, probs, dict(iterations=iterations, pos_w=pos_w, pos_xy_std=pos_xy_std, bi_w=bi_w,
                                      bi_xy_std=bi_xy_std, bi_rgb_std=bi_rgb_std))
    h, w, c = probs.shape
    bilateral = jnp.concatenate([_pixel_grid(h, w, bi_xy_std), _colours(image, bi_rgb_std)], axis=1)
    kernels = [(pos_w, _separable_kernel(h, w, pos_xy_std)), (bi_w, _lattice_kernel(bilateral))]
    q = mean_field(_unary(probs.reshape(h * w, c)), kernels, iterations)
    return q.reshape(h, w, c)


def dense_crf_exact(image, probs, *, iterations=10, pos_w=3.0, pos_xy_std=1.0, bi_w=4.0, bi_xy_std=67.0,
                    bi_rgb_std=3.0) -> jax.Array:
    """`dense_crf` with exact Gaussian kernels as dense (N, N) matrices: the oracle, for small images only."""
    probs = _check(image, probs, dict(iterations=iterations, pos_w=pos_w, pos_xy_std=pos_xy_std, bi_w=bi_w,
                                      bi_xy_std=bi_xy_std, bi_rgb_std=bi_rgb_std))
    h, w, c = probs.shape
    kernels = [(pos_w, _exact_kernel(_pixel_grid(h, w, pos_xy_std))),
               (bi_w, _exact_kernel(jnp.concatenate([_pixel_grid(h, w, bi_xy_std), _colours(image, bi_rgb_std)], 1)))]
    return mean_field(_unary(probs.reshape(h * w, c)), kernels, iterations).reshape(h, w, c)


def mean_field(unary, kernels, iterations) -> jax.Array:
    """pydensecrf's DenseCRF::inference: Q = softmax(-U), then `iterations` times
    Q = softmax(-U + sum over kernels of weight * K̃ Q). kernels: [(weight, K̃: (N, C) -> (N, C))]."""
    def update(_, q):
        message = -unary
        for weight, apply in kernels:
            message = message + weight * apply(q)
        return jax.nn.softmax(message, axis=-1)
    return lax.fori_loop(0, iterations, update, jax.nn.softmax(-unary, axis=-1))


def _unary(probs):
    return -jnp.log(jnp.clip(probs.astype(jnp.float32), UNARY_CLIP, 1.0))


def _divided(n, std):
    """float32 arange(n) / std, correctly rounded as pydensecrf's `i / sx`: numpy divides when std is concrete
    (XLA's CPU division can be an ulp off, which moves points that sit on a lattice boundary); a traced std
    divides in XLA."""
    if isinstance(std, jax.core.Tracer):
        return jnp.arange(n, dtype=jnp.float32) / jnp.asarray(std, jnp.float32)
    return jnp.asarray(np.arange(n, dtype=np.float32) / np.float32(std))


def _pixel_grid(h, w, std):
    """(H W, 2) float32 (column / std, row / std) of each pixel in row-major order: DenseCRF2D's features."""
    cols, rows = _divided(w, std), _divided(h, std)
    return jnp.stack([jnp.broadcast_to(cols[None, :], (h, w)).ravel(),
                      jnp.broadcast_to(rows[:, None], (h, w)).ravel()], axis=1)


def _colours(image, std):
    """(H W, 3) float32 RGB / std."""
    return _divided(256, std)[image.reshape(-1, 3).astype(jnp.int32)]


def _symmetric(filter_fn, n_pixels):
    """K̃ Q = n ⊙ K(n ⊙ Q) with n = 1 / sqrt(K 1 + 1e-20): pydensecrf's NORMALIZE_SYMMETRIC."""
    norm = lax.rsqrt(filter_fn(jnp.ones((n_pixels, 1), jnp.float32))[:, 0] + 1e-20)[:, None]
    return lambda q: norm * filter_fn(norm * q)


def _exact_kernel(features):
    sq = jnp.sum(features * features, axis=1)
    dist2 = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * features @ features.T, 0.0)
    k = jnp.exp(-0.5 * dist2)
    return _symmetric(lambda v: jnp.dot(k, v, precision=lax.Precision.HIGHEST), features.shape[0])


def _separable_kernel(h, w, std):
    """The smoothness kernel on the (H, W) pixel grid as an exact Gaussian, one 1-D filter along the columns and
    one along the rows, applied to (H W, C) values, symmetrically normalised. A concrete std gives
    2 ceil(4 std) + 1 taps (the pixels beyond 4 std weigh less than exp(-8) and are left out), summed as shifted
    copies; a traced std (its tap count unknown when tracing) multiplies by the dense (H, H) and (W, W)
    Gaussian matrices instead."""
    if isinstance(std, jax.core.Tracer):
        def gaussian_matrix(n):
            offsets = jnp.arange(n, dtype=jnp.float32)
            return jnp.exp(-0.5 * jnp.square((offsets[:, None] - offsets[None, :]) / std))
        ky, kx = gaussian_matrix(h), gaussian_matrix(w)

        def filter_grid(grid):
            grid = jnp.einsum("ij,jwc->iwc", ky, grid, precision=lax.Precision.HIGHEST)
            return jnp.einsum("ij,hjc->hic", kx, grid, precision=lax.Precision.HIGHEST)
    else:
        def taps(n):
            radius = min(math.ceil(4.0 * float(std)), n - 1)
            return np.exp(-0.5 * np.square(np.arange(-radius, radius + 1) / float(std))).astype(np.float32)
        ty, tx = taps(h), taps(w)

        def filter_grid(grid):
            return _shifted_sum(_shifted_sum(grid, ty, 0), tx, 1)

    def apply(values):
        return filter_grid(values.reshape(h, w, -1)).reshape(h * w, -1)
    return _symmetric(apply, h * w)


def _shifted_sum(grid, taps, axis):
    """sum_k taps[k] grid[. + k - r] along `axis` (r = len(taps) // 2), zero beyond the edges."""
    radius, n = len(taps) // 2, grid.shape[axis]
    padding = [(0, 0)] * grid.ndim
    padding[axis] = (radius, radius)
    padded = jnp.pad(grid, padding)
    out = None
    for k, tap in enumerate(taps):
        term = np.float32(tap) * lax.slice_in_dim(padded, k, k + n, axis=axis)
        out = term if out is None else out + term
    return out


def _lattice_kernel(features):
    """pydensecrf's SSE path elevates pixels four at a time and also inserts the lattice points of its zero
    padding lanes (feature vector 0) when N is not a multiple of 4; they take no value but relay the blur,
    so the same zero rows are added here."""
    n = features.shape[0]
    padded = jnp.pad(features, ((0, -n % 4), (0, 0)))
    lattice = build_lattice(padded)

    def apply(values):
        return lattice_filter(lattice, jnp.pad(values, ((0, -n % 4), (0, 0))))[:n]
    return _symmetric(apply, n)


# ------------------------------------------------------------------------------------- the lattice

class Lattice(NamedTuple):
    """A permutohedral lattice over N feature vectors of dimension d, with capacity P = N (d+1) points."""
    vertex: jax.Array        # (N, d+1) int32: the lattice point at each corner of each pixel's simplex
    barycentric: jax.Array   # (N, d+1) float32: the splat weights
    neighbours: jax.Array    # (d+1, 2, P+1) int32: each point's two neighbours per direction; P = none


def build_lattice(features: jax.Array) -> Lattice:
    """pydensecrf's Permutohedral::init for features (N, d) float32 (already divided by their std)."""
    n, d = features.shape
    elevated = _elevate(features)
    rem0, rank, barycentric = _enclosing_simplex(elevated)
    keys = _corner_keys(rem0, rank).reshape(n * (d + 1), d)
    vertex, table_hash, table_words, count = _unique_points(keys)
    neighbours = _blur_neighbours(table_hash, table_words, count, d)
    return Lattice(vertex.reshape(n, d + 1), barycentric, neighbours)


def lattice_filter(lattice: Lattice, values: jax.Array) -> jax.Array:
    """Splat (N, C) values onto the lattice, blur along each direction with [1/2, 1, 1/2], slice back x alpha."""
    n, c = values.shape
    d = lattice.vertex.shape[1] - 1
    capacity = lattice.neighbours.shape[-1]  # P + 1: the last row is the zero every missing neighbour reads
    corners = lattice.vertex.reshape(-1)
    grid = jax.ops.segment_sum((lattice.barycentric[:, :, None] * values[:, None, :]).reshape(-1, c), corners,
                               num_segments=capacity)
    for direction in range(d + 1):
        before, after = lattice.neighbours[direction]
        grid = grid + 0.5 * (grid[before] + grid[after])
    alpha = 1.0 / (1.0 + 2.0 ** -d)
    weights = (lattice.barycentric * np.float32(alpha))[:, :, None]
    return jnp.sum(weights * grid[corners].reshape(n, d + 1, c), axis=1)


def _elevate(features):
    """Permutohedral::init's elevation E f onto the plane sum = 0 of R^{d+1}, in its float32 order."""
    d = features.shape[1]
    inv_std = np.float32(math.sqrt(2.0 / 3.0) * (d + 1))
    scale = [np.float32(1.0 / math.sqrt((k + 2) * (k + 1)) * float(inv_std)) for k in range(d)]
    running = jnp.zeros(features.shape[:1], jnp.float32)
    elevated = [None] * (d + 1)
    for j in range(d, 0, -1):
        cf = features[:, j - 1] * scale[j - 1]
        elevated[j] = running - np.float32(j) * cf
        running = running + cf
    elevated[0] = running
    return jnp.stack(elevated, axis=1)


def _enclosing_simplex(elevated):
    """The nearest remainder-0 lattice point rem0, the rank of each coordinate's remainder and the
    barycentric weights of the simplex's d+1 corners: Permutohedral::init's SSE path, vectorised."""
    d = elevated.shape[1] - 1
    down = np.float32(1.0 / (d + 1))
    v = jnp.round(elevated * down)  # round half to even, as _mm_cvtps_epi32 under the default rounding mode
    rem0 = v * np.float32(d + 1)
    total = jnp.sum(v, axis=1, keepdims=True).astype(jnp.int32)
    remainder = elevated - rem0
    less = remainder[:, :, None] < remainder[:, None, :]  # less[:, i, j]: coordinate i below coordinate j
    upper = jnp.triu(jnp.ones((d + 1, d + 1), bool), 1)
    # rank[i] = #{j > i: r_i < r_j} + #{j < i: not r_j < r_i}: ties go to the lower index, as in pydensecrf
    rank = jnp.sum(less & upper, axis=2) + jnp.sum(~less & upper, axis=1)
    rank = rank.astype(jnp.int32) + total
    wrap = jnp.where(rank < 0, d + 1, 0) - jnp.where(rank > d, d + 1, 0)
    rank, rem0 = rank + wrap, rem0 + wrap.astype(jnp.float32)
    v = (elevated - rem0) * down
    slots = jax.nn.one_hot(d - rank, d + 2, dtype=jnp.float32) - jax.nn.one_hot(d - rank + 1, d + 2, dtype=jnp.float32)
    b = jnp.sum(v[:, :, None] * slots, axis=1)  # each slot gets at most one + and one - term: exact
    b = b.at[:, 0].add(1.0 + b[:, d + 1])
    return rem0.astype(jnp.int32), rank, b[:, : d + 1]


def _corner_keys(rem0, rank):
    """(N, d+1, d) int32: the first d coordinates of each corner (remainder r = 0..d) of each simplex,
    rem0 + canonical[r][rank] with canonical[r][k] = r for k <= d - r, else r - (d + 1)."""
    d = rem0.shape[1] - 1
    r = jnp.arange(d + 1, dtype=jnp.int32)[None, :, None]
    rank = rank[:, None, :d]
    return rem0[:, None, :d] + r - jnp.where(rank > d - r, d + 1, 0)


def _pack(keys):
    """Keys (..., d) int -> (..., ceil(d/2)) uint32 words of two 16-bit coordinates (pydensecrf keys are shorts)."""
    d = keys.shape[-1]
    low = keys.astype(jnp.uint32) & 0xFFFF
    if d % 2:
        low = jnp.concatenate([low, jnp.zeros(low.shape[:-1] + (1,), jnp.uint32)], axis=-1)
    return low[..., 0::2] | (low[..., 1::2] << 16)


def _unpack(words, d):
    halves = jnp.stack([words & 0xFFFF, words >> 16], axis=-1).reshape(words.shape[:-1] + (-1,))[..., :d]
    return halves.astype(jnp.uint16).astype(jnp.int16).astype(jnp.int32)


def _hash(words):
    """A 32-bit hash of the key words; a single word (d = 2) is its own hash, so lookups are exact."""
    if words.shape[-1] == 1:
        return words[..., 0]
    h = jnp.zeros(words.shape[:-1], jnp.uint32)
    for k in range(words.shape[-1]):
        h = _mix(h ^ (words[..., k] * np.uint32(0xCC9E2D51)) ^ np.uint32(k))
    return h


def _mix(h):
    """murmur3's 32-bit finaliser."""
    h = h ^ (h >> 16)
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _unique_points(keys):
    """Lattice point ids by sorting the P candidate keys on (hash, key words): ids follow that order, so the
    table of distinct points (hash, words; padded to P with hash 2^32 - 1) is sorted by hash."""
    p, d = keys.shape
    words = _pack(keys)
    h = _hash(words)
    columns = [h] + [words[:, k] for k in range(words.shape[1])] if words.shape[1] > 1 else [h]
    *sorted_keys, order = lax.sort(columns + [jnp.arange(p, dtype=jnp.int32)], num_keys=len(columns))
    changed = jnp.zeros(p - 1, bool)
    for column in sorted_keys:
        changed = changed | (column[1:] != column[:-1])
    ids = jnp.cumsum(jnp.concatenate([jnp.ones(1, jnp.int32), changed.astype(jnp.int32)]))
    ids = ids - 1
    vertex = jnp.zeros(p, jnp.int32).at[order].set(ids, unique_indices=True)
    table_hash = jnp.full(p, 0xFFFFFFFF, jnp.uint32).at[ids].set(sorted_keys[0])
    sorted_words = jnp.stack(sorted_keys[1:] if len(sorted_keys) > 1 else sorted_keys, axis=1)
    table_words = jnp.zeros((p, words.shape[1]), jnp.uint32).at[ids].set(sorted_words)
    return vertex, table_hash, table_words, ids[-1] + 1


def _blur_neighbours(table_hash, table_words, count, d):
    """(d+1, 2, P+1) int32: for each point and direction j, the points key + (d+1) e_j - 1 and key - (d+1) e_j + 1
    (coordinate j of d+1 means all d stored coordinates - 1), or P where the lattice has none."""
    p = table_hash.shape[0]
    coords = _unpack(table_words, d)
    rows = jnp.arange(p, dtype=jnp.int32)
    out = []
    for j in range(d + 1):
        query = coords - 1
        if j < d:
            query = query.at[:, j].add(d + 1)
        ahead = jnp.where(rows < count, _lookup(table_hash, table_words, count, _pack(query)), p)
        behind = jnp.full(p + 1, p, jnp.int32).at[jnp.where(ahead < p, ahead, p + 1)].set(rows, mode="drop")
        out.append(jnp.stack([jnp.append(ahead, p), behind]))
    return jnp.stack(out)


def _lookup(table_hash, table_words, count, words):
    """Index of each key `words` in the table, or P: binary search on the hash, then the full key compared on
    the first _CANDIDATES entries with that hash (one for d = 2, whose hash is the key)."""
    p = table_hash.shape[0]
    h = _hash(words)
    first = jnp.searchsorted(table_hash, h, side="left").astype(jnp.int32)
    found = jnp.full(h.shape, p, jnp.int32)
    for k in reversed(range(1 if words.shape[-1] == 1 else _CANDIDATES)):
        at = jnp.minimum(first + k, p - 1)
        same = (first + k < count) & (table_hash[at] == h) & jnp.all(table_words[at] == words, axis=-1)
        found = jnp.where(same, at, found)
    return found


# ------------------------------------------------------------------------------------- tools' use

def resolve_params(saved: dict | None = None, **overrides) -> dict:
    """The CRF values a run uses: a checkpoint's own (segjax.json "crf"), else DEFAULTS, each replaced by an
    override that is not None; all checked."""
    params = {**DEFAULTS, **{k: v for k, v in (saved or {}).items() if k in DEFAULTS}}
    unknown = sorted(set(overrides) - set(DEFAULTS))
    if unknown:
        raise SegjaxError(f"unknown CRF parameter {unknown[0]!r}; the parameters are {', '.join(PARAMS)}")
    params.update({k: v for k, v in overrides.items() if v is not None})
    for name, value in params.items():
        _check_param(name, value)
    params = {k: float(v) for k, v in params.items()}
    params["iterations"] = int(params["iterations"])
    return params


def describe(params: dict) -> str:
    return " ".join(f"{k}={params[k]:g}" for k in PARAMS)


def check_usable(task, model: str, tile) -> None:
    """The CRF refines whole-image class probabilities: refuse saliency models (a Task, or its name) and
    tiled inference."""
    if not tasks.get(task).labels_are_classes:
        raise SegjaxError(f"--crf: {model} is a saliency model (one foreground channel); the CRF refines the "
                          "class probabilities of segmentation models; drop --crf")
    if tile is not None:
        raise SegjaxError("--crf with --tile: the fully connected CRF links every pixel to every other, so it needs "
                          "the whole image's probabilities at once; drop --tile (or --crf)")


def refiner(params: dict):
    """jit-compiled (uint8 image (H, W, 3), probs (H, W, C)) -> refined probs, with `params` fixed."""
    return jax.jit(functools.partial(dense_crf, **params))


def image_uint8(normalised, mean, std) -> np.ndarray:
    """The uint8 RGB image back from a normalised float one ((x / 255 - mean) / std)."""
    x = np.asarray(normalised, np.float32) * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------- checks

def _check(image, probs, params) -> jax.Array:
    """probs as float32 after the shape, dtype and parameter checks (parameters only where concrete)."""
    shape = tuple(np.shape(image))
    if len(shape) != 3 or shape[2] != 3:
        raise SegjaxError(f"CRF image of shape {shape}: expected (height, width, 3) RGB; convert grey with "
                          "np.repeat(img[..., None], 3, -1) or drop alpha with img[..., :3]")
    dtype = np.dtype(image.dtype if hasattr(image, "dtype") else np.asarray(image).dtype)
    if dtype != np.uint8:
        raise SegjaxError(f"CRF image of dtype {dtype}: expected uint8 RGB (0-255); convert a [0, 1] float image "
                          "with np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)")
    pshape = tuple(np.shape(probs))
    if len(pshape) != 3 or pshape[:2] != shape[:2]:
        raise SegjaxError(f"CRF probabilities of shape {pshape} for an image of {shape[0]}x{shape[1]}: expected "
                          f"({shape[0]}, {shape[1]}, classes), the probabilities at the image's size")
    if pshape[2] < 2:
        raise SegjaxError(f"CRF probabilities with {pshape[2]} channel: expected one per class (at least 2); "
                          "for a foreground probability p pass np.stack([1 - p, p], -1)")
    for name, value in params.items():
        _check_param(name, value)
    return jnp.asarray(probs, jnp.float32)


def _check_param(name, value):
    if isinstance(value, jax.core.Tracer):
        return
    v = np.asarray(value)
    if v.shape != () or not np.isfinite(v):
        raise SegjaxError(f"CRF {name}={value!r}: expected a finite number")
    if name == "iterations" and (v != int(v) or v < 1):
        raise SegjaxError(f"CRF iterations={value!r}: expected a whole number >= 1")
    if name.endswith("_std") and v <= 0:
        raise SegjaxError(f"CRF {name}={value!r}: a standard deviation must be > 0")
    if name.endswith("_w") and v < 0:
        raise SegjaxError(f"CRF {name}={value!r}: a kernel weight must be >= 0 (0 turns the kernel off)")
