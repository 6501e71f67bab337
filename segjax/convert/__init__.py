"""PyTorch state_dict -> Flax variables.

Our modules are named after the PyTorch reference's module paths, so one rule converts every
layout: the key "a.b.c.<leaf>" lands at ("a", "b", "c", <flax leaf>) with

    weight (4-D, Conv2d or ConvTranspose2d)  -> params kernel, transposed (2, 3, 1, 0)
    weight (2-D, Linear)                     -> params kernel, transposed
    weight (1-D, BatchNorm)                  -> params scale
    bias                                     -> params bias
    running_mean / running_var               -> batch_stats mean / var
    num_batches_tracked                      -> dropped

`in_channels=N` (`segjax convert ... --set in_channels=N`) adapts RGB weights to N input channels
(see `adapt_input_channels`): every kernel the input reaches directly gets the mean of its RGB filters
times 3 / N in each of its N input channels, so an input whose N channels all hold a grey image gets
the response the RGB net gives that grey image; mean/std become N copies of the RGB mean and std's
means, and segjax.json records "in_channels". N == 3 changes nothing (docs/in_channels.md).

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
from typing import Callable, Mapping

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from segjax import tasks
from segjax.card import ModelCard
from segjax.files import jsonable
from segjax.errors import SegjaxError

Rename = Callable[[str], "str | None"]


from segjax.data.transforms import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402


def caffe_normalisation(mean_bgr: tuple[float, float, float]) -> dict:
    """mean/std (RGB, 0-1 scale) for caffe weights, which take BGR 0-255 images minus `mean_bgr`: with the
    first conv's input channels reversed at conversion, (x_rgb01 - mean) / std is the caffe input."""
    return {"mean": tuple(m / 255.0 for m in reversed(mean_bgr)), "std": (1 / 255.0,) * 3}


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
    # Where a model has several layouts: whether a state_dict is in this one (None: the default layout).
    matches: Callable[[Mapping[str, np.ndarray]], bool] | None = None
    # Conversion options (`--set KEY=VALUE`, not model options) and the value rewrite that takes them,
    # applied before renaming: prepare(state_dict, **options) -> state_dict.
    options: tuple[str, ...] = ()
    prepare: Callable[..., dict] | None = None
    # The weights' own input normalisation (RGB, 0-1 scale); bgr: caffe weights, whose first conv
    # (input_conv) gets its input channels reversed so that the model takes RGB.
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    bgr: bool = False
    # What the layout reads, for messages and segjax.json (e.g. "wkentaro/pytorch-fcn").
    reference: str = ""
    # The fully connected CRF values the reference evaluated with (segjax.crf), for segjax.json's "crf".
    crf: Mapping[str, float] | None = None


_LAYOUTS: dict[str, list[Layout]] = {}


def register_layout(names: str | list[str], layout: Layout) -> None:
    """Adds a layout for these models; the first one registered without `matches` is the default."""
    for name in [names] if isinstance(names, str) else names:
        _LAYOUTS.setdefault(name, []).append(layout)


def layout_for(name: str, state_dict: Mapping[str, np.ndarray] | None = None) -> Layout:
    """The layout of `name` that recognises `state_dict` (by its keys), else the model's default layout."""
    layouts = _LAYOUTS.get(name, [])
    if state_dict is not None:
        for layout in layouts:
            if layout.matches is not None and layout.matches(state_dict):
                return layout
    return next((layout for layout in layouts if layout.matches is None), Layout())


# ------------------------------------------------------------------------------------- loading

# Training checkpoints wrap their weights: VainF's {"model_state", "optimizer_state", "cur_itrs",
# "best_score"}, jfzhang95's {"epoch", "state_dict", "optimizer", "best_pred"}, mmseg's
# {"state_dict", "meta"}, {"model": ...}. The first of these keys that holds tensors is the state_dict.
WRAPPER_KEYS = ("model_state", "state_dict", "model", "model_state_dict", "net")


