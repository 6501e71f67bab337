"""Recipes: a Python file with `get_config() -> ml_collections.ConfigDict`, plus `--config.key=value` overrides.

Overrides are type-checked against the recipe: a key the recipe doesn't have, or a value that
doesn't parse as the key's type, is a one-line `SegjaxError`.
"""
from __future__ import annotations

import ast
import importlib.util
import json
import os

import ml_collections

from segjax.errors import SegjaxError

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "configs")
DEFAULT_RECIPE = "synthetic_unet"


def recipe_path(name_or_path: str) -> str:
    """A config file path, or a recipe name under experiments/configs/."""
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
    config = module.get_config()
    if not isinstance(config, ml_collections.ConfigDict):
        raise SegjaxError(f"{path}: get_config() must return an ml_collections.ConfigDict")
    if not config.get("name"):
        with config.unlocked():
            config.name = os.path.splitext(os.path.basename(path))[0]
    return config


def _parse(raw: str, current, key: str):
    """Parses `raw` as the type of `current` (the recipe's value)."""
    def bad(why: str):
        return SegjaxError(f"--config.{key}={raw}: {why}")

    if isinstance(current, bool):
        low = raw.lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise bad("expected true or false")
    if isinstance(current, int):
        try:
            return int(raw)
        except ValueError:
            raise bad("expected an integer") from None
    if isinstance(current, float):
        try:
            return float(raw)
        except ValueError:
            raise bad("expected a number") from None
    if isinstance(current, str):
        return raw
    if current is None:  # untyped in the recipe: a Python literal if it is one, else a string
        try:
            return ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            return raw
    if isinstance(current, (tuple, list)):
        try:
            value = ast.literal_eval(raw if raw.strip().startswith(("(", "[")) else f"({raw},)")
        except (ValueError, SyntaxError):
            raise bad(f"expected a list like {list(current)}") from None
        if not isinstance(value, (tuple, list)):
            value = (value,)
        if current and len(value) != len(current) and all(isinstance(c, (int, float)) for c in current):
            if len(current) in (2, 3):  # fixed-size pairs/triples (scale_range, mean, std)
                raise bad(f"expected {len(current)} values")
        return type(current)(value)
    if isinstance(current, (dict, ml_collections.ConfigDict)):
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            try:
                value = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                raise bad("expected a dict like {'key': value}") from None
        if not isinstance(value, dict):
            raise bad("expected a dict")
        return ml_collections.ConfigDict(value) if isinstance(current, ml_collections.ConfigDict) else value
    raise bad(f"cannot override a {type(current).__name__}")


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]) -> ml_collections.ConfigDict:
    """Applies ["--config.a.b=value", ...] (also "--config.a.b value") to a copy of `config`."""
    config = ml_collections.ConfigDict(config.to_dict())  # a copy; keeps the recipe's value types
    items = list(overrides)
    while items:
        arg = items.pop(0)
        if not arg.startswith("--config."):
            raise SegjaxError(f"unrecognized argument {arg!r}; overrides look like --config.batch_size=8")
        body = arg[len("--config."):]
        if "=" in body:
            key, raw = body.split("=", 1)
        elif items and not items[0].startswith("--"):
            key, raw = body, items.pop(0)
        else:
            raise SegjaxError(f"{arg}: missing value; write --config.{body}=VALUE")
        parent, leaf = config, key.split(".")
        for part in leaf[:-1]:
            if not isinstance(parent.get(part, None), ml_collections.ConfigDict):
                raise SegjaxError(f"--config.{key}: unknown key {part!r}; known: {', '.join(sorted(parent.keys()))}")
            parent = parent[part]
        name = leaf[-1]
        if name not in parent:
            known = ", ".join(sorted(parent.keys()))
            raise SegjaxError(f"--config.{key}: unknown key {name!r}; known: {known}")
        value = _parse(raw, parent[name], key)
        with parent.unlocked():
            parent[name] = value
    return config


def to_json(config: ml_collections.ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=list)


def base_config() -> ml_collections.ConfigDict:
    """Every key a recipe may set, with the seeds' defaults (torchvision's segmentation reference)."""
    c = ml_collections.ConfigDict()
    c.name = ""
    c.task = "segmentation"            # or "saliency" (U2-Net: one sigmoid channel)
    c.model = "unet"
    c.model_kwargs = ml_collections.ConfigDict()
    c.num_classes = 21
    c.dtype = "float32"                # compute dtype; "bfloat16" = mixed precision (params/opt fp32)

    c.dataset = "synthetic"
    c.data_dir = ""                    # "" = $SEGJAX_DATA_DIR or ~/.cache/segjax/data
    c.manual_dir = ""                  # where downloaded archives are, for data sets we can't fetch
    c.data_options = ml_collections.ConfigDict()  # synthetic: image_size, num_train, num_val, ...
    c.train_split = "train"
    c.eval_split = "val"
    c.base_size = 520
    c.crop_size = 480
    c.scale_range = (0.5, 2.0)
    c.hflip = True
    c.vflip = False
    c.mean = (0.485, 0.456, 0.406)
    c.std = (0.229, 0.224, 0.225)
    c.workers = 0                      # grain worker processes (0 = in the main process)

    c.batch_size = 32                  # global (all devices, all hosts); the seeds use 4 per GPU x 8
    c.eval_batch_size = 8
    c.num_epochs = 30
    c.num_steps = 0                    # > 0 overrides num_epochs
    c.stop_at_step = 0                 # > 0: checkpoint and stop there (resume by running again)

    c.optimizer = "sgd"
    c.learning_rate = 0.02
    c.momentum = 0.9
    c.weight_decay = 1e-4
    c.lr_mult = ml_collections.ConfigDict({"aux_classifier": 10.0})
    c.grad_clip_norm = 0.0             # 0 = off
    c.schedule = "poly"                # or "cosine"
    c.power = 0.9
    c.warmup_epochs = 1.0
    c.warmup_factor = 1e-3

    c.loss = "ce"                      # "ce", "ce+dice", "u2net_bce"
    c.aux_weight = 0.5
    c.dice_weight = 1.0                # weight of the dice term in "ce+dice"
    c.class_weights = ()               # () = unweighted

    c.seed = 0
    c.log_every_steps = 10
    c.eval_every_steps = 0             # 0 = once per epoch
    c.keep_checkpoints = 2             # latest k, plus the best by best_metric
    c.best_metric = "miou"             # "miou" (segmentation) or "max_f" (saliency)
    c.nonfinite = "stop"               # "stop" with an error naming the step, or "skip" the update
    c.init_checkpoint = ""             # a segjax checkpoint (e.g. `segjax convert` output)
    c.backbone_weights = ""            # an ImageNet .pth/.safetensors for the backbone only

    c.eval_scales = (1.0,)             # DeepLab v3 multi-scale: (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
    c.eval_flip = False
    return c
