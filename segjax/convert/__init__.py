"""PyTorch state_dict -> Flax variables.

Our modules are named after the PyTorch reference's module paths, so one rule converts every
layout: the key "a.b.c.<leaf>" lands at ("a", "b", "c", <flax leaf>) with

    weight (4-D, Conv2d or ConvTranspose2d)  -> params kernel, transposed (2, 3, 1, 0)
    weight (2-D, Linear)                     -> params kernel, transposed
    weight (1-D, BatchNorm)                  -> params scale
    bias                                     -> params bias
    running_mean / running_var               -> batch_stats mean / var
    num_batches_tracked                      -> dropped

A layout (see `register_layout`) may rename keys first, where a reference's names cannot be
mirrored (e.g. our flat module list vs a Sequential nested differently). The converted tree is
checked against the model's own shapes; any missing, unexpected or mis-shaped key is an error
that lists them. Pickled code is never executed: `.pth` files are read with
`torch.load(weights_only=True)`, `.safetensors` with safetensors.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Callable, Mapping

import numpy as np

from segjax.errors import SegjaxError

Rename = Callable[[str], "str | None"]


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one reference's checkpoints map onto a family of our models."""
    rename: Rename | None = None
    # kwargs for `models.create` read off a state dict (num_classes, aux, ...).
    infer_kwargs: Callable[[Mapping[str, np.ndarray]], dict] | None = None
    # For backbone-only import: (prefix of our backbone subtree, rename of classification keys).
    backbone: tuple[str, Rename] | None = None
    # Rewrites the classification state_dict's values before backbone import, where a rename is not
    # enough (VGG's fc6/fc7 Linear weights reshaped into the FCN's 7x7/1x1 convolutions).
    backbone_prepare: Callable[[Mapping[str, np.ndarray]], dict] | None = None
    # The key of the first conv's weight, whose dim 1 is the number of input channels (default 3).
    input_conv: str | None = None


_LAYOUTS: dict[str, Layout] = {}


def register_layout(names: str | list[str], layout: Layout) -> None:
    for name in [names] if isinstance(names, str) else names:
        _LAYOUTS[name] = layout


def layout_for(name: str) -> Layout:
    return _LAYOUTS.get(name, Layout())


# ------------------------------------------------------------------------------------- loading

def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a .pth/.pt (weights only: no pickled code runs) or .safetensors file into numpy arrays."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise SegjaxError(f"{path}: no such weights file")
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file
        return dict(load_file(path))
    try:
        import torch
    except ImportError as e:
        raise SegjaxError(f"{path}: reading .pth needs PyTorch; pip install 'segjax[convert]'") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses any pickle that would build arbitrary objects
        raise SegjaxError(f"{path}: not a plain weights file ({_why_refused(e)}); save it with "
                          f"torch.save(model.state_dict(), path)") from None
    for key in ("state_dict", "model", "model_state_dict"):  # common training-checkpoint wrappers
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise SegjaxError(f"{path}: holds a {type(obj).__name__}, not a state_dict")
    out = {}
    for k, v in obj.items():
        if hasattr(v, "detach"):
            k = k[len("module."):] if k.startswith("module.") else k  # DataParallel / DDP prefix
            out[k] = v.detach().cpu().float().numpy() if v.is_floating_point() else v.detach().cpu().numpy()
    return out


