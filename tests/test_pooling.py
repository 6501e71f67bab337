"""segjax.nn's max pool with indices, max unpooling, bed of nails and nearest upsampling against PyTorch.

Values and indices must be equal, not close; so must gradients where windows do not overlap (each
input gets one cotangent or none). Where they overlap, an input that wins several windows gets the
sum of their cotangents, added in another order than PyTorch's: equal to float32 rounding.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segjax import nn as snn
from segjax.errors import SegjaxError

# (N, C, H, W, kernel, stride, padding, ceil_mode)
POOLS = [
    (2, 3, 5, 7, 2, 2, 0, False),
    (2, 3, 5, 7, 2, 2, 0, True),
    (1, 2, 45, 60, 2, 2, 0, True),
    (2, 2, 23, 30, 2, 2, 0, True),
    (2, 2, 23, 30, 2, 2, 1, False),
    (2, 3, 9, 11, 3, 2, 1, False),   # ResNet's stem: overlapping windows
    (2, 3, 9, 11, 3, 2, 1, True),
    (1, 2, 10, 13, 3, 3, 1, True),
]


def _inputs(kind, shape, seed=0):
    rng = np.random.default_rng(seed)
    if kind == "random":
        return rng.standard_normal(shape).astype(np.float32)
    if kind == "constant":  # every window is one long tie
        return np.full(shape, 0.5, np.float32)
    return np.round(rng.uniform(0, 3, shape)).astype(np.float32)  # four levels: ties everywhere


def _nhwc(t):
    return np.asarray(t.detach().numpy()).transpose(0, 2, 3, 1)


@pytest.mark.parametrize("kind", ["random", "constant", "quantised"])
@pytest.mark.parametrize("n,c,h,w,k,s,p,ceil", POOLS)
def test_max_pool_indices_and_gradient_match_torch(kind, n, c, h, w, k, s, p, ceil):
    x = _inputs(kind, (n, c, h, w))
    g = np.random.default_rng(1).standard_normal(
        F.max_pool2d(torch.from_numpy(x), k, s, p, ceil_mode=ceil).shape).astype(np.float32)
    xt = torch.from_numpy(x).requires_grad_()
    yt, it = F.max_pool2d(xt, k, s, p, ceil_mode=ceil, return_indices=True)
    (yt * torch.from_numpy(g)).sum().backward()

    def loss(xj, with_indices):
        if with_indices:
            y, where = snn.max_pool2d(xj, k, s, p, ceil_mode=ceil, return_indices=True)
        else:
            y, where = snn.max_pool2d(xj, k, s, p, ceil_mode=ceil), None
        return jnp.sum(y * g.transpose(0, 2, 3, 1)), (y, where)

    for with_indices in (True, False):
        grad, (y, where) = jax.jit(jax.grad(loss, has_aux=True), static_argnums=1)(x.transpose(0, 2, 3, 1), with_indices)
        np.testing.assert_array_equal(np.asarray(y), _nhwc(yt))
        if k > s:
            np.testing.assert_allclose(np.asarray(grad), _nhwc(xt.grad), rtol=1e-6, atol=1e-6)
        else:
            np.testing.assert_array_equal(np.asarray(grad), _nhwc(xt.grad))
        if with_indices:
            np.testing.assert_array_equal(np.asarray(where.indices), _nhwc(it))
            assert where.input_size == (h, w)


@pytest.mark.parametrize("kind", ["random", "quantised"])
@pytest.mark.parametrize("n,c,h,w,k,s,p,ceil", POOLS)
def test_max_unpool_matches_torch(kind, n, c, h, w, k, s, p, ceil):
    """Unpooling a pool's output with its indices, at the pooled input's size (forward and gradient)."""
    x = _inputs(kind, (n, c, h, w))
    yt, it = F.max_pool2d(torch.from_numpy(x), k, s, p, ceil_mode=ceil, return_indices=True)
    yt = yt.clone().requires_grad_()
    ut = F.max_unpool2d(yt, it, k, s, p, output_size=(h, w))
    g = np.random.default_rng(2).standard_normal(ut.shape).astype(np.float32)
    (ut * torch.from_numpy(g)).sum().backward()

    def unpooled(xj, plain):
        y, where = snn.max_pool2d(xj, k, s, p, ceil_mode=ceil, return_indices=True)
        y = jax.lax.stop_gradient(y) * 1.0
        if plain:  # PyTorch's call: plain indices and an explicit size (the scatter path)
            return y, snn.max_unpool2d(y, where.indices, k, s, p, output_size=(h, w))
        return y, snn.max_unpool2d(y, where, k, s, p)  # the size comes with the indices

    for plain in (False, True):
        y, u = unpooled(x.transpose(0, 2, 3, 1), plain)
        np.testing.assert_array_equal(np.asarray(u), _nhwc(ut))
        vjp = jax.vjp(lambda v: snn.max_unpool2d(v, snn.max_pool2d(x.transpose(0, 2, 3, 1), k, s, p, ceil_mode=ceil,
                                                                   return_indices=True)[1]
                                                 if not plain else _nhwc(it).astype(np.int32),
                                                 k, s, p, output_size=(h, w)), y)[1]
        np.testing.assert_array_equal(np.asarray(vjp(g.transpose(0, 2, 3, 1))[0]), _nhwc(yt.grad))


def test_unpool_default_size_and_output_size_range_match_torch():
    x = _inputs("random", (1, 2, 8, 8))
    yt, it = F.max_pool2d(torch.from_numpy(x), 2, return_indices=True)
    y, idx = _nhwc(yt), _nhwc(it).astype(np.int32)
    np.testing.assert_array_equal(np.asarray(snn.max_unpool2d(y, idx, 2)), _nhwc(F.max_unpool2d(yt, it, 2)))
    for size in ((7, 9), (1, 2, 9, 7)):  # default 8 +- (stride - 1); a full NCHW size as PyTorch takes
        np.testing.assert_array_equal(np.asarray(snn.max_unpool2d(y, idx, 2, output_size=size)),
                                      _nhwc(F.max_unpool2d(yt, it, 2, output_size=size)))
    for size in ((6, 8), (8, 10)):
        with pytest.raises(ValueError, match="must be between 6 and 10"):
            F.max_unpool2d(yt, it, 2, output_size=size)
        with pytest.raises(SegjaxError, match=r"strictly between 6 and 10") as e:
            snn.max_unpool2d(y, idx, 2, output_size=size)
        assert "\n" not in str(e.value)


def test_unpool_refuses_indices_of_another_shape():
    y = jnp.ones((1, 4, 4, 2))
    with pytest.raises(SegjaxError, match=r"indices of shape \(1, 4, 4, 3\)"):
        snn.max_unpool2d(y, jnp.zeros((1, 4, 4, 3), jnp.int32), 2)


def test_ceil_mode_pool_of_an_odd_size_unpools_in_place():
    """PyTorch's default size after a ceil-mode pool of 5x7 is 6x8, which misplaces the values; the
    size that travels with segjax's indices puts each one back where it came from."""
    x = _inputs("random", (1, 1, 5, 7))
    yt, it = F.max_pool2d(torch.from_numpy(x), 2, ceil_mode=True, return_indices=True)
    torch_default = _nhwc(F.max_unpool2d(yt, it, 2))
    assert torch_default.shape[1:3] == (6, 8)
    y, where = snn.max_pool2d(x.transpose(0, 2, 3, 1), 2, ceil_mode=True, return_indices=True)
    u = np.asarray(snn.max_unpool2d(y, where, 2))
    assert u.shape[1:3] == (5, 7)
    kept = u != 0
    np.testing.assert_array_equal(u[kept], x.transpose(0, 2, 3, 1)[kept])  # every value at its origin
    assert kept.sum() == y.size
    assert not np.array_equal(torch_default[:, :5, :7], u)  # what the trap would have given


