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
lattice too; the labels still agree with pydensecrf's on at least 99% of pixels (docs/crf.md).

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
capacity. The lattice is held in d+1 layouts, one per blur direction j, each listing the points line by line
along j (sorted on the coordinates that stay the same along the line, then on the step along it), so that a
point's two neighbours in that direction are the rows beside it. Sorting the candidates into layout 0 makes
them unique (equal keys end up side by side); d more sorts give the other layouts. The sorts are radix
sorts of single 64-bit words (_sort_order), and each layout's key leads with a field that the next layouts
share (_line_key), so that moving between layouts gathers within blocks of rows. That is done once per
image; an iteration is then one segment sum (splat), d+1 row gathers that each read a row and the two rows
beside it (blur along one direction, then move to the next layout) and a weighted sum (slice), over
(capacity, classes) arrays, in one chain per group of columns (_column_groups).

`dense_crf_exact` is the same mean field with exact dense Gaussians, O(N^2) memory: the oracle the lattice
and the separable filter are tested against, for small images.
"""
from __future__ import annotations

import functools
import math
import os
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


def dense_crf(image, probs, *, iterations=10, pos_w=3.0, pos_xy_std=1.0, bi_w=4.0, bi_xy_std=67.0,
              bi_rgb_std=3.0) -> jax.Array:
    """Refined probabilities, (H, W, C) float32, from uint8 RGB `image` (H, W, 3) and softmax `probs` (H, W, C).

    Jittable and vmappable (batch with `jax.vmap`); under `jit` the parameters may be traced values, and
    are checked only where they are concrete. See the module docstring for the model and its numerics.

    Under `jax.vmap` on a CPU (parameters concrete), the images of the batch are refined one after another
    inside the compiled program (`lax.map`): every pass of the filter is bound by memory bandwidth, so running
    the batch at once gains nothing there and multiplies the buffers by the batch size (8 images at 375x500:
    4,989 MB of XLA buffers against 594 MB). Other backends batch the operations, as plain vmap does.
    """
    params = dict(iterations=iterations, pos_w=pos_w, pos_xy_std=pos_xy_std, bi_w=bi_w, bi_xy_std=bi_xy_std,
                  bi_rgb_std=bi_rgb_std)
    probs = _check(image, probs, params)
    refine = functools.partial(_dense_crf, **params)
    if any(isinstance(v, jax.core.Tracer) for v in params.values()):
        return refine(image, probs)
    return _one_image_at_a_time_on_cpu(refine)(jnp.asarray(image), probs)


def _dense_crf(image, probs, *, iterations, pos_w, pos_xy_std, bi_w, bi_xy_std, bi_rgb_std):
    h, w, c = probs.shape
    kernels = [(pos_w, _separable_kernel(h, w, pos_xy_std)),
               (bi_w, _lattice_kernel(_bilateral_features(image, bi_xy_std, bi_rgb_std)))]
    q = mean_field(_unary(probs.reshape(h * w, c)), kernels, iterations)
    return q.reshape(h, w, c)


def _one_image_at_a_time_on_cpu(refine):
    """`refine`, whose vmap on a CPU maps over the batch with lax.map (see dense_crf)."""
    batchable = jax.custom_batching.custom_vmap(refine)

    @batchable.def_vmap
    def rule(axis_size, in_batched, *args):
        args = tuple(a if batched else jnp.broadcast_to(a, (axis_size, *a.shape))
                     for a, batched in zip(args, in_batched))
        if jax.default_backend() == "cpu":
            return lax.map(lambda one: refine(*one), args), True
        return jax.vmap(refine)(*args), True
    return batchable


def dense_crf_exact(image, probs, *, iterations=10, pos_w=3.0, pos_xy_std=1.0, bi_w=4.0, bi_xy_std=67.0,
                    bi_rgb_std=3.0) -> jax.Array:
    """`dense_crf` with exact Gaussian kernels as dense (N, N) matrices: the oracle, for small images only."""
    probs = _check(image, probs, dict(iterations=iterations, pos_w=pos_w, pos_xy_std=pos_xy_std, bi_w=bi_w,
                                      bi_xy_std=bi_xy_std, bi_rgb_std=bi_rgb_std))
    h, w, c = probs.shape
    kernels = [(pos_w, _exact_kernel(_pixel_grid(h, w, pos_xy_std))),
               (bi_w, _exact_kernel(_bilateral_features(image, bi_xy_std, bi_rgb_std)))]
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


def _bilateral_features(image, xy_std, rgb_std):
    """(H W, 5) float32 (column, row) / xy_std and RGB / rgb_std of each pixel: the appearance kernel's features."""
    h, w = image.shape[:2]
    return jnp.concatenate([_pixel_grid(h, w, xy_std), _colours(image, rgb_std)], axis=1)


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
    """A permutohedral lattice over N feature vectors of dimension d, with capacity P = N (d+1) points, held in
    d+1 layouts of P rows: layout j lists the points line by line along blur direction j, so that a point's two
    neighbours in that direction, where the lattice has them, are the rows just above and below it. Rows past
    the lattice's points are unused (zero, linked to nothing).

    The filter takes d+1 steps. Step j blurs layout j along direction j (row m plus half of rows m - 1 and
    m + 1 where links[j, :, m] says they are its neighbours) and gathers its output from the result, row r
    from row reads[j, r]: steps 0..d-1 output layout j+1, step d the N (d+1) simplex corners, which the slice
    weighs."""
    splat_rows: jax.Array    # (N, d+1) int32: the layout-0 row of each corner of each pixel's simplex
    barycentric: jax.Array   # (N, d+1) float32: the splat and slice weights
    reads: jax.Array         # (d+1, P) int32
    links: jax.Array         # (d+1, 2, P) bool: [row m - 1 is a neighbour, row m + 1 is] per layout row m


