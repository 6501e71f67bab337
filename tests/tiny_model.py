"""A model that compiles in seconds, for the training-system tests (the zoo's models are tested elsewhere).

Importing this module registers it as "tiny_seg_test" in the model registry (this process only).
"""
import jax.numpy as jnp
from flax import linen as nn

from segjax import nn as snn
from segjax.models import registry

NAME = "tiny_seg_test"


class TinySeg(nn.Module):
    """conv-BN-relu x2 -> 1x1 classifier, plus an aux head."""
    num_classes: int = 3
    features: int = 8
    axis_name: str | None = None
    dtype: object = None

    @nn.compact
    def __call__(self, x, train=False):
        conv_bn = snn.dtype_partials(self.dtype, jnp.float32, self.axis_name).conv_bn
        x = conv_bn(self.features, 3, name="block1")(x, train)
        x = conv_bn(self.features, 3, dilation=2, padding=2, name="block2")(x, train)
        out = snn.conv2d(self.num_classes, 1, use_bias=True, dtype=self.dtype, name="classifier")(x)
        aux = snn.conv2d(self.num_classes, 1, use_bias=True, dtype=self.dtype, name="aux_classifier")(x)
        return {"out": out, "aux": aux}


def _build(num_classes, features=8, axis_name=None, dtype=None, param_dtype=jnp.float32):
    return TinySeg(num_classes, features, axis_name, dtype)


if NAME not in registry.names():
    registry.register(NAME)(_build)
