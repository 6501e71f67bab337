"""Recipes: a Python file with `get_config() -> ml_collections.ConfigDict`, plus `--config.key=value` overrides.

Overrides are parsed by `ml_collections.config_flags` against the recipe's types: a key the recipe
doesn't have, or a value that doesn't parse as the key's type, is a one-line `SegjaxError`.
`check` owns every rule on the values; the builders that read a checked config trust it.
"""
from __future__ import annotations

import difflib
import importlib.util
import json
import os
import re

import ml_collections

from segjax.errors import SegjaxError

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")  # the recipes, inside the package
DEFAULT_RECIPE = "synthetic_unet"


def recipe_path(name_or_path: str) -> str:
    """A config file path, or a recipe name under segjax/configs/."""
    if os.path.isfile(name_or_path):
        return name_or_path
    candidate = os.path.join(CONFIG_DIR, name_or_path + ".py")
    if os.path.isfile(candidate):
        return candidate
    known = sorted(f[:-3] for f in os.listdir(CONFIG_DIR) if f.endswith(".py") and not f.startswith("_")) \
        if os.path.isdir(CONFIG_DIR) else []
    raise SegjaxError(f"{name_or_path}: no such config file or recipe; recipes: {', '.join(known)}")


def load_config(name_or_path: str | None = None) -> ml_collections.ConfigDict:
    path = recipe_path(name_or_path or DEFAULT_RECIPE)
    spec = importlib.util.spec_from_file_location(f"segjax_recipe_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise SegjaxError(f"{path}: failed to load ({type(e).__name__}: {e})") from e
    if not hasattr(module, "get_config"):
        raise SegjaxError(f"{path}: a config file must define get_config()")
    try:
        config = module.get_config()
    except TypeError as e:  # ConfigDict refuses a value of another type than the field's default
        raise SegjaxError(f"{path}: {_type_error(e)}; give each key a value of its default's type "
                          "(see base_config() in segjax/config.py)") from None
    except Exception as e:
        raise SegjaxError(f"{path}: get_config() failed ({type(e).__name__}: {e})") from e
    if not isinstance(config, ml_collections.ConfigDict):
        raise SegjaxError(f"{path}: get_config() must return an ml_collections.ConfigDict")
    config = _complete(config, path)
    if not config.get("name"):
        with config.unlocked():
            config.name = os.path.splitext(os.path.basename(path))[0]
    return config


def _type_error(e: TypeError) -> str:
    m = re.search(r"field '([^']+)'.*?\. (.*) is of original type <class '(\w+)'> and cannot be casted to "
                  r"type <class '(\w+)'>", str(e))
    return f"{m[1]}={m[2]!r} is a {m[3]}, expected {m[4]}" if m else str(e).splitlines()[0]


_TYPES = {bool: (bool,), int: (int,), float: (int, float), str: (str,), tuple: (tuple, list),
          ml_collections.ConfigDict: (ml_collections.ConfigDict, dict)}


def _complete(config: ml_collections.ConfigDict, where: str) -> ml_collections.ConfigDict:
    """Checks a recipe's keys and value types against base_config(); keys it doesn't set get the defaults."""
    out = base_config()
    for key, value in config.items():
        if key not in out:
            near = difflib.get_close_matches(key, list(out.keys()), n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            raise SegjaxError(f"{where}: unknown key '{key}'{hint}; the keys a recipe may set are those of "
                              "base_config() in segjax/config.py")
        default = out[key]
        allowed = _TYPES[type(default)]
        if not isinstance(value, allowed) or (isinstance(value, bool) and not isinstance(default, bool)):
            raise SegjaxError(f"{where}: {key}={value!r} is a {type(value).__name__}, expected "
                              f"{type(default).__name__} (like {default!r})")
        with out.unlocked():
            out[key] = ml_collections.ConfigDict(value) if isinstance(value, dict) else \
                tuple(value) if isinstance(value, list) else value
    return out


_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
          tuple: "a list", ml_collections.ConfigDict: "a dict"}


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]) -> ml_collections.ConfigDict:
    """Applies ["--config.a.b=value", ...] (also "--config.a.b value") to a locked copy of `config`.

    `ml_collections.config_flags` parses them against the recipe's types (absl flags); its errors
    become one-line SegjaxErrors naming the override, with the nearest key where one is close.
    """
    from absl import flags
    from ml_collections import config_flags

    for arg in overrides:
        if not arg.startswith("--config.") and (arg.startswith("-") or arg is overrides[0]):
            raise SegjaxError(f"unrecognized argument {arg!r}; overrides look like --config.batch_size=8")
    for i, arg in enumerate(overrides):
        if arg.startswith("--config.") and "=" not in arg and (i + 1 == len(overrides)
                                                                or overrides[i + 1].startswith("--")):
            raise SegjaxError(f"{arg}: missing value; write {arg}=VALUE")
    flag_values = flags.FlagValues()
    argv = ["segjax", *(_json_dict_as_literal(config, arg) for arg in overrides)]
    try:  # the override flags are defined from argv, so an unknown key fails already here
        config_flags.DEFINE_config_dict("config", ml_collections.ConfigDict(config.to_dict()),
                                        flag_values=flag_values, lock_config=True, sys_argv=argv)
        flag_values(argv)
    except (AttributeError, KeyError):  # a key the recipe does not have
        raise _first_unknown_key(config, overrides) from None
    except flags.Error as e:
        raise _bad_value(config, overrides, str(e)) from None
    return flag_values.config


