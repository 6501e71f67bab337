"""Name -> builder registry. Builders are registered at import time by each family module."""
from __future__ import annotations

import inspect
from typing import Callable

from flax import linen as nn

from segjax.errors import SegjaxError

_BUILDERS: dict[str, tuple[Callable[..., nn.Module], str]] = {}


def register(name: str, kind: str = "segmentation"):
    """Decorator: `@register("fcn_resnet50")` on a `builder(num_classes, **kw) -> nn.Module`.

    kind is "segmentation" (returns {"out": (N, H, W, C), ...}) or "classification" (ImageNet
    backbones such as `resnet50`, returning {"out": (N, C)}); both import torchvision weights.
    """
    def wrap(builder):
        if name in _BUILDERS:
            raise ValueError(f"model {name!r} registered twice")
        _BUILDERS[name] = (builder, kind)
        return builder
    return wrap


def create(name: str, num_classes: int, conv_lowering: str | None = None, **kw) -> nn.Module:
    """The registered model `name`. conv_lowering ("auto", "dense", "native"; see segjax.nn.conv_plan) is
    bound into its convolutions; None takes $SEGJAX_CONV, else "auto"."""
    from segjax import nn as snn

    if name not in _BUILDERS:
        raise SegjaxError(f"unknown model {name!r}; choose one of: {', '.join(names())}")
    builder = _BUILDERS[name][0]
    params = inspect.signature(builder).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(kw) - set(params))
        if unknown:
            options = ", ".join(k for k in params if k != "num_classes")
            raise SegjaxError(f"model {name!r} has no option {', '.join(unknown)}; its options: {options}")
    try:
        lowering = snn.check_conv_method(conv_lowering) if conv_lowering else snn.default_conv_lowering()
    except ValueError as e:
        raise SegjaxError(str(e)) from None
    if "conv_lowering" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        kw["conv_lowering"] = lowering  # every segjax builder; a user's own builder may not take it
    return builder(num_classes=num_classes, **kw)


def names(kind: str | None = "segmentation") -> list[str]:
    """Registered model names; kind=None lists classification backbones too."""
    return sorted(n for n, (_, k) in _BUILDERS.items() if kind is None or k == kind)