def build_lattice(features: jax.Array) -> Lattice:
    """pydensecrf's Permutohedral::init for features (N, d) float32 (already divided by their std)."""
    n, d = features.shape
    p = n * (d + 1)
    elevated = _elevate(features)
    rem0, rank, barycentric = _enclosing_simplex(elevated)
    keys = _corner_keys(rem0, rank).reshape(p, d).astype(jnp.int16).astype(jnp.int32)  # pydensecrf's short keys
    corners = jnp.concatenate([keys, -jnp.sum(keys, axis=1, keepdims=True)], axis=1)
    rows = jnp.arange(p, dtype=jnp.int32)
    # layout 0: the corners sorted along direction 0's lines; equal keys are one point
    order = _sort_order(_line_key(corners, 0))
    sorted_corners = corners[order]
    changed = jnp.zeros(p - 1, bool)
    for field in _line_key(sorted_corners, 0):
        changed = changed | (field[1:] != field[:-1])
    point = jnp.cumsum(jnp.concatenate([jnp.zeros(1, jnp.int32), changed.astype(jnp.int32)]))
    splat_rows = jnp.zeros(p, jnp.int32).at[order].set(point, unique_indices=True)
    used = rows <= point[-1]
    points = jnp.zeros((p, d + 1), jnp.int32).at[point].set(sorted_corners)  # layout 0's points, by row
    links = [_links(_line_key(points, 0), used)]
    row_in_layout = rows  # the layout-(j-1) row of each layout-0 row
    reads = []
    for j in range(1, d + 1):
        # unused rows (a 1 in the leading bit) sort after every point
        order = _sort_order([(~used).astype(jnp.uint32)] + _line_key(points, j), widths=[1])
        reads.append(row_in_layout[order])
        row_in_layout = jnp.zeros(p, jnp.int32).at[order].set(rows, unique_indices=True)
        links.append(_links(_line_key(points[order], j), used[order]))
    reads.append(row_in_layout[splat_rows])
    return Lattice(splat_rows.reshape(n, d + 1), barycentric, jnp.stack(reads), jnp.stack(links))


def lattice_filter(lattice: Lattice, values: jax.Array) -> jax.Array:
    """Splat (N, C) values onto the lattice, blur along each direction with [1/2, 1, 1/2], slice back x alpha.

    The columns are filtered independently, so on a CPU they are split into _column_groups, each its own chain
    of operations: XLA's CPU runtime runs independent operations at once, which keeps every core busy where a
    single chain's gathers and scatters leave most of them idle (2 cores: a 21-column filter 13-30% faster)."""
    groups = _column_groups(values.shape[1])
    if groups == 1:
        return _lattice_filter_chain(lattice, values)
    return jnp.concatenate([_lattice_filter_chain(lattice, part)
                            for part in jnp.array_split(values, groups, axis=1)], axis=1)