def _json_dict_as_literal(config, arg: str) -> str:
    """A dict value may be JSON (`{"bilinear": true}`): config_flags reads Python literals."""
    key, sep, raw = arg[len("--config."):].partition("=")
    if not (arg.startswith("--config.") and sep and raw.lstrip().startswith("{")):
        return arg
    try:
        return f"--config.{key}={json.loads(raw)!r}"
    except json.JSONDecodeError:
        return arg


def _first_unknown_key(config, overrides: list[str]) -> SegjaxError:
    for arg in overrides:
        if arg.startswith("--config."):
            error = _unknown_key(config, arg[len("--config."):].split("=", 1)[0])
            if error is not None:
                return error
    return SegjaxError(f"unknown key in {' '.join(overrides)}")


def _unknown_key(config, key: str) -> SegjaxError | None:
    parent, parts = config, key.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(parent, ml_collections.ConfigDict) or part not in parent:
            known = sorted(parent.keys()) if isinstance(parent, ml_collections.ConfigDict) else []
            near = difflib.get_close_matches(part, known, n=1)
            hint = f"; did you mean --config.{'.'.join(parts[:depth] + [near[0]])}?" if near else ""
            if depth and not near:  # a new entry of a dict-valued key: give the whole dict
                hint = f"; set the whole dict instead, e.g. --config.{'.'.join(parts[:depth])}='{{\"{part}\": ...}}'"
            return SegjaxError(f"--config.{key}: unknown key {part!r}; known: {', '.join(known) or 'none'}{hint}")
        parent = parent[part]
    return None


def _bad_value(config, overrides: list[str], message: str) -> SegjaxError:
    """absl's "flag --config.k=v: why" -> "--config.k=v: expected <the recipe's type>"."""
    for arg in overrides:
        key, _, raw = arg[len("--config."):].partition("=")
        if arg.startswith("--config.") and f"--config.{key}=" in message:
            current = config
            for part in key.split("."):
                current = current[part]
            like = current.to_dict() if isinstance(current, ml_collections.ConfigDict) else current
            kind = _KINDS.get(type(current), f"a {type(current).__name__}")
            return SegjaxError(f"--config.{key}={raw}: expected {kind} (like {like!r})")
    return SegjaxError(message.splitlines()[0])


def check(config: ml_collections.ConfigDict, device_count: int = 1) -> None:
    """Checks a whole recipe before any data or compile work; the first problem is a one-line SegjaxError.

    Crop rule (torchvision / mmseg reference pipeline: resize the shorter side to base_size x a scale
    drawn from scale_range, pad to the crop with image 0 / mask 255, random crop): crop_size must not
    exceed base_size * scale_range[1], the largest shorter side; a larger crop would hold padding in
    every training sample. Evaluation pads each batch to the split's largest image, rounded up to a
    multiple of 32, so it has no size limit.
    """
    def bad(key, why):
        return SegjaxError(f"config.{key}={config[key]!r}: {why}")

    for part in (_check_numbers, _check_shapes, _check_choices):
        part(config, bad, device_count)