def numpy_safe_globals() -> list:
    """What `torch.load(weights_only=True)` may build beyond tensors: numpy scalars (a best score, an
    iteration count) and the dtypes they are made of. Only these constructors: nothing that runs code.

    numpy 1.x pickles spell the scalar constructor numpy.core.multiarray.scalar, numpy 2 pickles
    numpy._core.multiarray.scalar; both names map to this numpy's constructor.
    """
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import scalar
    allowed: list = [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"),
                     (np.dtype, "numpy.dtype")]
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25: one class per dtype, restored by BUILD
    if dtypes is not None:
        for kind in ("Bool", "Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16", "UInt32", "UInt64",
                     "Float16", "Float32", "Float64", "LongDouble", "Complex64", "Complex128", "CLongDouble",
                     "Byte", "UByte", "Short", "UShort", "Int", "UInt", "Long", "ULong", "LongLong", "ULongLong"):
            cls = getattr(dtypes, kind + "DType", None)
            if cls is not None:
                allowed += [cls, (cls, f"numpy.dtypes.{kind}DType")]
    return allowed


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a .pth/.pt (weights only: no pickled code runs) or .safetensors file into numpy arrays.

    Training checkpoints are unwrapped (WRAPPER_KEYS) and DataParallel's `module.` prefix dropped;
    their other entries (epoch, optimizer state, numpy scores) are read, through the allowlist of
    `numpy_safe_globals`, and ignored. A file without weights is an error, never an empty dict.
    """
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
        with torch.serialization.safe_globals(numpy_safe_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses any pickle that would build arbitrary objects
        raise SegjaxError(f"{path}: not a plain weights file ({_why_refused(e, path)}); save it with "
                          f"torch.save(model.state_dict(), path)") from None
    return _weights_in(obj, path)


def _is_tensor(v) -> bool:
    return hasattr(v, "detach") and hasattr(v, "is_floating_point")


def _weights_in(obj, path: str) -> dict[str, np.ndarray]:
    """The state_dict inside a loaded object: the object itself if it holds tensors, else its wrapper entry."""
    if not isinstance(obj, Mapping):
        raise SegjaxError(f"{path}: holds a {type(obj).__name__}, not a state_dict")
    if not any(_is_tensor(v) for v in obj.values()):
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)
                      and any(_is_tensor(v) for v in obj[k].values())), None)
        if inner is None:
            keys = ", ".join(map(str, list(obj)[:6])) or "none"
            raise SegjaxError(f"{path}: no weights found (no tensors at the top level, nor under "
                              f"{'/'.join(WRAPPER_KEYS)}; its keys: {keys}); pass a state_dict file")
        obj = inner
    out = {}
    for k, v in obj.items():
        if _is_tensor(v):
            k = k[len("module."):] if k.startswith("module.") else k  # DataParallel / DDP prefix
            v = v.detach().cpu()
            out[k] = v.float().numpy() if v.is_floating_point() else v.numpy()
    return out


def _why_refused(e: Exception, path: str) -> str:
    """Which global the weights-only load refused (read off the pickle itself, so it does not depend on
    torch's wording), else the first line of torch's message without its ANSI codes."""
    refused = _refused_global(path)
    if refused is None:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
        match = re.search(r"GLOBAL ([\w.]+)", text)
        refused = match[1] if match else None
    if refused:
        return f"it pickles {refused}, which is never loaded"
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0][:200] if lines else type(e).__name__


def _pickles(path: str) -> list[bytes]:
    """The pickle streams of a torch file: data.pkl of the zip format, or the legacy file as a whole."""
    import zipfile

    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            return [z.read(n) for n in z.namelist() if n.endswith("data.pkl")]
    with open(path, "rb") as f:
        return [f.read()]


def _refused_global(path: str) -> str | None:
    """The first global in the file that neither torch's weights-only loader nor our allowlist builds."""
    import io
    import pickletools

    try:
        from torch import _weights_only_unpickler as wou
        allowed = set(wou._get_allowed_globals())
    except Exception:  # private API moved: fall back to torch's message
        return None
    allowed |= {a[1] if isinstance(a, tuple) else f"{a.__module__}.{a.__qualname__}" for a in numpy_safe_globals()}
    try:
        for blob in _pickles(path):
            stream = io.BytesIO(blob)
            while stream.tell() < len(blob):  # legacy files hold several pickles back to back
                strings, memo, last, n_memo = [], {}, None, 0  # last: the string on top of the stack, if any
                for op, arg, _ in pickletools.genops(stream):
                    if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                        strings.append(arg)
                        last = arg
                        continue
                    if op.name in ("BINPUT", "LONG_BINPUT", "PUT", "MEMOIZE"):
                        index, n_memo = (n_memo, n_memo + 1) if op.name == "MEMOIZE" else (arg, n_memo)
                        if last is not None:
                            memo[index] = last
                        continue
                    last = None
                    if op.name in ("BINGET", "LONG_BINGET", "GET") and arg in memo:
                        strings.append(memo[arg])
                        last = memo[arg]
                    name = None
                    if op.name in ("GLOBAL", "INST"):
                        name = ".".join(arg.split(" ", 1))
                    elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                        name = f"{strings[-2]}.{strings[-1]}"
                    if name is not None and name not in allowed:
                        return name
    except Exception:  # not a pickle we can read: torch's message says the rest
        return None
    return None


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


def _fmt(paths, limit=8) -> str:
    shown = ", ".join("/".join(map(str, p)) for p in sorted(paths)[:limit])
    return shown + (f" (+{len(paths) - limit} more)" if len(paths) > limit else "")


def check_fits(variables: Mapping, target: Mapping, what: str) -> None:
    """Raises one SegjaxError listing missing, unexpected and mis-shaped entries of `variables` vs `target`."""
    got, want = flatten_dict(variables), flatten_dict(target)
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


def adapt_input_channels(model, variables: Mapping, source_channels: int, in_channels: int,
                         what: str = "model") -> dict:
    """`variables` of `model` taking `source_channels` (RGB: 3) input channels, rewritten for `in_channels`.

    The leaves to adapt are found without naming them: exactly those whose shapes differ between the
    model initialised with `source_channels` and with `in_channels` inputs (the kernels the input
    reaches first; any model, any layout). Each must be a 4-D (kh, kw, cin, cout) kernel whose cin is
    the channel count; it becomes

        w_new[:, :, c, :] = mean over the source channels of w * source_channels / in_channels

    for every one of the `in_channels` channels, so an input whose channels all hold the same grey
    image g gives exactly the response of the source net to (g, g, g)."""
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise SegjaxError(f"in_channels={in_channels!r}: give the number of input channels, an integer >= 1")
    if in_channels == source_channels:
        return dict(variables)
    before = flatten_dict(model_shapes(model, in_channels=source_channels))
    after = flatten_dict(model_shapes(model, in_channels=in_channels))
    changed = [p for p in after if p in before and tuple(before[p].shape) != tuple(after[p].shape)]
    if not changed:
        raise SegjaxError(f"{what}: no weight depends on the number of input channels; in_channels={in_channels} "
                          "cannot be applied")
    flat = {c: dict(flatten_dict(v)) for c, v in variables.items()}
    for path in changed:
        old, new = tuple(before[path].shape), tuple(after[path].shape)
        if len(old) != 4 or old[2] != source_channels or new != old[:2] + (in_channels,) + old[3:]:
            raise SegjaxError(f"{what}: {'/'.join(map(str, path))} changes from {old} to {new} with the input "
                              "channels, which is not a first convolution's kernel; in_channels cannot be applied")
        w = np.asarray(flat[path[0]][path[1:]], np.float32)
        mean = w.mean(axis=2, keepdims=True) * (source_channels / in_channels)
        flat[path[0]][path[1:]] = np.ascontiguousarray(np.repeat(mean, in_channels, axis=2), np.float32)
    return {c: unflatten_dict(e) for c, e in flat.items()}


# ------------------------------------------------------------------------------------- public API

def convert_state_dict(name: str, state_dict: Mapping[str, np.ndarray], **kw) -> tuple[dict, dict]:
    """(variables, meta) for model `name`: the layout that recognises the state_dict converts it, and
    meta holds what `segjax.json` records (model, model_kwargs, num_classes, mean, std, in_channels, ...).

    `in_channels=N` (not a model option) adapts the weights' first convolution to N input channels by
    the rule of `adapt_input_channels` (mean of the RGB filters x 3 / N in every channel), and mean/std
    to N copies of the means of the weights' mean and std; N == 3 changes nothing."""
    from segjax import models

    layout = layout_for(name, state_dict)
    wanted_channels = kw.pop("in_channels", None)
    options = {k: kw.pop(k) for k in layout.options if k in kw}
    inferred = dict(layout.infer_kwargs(state_dict)) if layout.infer_kwargs else {}
    kw = {**inferred, **kw}
    if "num_classes" not in kw:
        raise SegjaxError(f"from_torch({name!r}): pass num_classes=...; it cannot be read off this state_dict")
    model = models.create(name, **kw)
    if layout.prepare is not None:
        state_dict = layout.prepare(state_dict, **options)
    if layout.bgr:
        if layout.input_conv not in state_dict:
            raise SegjaxError(f"state_dict has no {layout.input_conv!r}: not a {layout.reference} checkpoint")
        state_dict = {**state_dict, layout.input_conv: np.asarray(state_dict[layout.input_conv])[:, ::-1]}
    variables = torch_to_flax(state_dict, layout.rename)
    in_channels = 3
    if layout.input_conv and layout.input_conv in state_dict:
        in_channels = int(np.shape(state_dict[layout.input_conv])[1])
    target = model_shapes(model, in_channels=in_channels)
    check_fits(variables, target, f"state_dict for {name} (num_classes={kw['num_classes']})")
    variables = {k: variables.get(k, {}) for k in target}
    mean, std = [float(m) for m in layout.mean], [float(v) for v in layout.std]
    if wanted_channels is not None and wanted_channels != in_channels:
        variables = adapt_input_channels(model, variables, in_channels, wanted_channels, f"model {name}")
        mean, std = [float(np.mean(mean))] * wanted_channels, [float(np.mean(std))] * wanted_channels
        in_channels = wanted_channels
    extra = {**({"layout": layout.reference} if layout.reference else {}),
             **({"conversion": jsonable(options)} if options else {})}
    num_classes, task = int(kw.pop("num_classes")), tasks.for_model(name)
    names = task.class_names(num_classes) or [str(i) for i in range(num_classes)]  # weights know no data set
    card = ModelCard(model=name, num_classes=num_classes, model_kwargs=jsonable(kw), task=task,
                     class_names=tuple(names), in_channels=in_channels, mean=tuple(mean),
                     std=tuple(std), crf=dict(layout.crf) if layout.crf is not None else None, extra=extra)
    return variables, card.to_meta()


def from_torch(name: str, state_dict: Mapping[str, np.ndarray], **model_kw) -> dict:
    """Converts a PyTorch state_dict for model `name` to Flax variables, checked against the model.

    `model_kw` go to `segjax.models.create`; what the layout can read off the state dict
    (num_classes, aux, ...) is inferred where not given. The layout is recognised from the keys;
    a layout's conversion options (e.g. `atonce=True` for FCN-8s at-once) are taken from `model_kw`.
    Caffe weights come out taking RGB: normalise inputs with `convert_state_dict`'s mean/std.
    """
    return convert_state_dict(name, state_dict, **model_kw)[0]


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
    flat = {k: dict(flatten_dict(v)) for k, v in variables.items()}
    new_flat = {}
    for collection, entries in flat.items():
        target = {p[1:]: v for p, v in entries.items() if p[0] == prefix}
        src = flatten_dict(converted.get(collection, {}))
        check_fits(unflatten_dict(src), unflatten_dict(target), f"backbone weights for {name} ({collection})")
        new_flat[collection] = {**entries, **{(prefix,) + p: src[p] for p in target}}
    return {c: unflatten_dict(e) for c, e in new_flat.items()}


def convert_file(name: str, in_path: str, out_dir: str, **model_kw) -> dict:
    """`segjax convert`: reads a weights file, converts it, and writes a segjax checkpoint to out_dir.

    Nothing is written unless the conversion succeeds; a failed write removes the directory it created.
    """
    import shutil

    from segjax import checkpoint

    variables, meta = convert_state_dict(name, load_state_dict(in_path), **model_kw)
    meta["source"] = os.fspath(in_path)
    created = not os.path.exists(out_dir)
    try:
        checkpoint.save_variables(out_dir, variables, meta)
    except BaseException:
        if created:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    return variables


# Importing a layout module registers its layouts.
from segjax.convert import resnet_layouts, mobilenet_layouts, vgg_layouts, unet_layouts, segnet_layouts  # noqa: E402,F401