def test_bed_of_nails_and_nearest_upsample():
    x = _inputs("random", (2, 3, 5, 7))
    xj = x.transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(np.asarray(snn.nearest_upsample(xj, 3)),
                                  _nhwc(F.interpolate(torch.from_numpy(x), scale_factor=3, mode="nearest")))
    nails = np.asarray(snn.bed_of_nails(xj, 2))
    assert nails.shape == (2, 10, 14, 3)
    np.testing.assert_array_equal(nails[:, ::2, ::2], xj)
    assert np.count_nonzero(nails) == np.count_nonzero(xj)
    # bed of nails is max unpooling with every index at its window's top-left corner
    rows, cols = np.meshgrid(np.arange(5) * 2, np.arange(7) * 2, indexing="ij")
    corners = np.broadcast_to((rows * 14 + cols)[None, :, :, None], xj.shape).astype(np.int32)
    np.testing.assert_array_equal(np.asarray(snn.max_unpool2d(xj, corners, 2)), nails)
    g = jax.grad(lambda v: jnp.sum(snn.bed_of_nails(v, 2) * jnp.arange(14.0)[:, None]))(xj)
    np.testing.assert_array_equal(np.asarray(g), np.broadcast_to(np.arange(0, 14, 2.0)[None, None, :, None], xj.shape))


def test_pool_exports_with_symbolic_size():
    """The index arithmetic and the unpooling trace with free H and W (a ceil-mode pool, as SegNet's)."""
    def roundtrip(x):
        y, where = snn.max_pool2d(x, 2, ceil_mode=True, return_indices=True)
        return snn.max_unpool2d(y, where, 2), where.indices

    spec = jax.ShapeDtypeStruct(jax.export.symbolic_shape("1, h, w, 2"), jnp.float32)
    exported = jax.export.export(jax.jit(roundtrip))(spec)
    x = _inputs("quantised", (1, 2, 9, 11)).transpose(0, 2, 3, 1)
    u, idx = exported.call(x)
    u_ref, idx_ref = roundtrip(x)
    np.testing.assert_array_equal(np.asarray(u), np.asarray(u_ref))
    np.testing.assert_array_equal(np.asarray(idx), np.asarray(idx_ref))


def test_docstring_examples():
    import doctest

    from segjax.nn import pooling
    result = doctest.testmod(pooling, extraglobs={"jnp": jnp})
    assert result.attempted >= 4 and result.failed == 0