def _check_numbers(config, bad, device_count: int) -> None:
    for key in ("batch_size", "eval_batch_size", "base_size", "crop_size", "log_every_steps", "keep_checkpoints"):
        if config[key] <= 0:
            raise bad(key, f"must be positive; pass --config.{key}=N with N >= 1")
    for key in ("num_steps", "num_epochs", "eval_every_steps", "stop_at_step", "warmup_epochs", "weight_decay",
                "sample_images", "grad_clip_norm", "momentum", "aux_weight", "dice_weight"):
        if config[key] < 0:
            raise bad(key, f"must be >= 0; pass --config.{key} a non-negative value")
    if not config.learning_rate > 0:
        raise bad("learning_rate", "must be > 0, e.g. --config.learning_rate=0.01")
    if not 0 < config.warmup_factor <= 1:
        raise bad("warmup_factor", "must be in (0, 1], e.g. --config.warmup_factor=0.001")
    if config.nesterov and not config.momentum:
        raise bad("nesterov", "needs momentum > 0; set --config.momentum=0.9 or --config.nesterov=false")
    if not config.num_steps and not config.num_epochs:
        raise bad("num_epochs", "training needs num_epochs > 0 or num_steps > 0")


def _check_shapes(config, bad, device_count: int) -> None:
    """Bands against normalisation, classes against weights, the batch against the devices, the crop."""
    if config.in_channels < 1:
        raise bad("in_channels", "must be >= 1 (3 for RGB; 1 grayscale, 4 RGB-D or RGB-NIR, ...)")
    for key in ("mean", "std"):
        if len(config[key]) != config.in_channels or (key == "std" and min(config[key]) <= 0):
            raise bad(key, f"needs one value per input channel ({config.in_channels}), std > 0, "
                           f"e.g. --config.{key}=" + ",".join(["0.5"] * config.in_channels))
    if config.class_weights and len(config.class_weights) != config.num_classes:
        raise bad("class_weights", f"needs one weight per class ({config.num_classes}), or () for none")
    if not config.eval_scales or min(config.eval_scales) <= 0:
        raise bad("eval_scales", "must be positive scales, e.g. --config.eval_scales=0.5,1.0,1.5")
    if config.batch_size % device_count:
        lo = config.batch_size - config.batch_size % device_count
        fix = f"{lo} or {lo + device_count}" if lo else str(device_count)
        raise bad("batch_size", f"the global batch must be a multiple of the {device_count} devices; "
                                f"use --config.batch_size={fix}")
    scales = tuple(config.scale_range)
    if len(scales) != 2 or not 0 < scales[0] <= scales[1]:
        raise bad("scale_range", "must be (low, high) with 0 < low <= high, e.g. (0.5, 2.0)")
    largest = config.base_size * scales[1]
    if config.crop_size > largest:
        raise bad("crop_size", f"larger than the largest resized shorter side, base_size x scale_range[1] = "
                               f"{config.base_size} x {scales[1]:g} = {largest:g}, so every training crop would be "
                               f"padding; use --config.crop_size <= {int(largest)} or raise base_size")


def _check_choices(config, bad, device_count: int) -> None:
    from segjax import losses, models, tasks

    choices = {"task": tuple(tasks.TASKS), "dtype": ("float32", "bfloat16", "float16"),
               "schedule": ("poly", "cosine"), "optimizer": ("sgd", "adamw"), "nonfinite": ("stop", "skip"),
               "loss": losses.LOSSES, "best_metric": ("miou", "mean_acc", "global_acc", "fwiou", "max_f")}
    for key, allowed in choices.items():
        if config[key] not in allowed:
            raise bad(key, f"choose one of {', '.join(allowed)}")
    fixed = tasks.get(config.task).fixed_num_classes
    if config.num_classes < 1 or (fixed and config.num_classes != fixed):
        raise bad("num_classes", "must be >= 1" + (f" ({fixed} for the {config.task} task)" if fixed else ""))
    if config.model not in models.names():
        raise bad("model", f"unknown model; choose one of {', '.join(models.names())}")