def _why_refused(e: Exception) -> str:
    """The one useful line of torch's weights-only refusal (which global it refused), without its ANSI codes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if refused:
        return f"it pickles {refused[1]}, which is never loaded"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0][:200] if lines else type(e).__name__


# ------------------------------------------------------------------------------------- mapping

_LEAVES = {"running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var"),
           "bias": ("params", "bias")}


def _flax_leaf(leaf: str, value: np.ndarray) -> tuple[str, str, np.ndarray] | None:
    if leaf == "num_batches_tracked":
        return None
    if leaf in _LEAVES:
        collection, name = _LEAVES[leaf]
        return collection, name, value
    if leaf == "weight":
        if value.ndim == 4:
            return "params", "kernel", value.transpose(2, 3, 1, 0)
        if value.ndim == 2:
            return "params", "kernel", value.T
        if value.ndim == 1:
            return "params", "scale", value
    raise SegjaxError(f"don't know how to convert {leaf!r} of shape {value.shape}")


def torch_to_flax(state_dict: Mapping[str, np.ndarray], rename: Rename | None = None) -> dict:
    """The generic rule above, applied to every key: returns {"params": ..., "batch_stats": ...}."""
    variables: dict[str, dict] = {"params": {}}
    for key, value in state_dict.items():
        key = rename(key) if rename else key
        if key is None:
            continue
        *path, leaf = key.split(".")
        converted = _flax_leaf(leaf, np.asarray(value))
        if converted is None:
            continue
        collection, name, array = converted
        node = variables.setdefault(collection, {})
        for part in path:
            node = node.setdefault(part, {})
        node[name] = np.array(array, dtype=np.float32, order="C", copy=True)  # never alias the caller's tensors
    return variables


def _flatten(tree: Mapping, prefix: tuple = ()) -> dict[tuple, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _unflatten(flat: Mapping[tuple, Any]) -> dict:
    out: dict = {}
    for path, v in flat.items():
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = v
    return out


def _fmt(paths, limit=8) -> str:
    shown = ", ".join("/".join(map(str, p)) for p in sorted(paths)[:limit])
    return shown + (f" (+{len(paths) - limit} more)" if len(paths) > limit else "")


def check_fits(variables: Mapping, target: Mapping, what: str) -> None:
    """Raises one SegjaxError listing missing, unexpected and mis-shaped entries of `variables` vs `target`."""
    got, want = _flatten(variables), _flatten(target)
    problems = []
    missing = set(want) - set(got)
    unexpected = set(got) - set(want)
    if missing:
        problems.append(f"missing {len(missing)}: {_fmt(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)}: {_fmt(unexpected)}")
    bad = [p for p in set(got) & set(want) if tuple(np.shape(got[p])) != tuple(want[p].shape)]
    if bad:
        p = sorted(bad)[0]
        problems.append(f"{len(bad)} shape mismatches, e.g. {'/'.join(p)} {tuple(np.shape(got[p]))} "
                        f"vs {tuple(want[p].shape)}")
    if problems:
        raise SegjaxError(f"{what} does not fit: " + "; ".join(problems)
                          + ". Check the model name and num_classes/aux options match the checkpoint")


def model_shapes(model, image_size: int = 64, in_channels: int = 3) -> dict:
    """The variable shapes of `model` (no FLOPs spent: jax.eval_shape)."""
    import jax
    import jax.numpy as jnp

    x = jax.ShapeDtypeStruct((1, image_size, image_size, in_channels), jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), x)


# ------------------------------------------------------------------------------------- public API

def from_torch(name: str, state_dict: Mapping[str, np.ndarray], **model_kw) -> dict:
    """Converts a PyTorch state_dict for model `name` to Flax variables, checked against the model.

    `model_kw` go to `segjax.models.create`; what the layout can read off the state dict
    (num_classes, aux, ...) is inferred where not given.
    """
    from segjax import models

    layout = layout_for(name)
    kw = dict(layout.infer_kwargs(state_dict)) if layout.infer_kwargs else {}
    kw.update(model_kw)
    if "num_classes" not in kw:
        raise SegjaxError(f"from_torch({name!r}): pass num_classes=...; it cannot be read off this state_dict")
    model = models.create(name, **kw)
    variables = torch_to_flax(state_dict, layout.rename)
    in_channels = 3
    if layout.input_conv and layout.input_conv in state_dict:
        in_channels = int(np.shape(state_dict[layout.input_conv])[1])
    target = model_shapes(model, in_channels=in_channels)
    check_fits(variables, target, f"state_dict for {name} (num_classes={kw['num_classes']})")
    return {k: variables.get(k, {}) for k in target}


def load_backbone(name: str, variables: Mapping, state_dict: Mapping[str, np.ndarray]) -> dict:
    """Initialises the backbone of segmentation model `name` from an ImageNet classification state_dict.

    The classifier (fc / classifier.*) of the classification net is dropped; every backbone entry of
    `variables` must be covered, with matching shapes. Returns new variables; heads are untouched.
    """
    layout = layout_for(name)
    if layout.backbone is None:
        raise SegjaxError(f"model {name!r} has no backbone-only import")
    prefix, rename = layout.backbone
    if layout.backbone_prepare is not None:
        state_dict = layout.backbone_prepare(state_dict)
    converted = torch_to_flax(state_dict, rename)
    flat = {k: dict(_flatten(v)) for k, v in variables.items()}
    new_flat = {}
    for collection, entries in flat.items():
        target = {p[1:]: v for p, v in entries.items() if p[0] == prefix}
        src = _flatten(converted.get(collection, {}))
        check_fits(_unflatten(src), _unflatten(target), f"backbone weights for {name} ({collection})")
        new_flat[collection] = {**entries, **{(prefix,) + p: src[p] for p in target}}
    return {c: _unflatten(e) for c, e in new_flat.items()}


def convert_file(name: str, in_path: str, out_dir: str, **model_kw) -> dict:
    """`segjax convert`: reads a weights file, converts it, and writes a segjax checkpoint to out_dir."""
    from segjax import checkpoint

    state_dict = load_state_dict(in_path)
    layout = layout_for(name)
    kw = dict(layout.infer_kwargs(state_dict)) if layout.infer_kwargs else {}
    kw.update(model_kw)
    variables = from_torch(name, state_dict, **kw)
    checkpoint.save_variables(out_dir, variables, {"model": name, "model_kwargs": kw, "source": os.fspath(in_path)})
    return variables


# Importing a layout module registers its layouts.
from segjax.convert import resnet_layouts, mobilenet_layouts, vgg_layouts, unet_layouts  # noqa: E402,F401