def _column_groups(columns):
    """How many column groups lattice_filter splits C columns into: one per CPU core, each at least 8 columns
    wide; one on other backends, where a single operation already fills the device."""
    if jax.default_backend() != "cpu":
        return 1
    return max(1, min(os.cpu_count() or 1, columns // 8))


def _lattice_filter_chain(lattice, values):
    n, c = values.shape
    d = lattice.splat_rows.shape[1] - 1
    capacity = lattice.links.shape[-1]
    # Two buffers of P + 2 rows take the layouts in turn; rows 0 and P + 1 stay zero (what a missing neighbour
    # reads). Each step is written into rows 1..P of the buffer the step before read, in place: XLA then writes
    # the step out, where it would otherwise fuse it into the next step's gather and recompute every earlier
    # step three times over per row read.
    grid = jax.ops.segment_sum((lattice.barycentric[:, :, None] * values[:, None, :]).reshape(-1, c),
                               lattice.splat_rows.reshape(-1) + 1, num_segments=capacity + 2)
    spare = jnp.zeros_like(grid)
    for rows, (before, after) in zip(lattice.reads, lattice.links):
        blurred = grid[1:-1] + 0.5 * (jnp.where(before[:, None], grid[:-2], 0.0)
                                      + jnp.where(after[:, None], grid[2:], 0.0))
        grid, spare = lax.dynamic_update_slice(spare, blurred[rows], (1, 0)), grid
    alpha = 1.0 / (1.0 + 2.0 ** -d)
    weights = (lattice.barycentric * np.float32(alpha))[:, :, None]
    return jnp.sum(weights * grid[1:-1].reshape(n, d + 1, c), axis=1)


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


def _line_key(points, j):
    """The key that lists lattice points (M, d+1) int32 line by line along direction j, (d+1) e_j - 1: d uint32
    fields of 16 bits, most significant first, the last one the position along the line. With a = j + 1
    (mod d + 1), k_i - k_a (i != j, a) is the same all along a line and -k_a counts the steps; all as 16-bit
    numbers (pydensecrf's keys are shorts), the position offset by 2^15 so that only lines spanning more than
    2^15 steps wrap.

    The leading field is k_u - k_v for the pair (u, v) of _major_pair(d, j), which replaces the field of u (or
    of v, when u is a) and keeps the key one-to-one. Consecutive layouts that share their pair list each group of
    points with one value of k_u - k_v in one block of rows, so that moving from one layout to the next gathers
    rows from within a block, a few thousand rows that stay in cache, instead of from anywhere."""
    d = points.shape[1] - 1
    a = (j + 1) % (d + 1)

    def difference(u, v):
        return (points[:, u] - points[:, v]).astype(jnp.uint32) & 0xFFFF
    leading, dropped = [], None
    major = _major_pair(d, j)
    if major is not None:
        u, v = major
        leading, dropped = [difference(u, v)], (u if u != a else v)
    same = [difference(i, a) for i in range(d + 1) if i not in (j, a, dropped)]
    return leading + same + [((-points[:, a]).astype(jnp.uint32) + 0x8000) & 0xFFFF]


def _major_pair(d, j):
    """Coordinates (u, v) whose difference leads layout j's key: it must stay the same along direction j
    (u, v != j). (d-1, d) serves layouts 0..d-2, (0, 1) the rest, so that only the gathers into layout d-1
    and into the simplex corners read from anywhere. None for d < 3."""
    if d < 3:
        return None
    return (d - 1, d) if j < d - 1 else (0, 1)


def _sort_order(fields, widths=()):
    """The permutation that sorts rows on `fields` (uint32 arrays, most significant first; 16 bits wide unless
    `widths` says otherwise), ties in row order. A radix sort on the fields' bits: each pass sorts one 64-bit
    word, the next bits of the key above the row's position in the order so far, so that the word is a single
    sort operand. XLA sorts a single operand several times faster than a multi-operand (key, index) sort, whose
    comparisons go through a compiled comparator: on a 2-core CPU, 60 ms for 1.1 M uint64 against 460 ms for two
    uint32 keys and an index. The 64-bit words are made inside jax.enable_x64 and never leave this function."""
    widths = list(widths) + [16] * (len(fields) - len(widths))
    n = fields[0].shape[0]
    index_bits = max(1, (n - 1).bit_length())
    room = 64 - index_bits
    # bit ranges [low, low + width) of each field, counted from the key's least significant bit
    lows = np.cumsum([0] + widths[::-1])[:-1][::-1]
    order = None
    with jax.enable_x64(True):
        for word_low in range(0, int(sum(widths)), room):
            word = jnp.zeros(n, jnp.uint64)
            for field, low, width in zip(fields, lows, widths):
                lo, hi = max(low, word_low), min(low + width, word_low + room)
                if lo < hi:
                    bits = (field.astype(jnp.uint64) >> np.uint64(lo - low)) & np.uint64((1 << (hi - lo)) - 1)
                    word = word | bits << np.uint64(lo - word_low + index_bits)
            if order is not None:
                word = word[order]
            position = lax.sort(word | jnp.arange(n, dtype=jnp.uint64)) & np.uint64((1 << index_bits) - 1)
            position = position.astype(jnp.int32)
            order = position if order is None else order[position]
    return order


def _links(key, used):
    """(2, M) bool for a layout sorted on `key` (a _line_key): row r is linked to row r - 1 / r + 1 when both
    are used and they lie on one line one step apart."""
    *same, position = key
    step = (position[1:] == position[:-1] + 1) & used[1:] & used[:-1]
    for field in same:
        step = step & (field[1:] == field[:-1])
    return jnp.stack([jnp.concatenate([jnp.zeros(1, bool), step]), jnp.append(step, False)])


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