def to_json(config: ml_collections.ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=list)


def base_config() -> ml_collections.ConfigDict:
    """Every key a recipe may set, with defaults from torchvision's segmentation reference recipe
    (references/segmentation/train.py)."""
    c = ml_collections.ConfigDict()
    c.name = ""
    c.task = "segmentation"            # or "saliency" (U2-Net: one sigmoid channel)
    c.model = "unet"
    c.model_kwargs = ml_collections.ConfigDict()
    c.num_classes = 21
    c.dtype = "float32"                # compute dtype; "bfloat16" = mixed precision (params/opt fp32)

    _data_defaults(c)

    c.batch_size = 32                  # global (all devices, all hosts); torchvision's recipe: 4 per GPU x 8
    c.eval_batch_size = 8
    c.num_epochs = 30
    c.num_steps = 0                    # > 0 overrides num_epochs
    c.stop_at_step = 0                 # > 0: checkpoint and stop there (resume by running again)

    c.optimizer = "sgd"
    c.learning_rate = 0.02
    c.momentum = 0.9
    c.nesterov = False
    c.weight_decay = 1e-4
    c.lr_mult = ml_collections.ConfigDict({"aux_classifier": 10.0})
    c.grad_clip_norm = 0.0             # 0 = off
    c.schedule = "poly"                # or "cosine"
    c.power = 0.9
    c.warmup_epochs = 1.0
    c.warmup_factor = 1e-3

    c.loss = "ce"                      # "ce", "ce+dice", "soft_iou", "ce+soft_iou", "u2net_bce"
    c.aux_weight = 0.5
    c.dice_weight = 1.0                # weight of the dice term in "ce+dice"
    c.class_weights = ()               # () = unweighted

    c.seed = 0
    c.compilation_cache = True         # JAX's persistent cache: $SEGJAX_COMPILATION_CACHE or ~/.cache/segjax/jax_cache
    c.log_every_steps = 10
    c.eval_every_steps = 0             # 0 = once per epoch
    c.keep_checkpoints = 2             # latest k, plus the best by best_metric
    c.best_metric = "miou"             # "miou" (segmentation) or "max_f" (saliency)
    c.nonfinite = "stop"               # "stop" with an error naming the step, or "skip" the update
    c.init_checkpoint = ""             # a segjax checkpoint (e.g. `segjax convert` output)
    c.backbone_weights = ""            # an ImageNet .pth/.safetensors for the backbone only

    c.sample_images = 4                # validation samples pictured at each eval: <workdir>/samples/step_N.png
    c.eval_scales = (1.0,)             # DeepLab v3 multi-scale: (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
    c.eval_flip = False
    return c


def _data_defaults(c: ml_collections.ConfigDict) -> None:
    """The data set, its pipeline and the input normalisation."""
    c.dataset = "synthetic"
    c.data_dir = ""                    # "" = $SEGJAX_DATA_DIR or ~/.cache/segjax/data
    c.manual_dir = ""                  # where downloaded archives are, for data sets we can't fetch
    c.data_options = ml_collections.ConfigDict()  # synthetic: image_size, num_train, num_val, ...
    c.train_split = "train"
    c.eval_split = "val"
    c.base_size = 520
    c.crop_size = 480                  # <= base_size * scale_range[1], else every crop is padding (see check())
    c.scale_range = (0.5, 2.0)
    c.hflip = True
    c.vflip = False
    c.in_channels = 3                  # != 3: images read as multi-band (16-bit) TIFF through tifffile
    c.mean = (0.485, 0.456, 0.406)     # per input channel, of the 0-1 range
    c.std = (0.229, 0.224, 0.225)
    c.workers = 0                      # grain worker processes (0 = in the main process)
    c.uint8_batches = False            # ship train images as uint8, normalise on the devices (less host CPU)
