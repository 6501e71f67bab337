"""BatchNorm with PyTorch's numerics."""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import linen as nn

from segjax.nn.core import Array, Dtype

def _normalize(xf: Array, mean: Array, var: Array, scale: Array, bias: Array, epsilon: float) -> Array:
    mul = scale.astype(jnp.float32) * jax.lax.rsqrt(var + epsilon)
    return (xf - mean) * mul + bias.astype(jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x: Array, scale: Array, bias: Array, epsilon: float):
    """Train-mode BatchNorm over all but the channel axis: (y in float32, batch mean, biased batch var).

    The custom VJP is the closed form PyTorch uses, dx = scale * rstd * (g - mean(g) - xhat *
    mean(g * xhat)): two fused reductions and one elementwise pass, where autodiff of the
    two-pass statistics left XLA several more passes over the activations. The statistics are
    returned for the running averages.
    """
    return _batch_norm_forward(x, scale, bias, epsilon)[0]


def _batch_norm_forward(x, scale, bias, epsilon):
    xf = x.astype(jnp.float32)
    axes = tuple(range(x.ndim - 1))
    mean = xf.mean(axes)
    var = jnp.square(xf - mean).mean(axes)
    rstd = jax.lax.rsqrt(var + epsilon)
    y = (xf - mean) * (scale.astype(jnp.float32) * rstd) + bias.astype(jnp.float32)
    return (y, mean, var), (x, mean, rstd, scale)


def _batch_norm_backward(epsilon, residuals, cotangents):
    x, mean, rstd, scale = residuals
    g, g_mean, g_var = (c.astype(jnp.float32) for c in cotangents)
    axes = tuple(range(x.ndim - 1))
    xhat = (x.astype(jnp.float32) - mean) * rstd
    dbias = g.sum(axes)
    dscale = (g * xhat).sum(axes)
    n = math.prod(x.shape[:-1])
    dx = (scale.astype(jnp.float32) * rstd) * (g - (dbias + xhat * dscale) / n)
    # Gradients through the returned statistics (zero when they only feed the running averages).
    dx = dx + (g_mean + 2 * g_var * xhat / rstd) / n
    return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(scale.dtype)


batch_norm_train.defvjp(_batch_norm_forward, _batch_norm_backward)


class BatchNorm(nn.Module):
    """BatchNorm with PyTorch's numerics (including the unbiased running variance).

    `momentum` is Flax's: running = momentum * running + (1 - momentum) * batch, i.e. 1 - PyTorch's.
    Statistics are computed in float32 whatever the compute dtype. With `axis_name`, statistics are
    averaged across that mapped axis (pmap / shard_map); under jit with a sharded batch XLA already
    reduces over the global batch.
    """
    momentum: float = 0.9
    epsilon: float = 1e-5
    axis_name: str | None = None
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        if train:
            count = math.prod(x.shape[:-1])
            if self.axis_name is None:
                y, mean, var = batch_norm_train(x, scale, bias, self.epsilon)
            else:
                xf, axes = x.astype(jnp.float32), tuple(range(x.ndim - 1))
                mean = jax.lax.pmean(xf.mean(axes), self.axis_name)
                var = jax.lax.pmean(jnp.square(xf - mean).mean(axes), self.axis_name)
                count = count * jax.lax.psum(1, self.axis_name)
                y = _normalize(xf, mean, var, scale, bias, self.epsilon)
            if not self.is_initializing():
                m = self.momentum
                ra_mean.value = m * ra_mean.value + (1 - m) * mean
                ra_var.value = m * ra_var.value + (1 - m) * var * (count / max(count - 1, 1))
        else:
            y = _normalize(x.astype(jnp.float32), ra_mean.value, ra_var.value, scale, bias, self.epsilon)
        return y.astype(self.dtype or x.dtype)
