"""segjax: semantic segmentation in JAX/Flax (FCN, DeepLab v1/v2/v3/v3+, LR-ASPP, UNet, U2-Net).

examples:
  segjax train                                         the default recipe on built-in synthetic data
  segjax train --config deeplabv3_resnet50_voc --config.batch_size=8
  segjax eval --workdir runs/synthetic_unet            the metrics table of the best checkpoint
  segjax predict --checkpoint runs/synthetic_unet photo.jpg --out masks/
  segjax eval --checkpoint converted/ --dataset voc2012 --crf     DeepLab's dense CRF on the probabilities
  segjax export --checkpoint runs/synthetic_unet exported/   StableHLO + model.json (--onnx too)
  segjax inspect deeplabv3_resnet50 --size 513 513     parameters, FLOPs, output stride
  segjax convert deeplabv3_resnet50 deeplabv3_resnet50_coco.pth converted/
  segjax data prepare voc2012 --manual-dir ~/Downloads
  segjax data check my_dataset/ --num-classes 3         counts, labels, class weights, bad masks

Bad input prints one line, `error: ...`, and exits with status 2. `segjax train` stopped by
SIGTERM/SIGINT checkpoints, exits with 128 + the signal number, and the same command resumes.
"""
from __future__ import annotations

import argparse
import sys

from segjax.errors import SegjaxError, writes_to


# ------------------------------------------------------------------------------------------ train

def use_compilation_cache(enabled: bool = True) -> str | None:
    """Turns on JAX's persistent compilation cache, so a later run with the same shapes loads its compiled
    steps from disk instead of compiling them again; returns the cache directory (None: off).

    The directory is $SEGJAX_COMPILATION_CACHE, else $XDG_CACHE_HOME/segjax/jax_cache (~/.cache/...);
    SEGJAX_COMPILATION_CACHE=off turns the cache off, as `enabled=False` does. JAX's own settings, through
    JAX_COMPILATION_CACHE_DIR (used when SEGJAX_COMPILATION_CACHE is unset) or
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS, win over our defaults. Deleting the directory is always safe.
    """
    import os

    import jax

    chosen = os.environ.get("SEGJAX_COMPILATION_CACHE", "").strip()
    if not enabled or chosen.lower() in ("0", "off", "false", "no", "none"):
        jax.config.update("jax_enable_compilation_cache", False)  # also a JAX_COMPILATION_CACHE_DIR of the user's
        return None
    jax.config.update("jax_enable_compilation_cache", True)
    if not chosen and jax.config.jax_compilation_cache_dir:  # the user's JAX_COMPILATION_CACHE_DIR
        return jax.config.jax_compilation_cache_dir
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = os.path.abspath(os.path.expanduser(chosen or os.path.join(root, "segjax", "jax_cache")))
    jax.config.update("jax_compilation_cache_dir", path)
    # Keep what takes noticeable time to compile (the steps, init, eval), not the many tiny helper programs
    # (JAX's default threshold, 1 s, misses a small model's eval step); no minimum entry size.
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    return path


def _quiet_orbax():
    import logging
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.ERROR)
    logging.getLogger("absl").setLevel(logging.ERROR)


def _add_train(sub):
    p = sub.add_parser("train", help="train a recipe (default: a small UNet on the synthetic data set)",
                       epilog="Override any recipe key with --config.KEY=VALUE, e.g. --config.batch_size=8.")
    p.add_argument("--config", default=None, help="a config file with get_config(), or a recipe name "
                   "under segjax/configs/ (default: synthetic_unet)")
    p.add_argument("--workdir", default=None, help="default: ./runs/<recipe name>; an existing workdir resumes")
    multi = p.add_argument_group("multi-process (every process runs the same command; see docs/multihost.md)")
    multi.add_argument("--coordinator-address", default=None, metavar="HOST:PORT",
                       help="process 0's address and a free port (default: $SEGJAX_COORDINATOR_ADDRESS, "
                       "or detected on SLURM / Open MPI / TPU pods)")
    multi.add_argument("--num-processes", type=int, default=None, metavar="N",
                       help="default: $SEGJAX_NUM_PROCESSES or detected; unset = one process")
    multi.add_argument("--process-id", type=int, default=None, metavar="I",
                       help="this process, 0..N-1 (default: $SEGJAX_PROCESS_ID or detected)")
    p.set_defaults(run=_run_train, accepts_extra=True)


def _run_train(args):
    import os
    from segjax import distributed

    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)  # before any JAX use
    from segjax import config as config_lib
    from segjax.train import train_and_evaluate

    config = config_lib.apply_overrides(config_lib.load_config(args.config), args.extra)
    workdir = args.workdir or os.path.join("runs", config.name)
    use_compilation_cache(bool(config.compilation_cache))
    _quiet_orbax()
    with writes_to(workdir, "--workdir"):
        result = train_and_evaluate(config, workdir)
    if result.get("signal"):  # preempted after a checkpoint: 128 + signal number, like a process killed by it
        import signal
        return 128 + int(signal.Signals[result["signal"]])
    return 0


# ------------------------------------------------------------------------------------------ eval

def _add_cache_flag(p):
    p.add_argument("--no-compilation-cache", dest="compilation_cache", action="store_false",
                   help="compile from scratch instead of using JAX's persistent compilation cache "
                   "($SEGJAX_COMPILATION_CACHE, default ~/.cache/segjax/jax_cache)")


def _add_eval(sub):
    p = sub.add_parser("eval", help="metrics table of a trained checkpoint on its validation split")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--workdir", help="a training workdir (its best checkpoint)")
    where.add_argument("--checkpoint", help="a workdir, its checkpoints/ folder, a checkpoint step directory or a converted checkpoint")
    p.add_argument("--dataset", default=None, help="default: the data set the checkpoint was trained on")
    p.add_argument("--split", default=None, help="default: the recipe's eval_split")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--multi-scale", action="store_true", help="average scales 0.5-1.75 (DeepLab v3)")
    p.add_argument("--flip", action="store_true", help="also average horizontal flips")
    p.add_argument("--ms-rule", default="mean-probs", choices=["mean-probs", "max-logits"],
                   help="with --multi-scale: mean-probs (DeepLab v3) or max-logits at 1/0.75/0.5 (DeepLab v2)")
    p.add_argument("--batch-size", type=int, default=8)
    _add_tile_flags(p)
    _add_crf_flags(p)
    _add_cache_flag(p)
    p.set_defaults(run=_run_eval)


def _tile(args):
    return tuple(args.tile) if args.tile else None


def _add_tile_flags(p):
    g = p.add_argument_group("tiled (sliding-window) inference, for images too large to predict whole")
    g.add_argument("--tile", nargs=2, type=int, default=None, metavar=("H", "W"),
                   help="tile size, a multiple of the model's output stride, no larger than the image")
    g.add_argument("--overlap", type=float, default=0.25, help="fraction of a tile shared with its neighbour, "
                   "in [0, 1) (default 0.25); overlaps are blended with a Gaussian window")
    g.add_argument("--tile-batch", type=int, default=4, help="tiles per model call (default 4)")


_CRF_FLAGS = {"iterations": int, "pos_w": float, "pos_xy_std": float, "bi_w": float, "bi_xy_std": float,
              "bi_rgb_std": float}


def _add_crf_flags(p):
    g = p.add_argument_group("fully connected CRF (DeepLab's post-processing; see docs/crf.md)")
    g.add_argument("--crf", action="store_true", help="refine the probabilities with the dense CRF, using the "
                   "checkpoint's own values (converted DeepLab checkpoints carry their reproduction's), else "
                   "kazuto1011's VOC values: 10 iterations, pos_w 3, pos_xy_std 1, bi_w 4, bi_xy_std 67, bi_rgb_std 3")
    for name, kind in _CRF_FLAGS.items():
        g.add_argument("--crf-" + name.replace("_", "-"), type=kind, default=None, dest="crf_" + name,
                       metavar="N" if kind is int else "X", help=f"with --crf: this {name} instead")


def _crf(args) -> dict | None:
    """None without --crf, else the overrides given ({} keeps the checkpoint's or the default values)."""
    given = {name: getattr(args, "crf_" + name) for name in _CRF_FLAGS if getattr(args, "crf_" + name) is not None}
    if given and not args.crf:
        raise SegjaxError(f"--crf-{next(iter(given)).replace('_', '-')} without --crf: add --crf to refine with the CRF")
    return given if args.crf else None


def _run_eval(args):
    from segjax import evaluate

    use_compilation_cache(args.compilation_cache)
    _quiet_orbax()
    scores, names, loaded = evaluate.evaluate(args.checkpoint or args.workdir, dataset=args.dataset,
                                              split=args.split, data_dir=args.data_dir, multi_scale=args.multi_scale,
                                              flip=args.flip, batch_size=args.batch_size, ms_rule=args.ms_rule,
                                              tile=_tile(args), overlap=args.overlap, tile_batch=args.tile_batch,
                                              crf=_crf(args))
    if "crf" in scores:
        from segjax import crf
        print(f"CRF on: {crf.describe(scores['crf'])}")
    print(loaded.card.task.format_scores(scores, names))


# ------------------------------------------------------------------------------------------ predict

def _add_predict(sub):
    p = sub.add_parser("predict", help="write a mask (and an overlay) for each image")
    p.add_argument("--checkpoint", required=True, help="a workdir, its checkpoints/ folder, a checkpoint step directory or a converted checkpoint")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files, or folders of them")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--multi-scale", action="store_true")
    p.add_argument("--flip", action="store_true")
    p.add_argument("--save-probs", action="store_true", help="also write float16 class probabilities "
                   "(<stem>_probs.npy, class names in <stem>_probs.json) and a per-pixel entropy PNG; "
                   "saliency: a 16-bit PNG of the map")
    _add_tile_flags(p)
    _add_crf_flags(p)
    _add_cache_flag(p)
    p.set_defaults(run=_run_predict)


def _run_predict(args):
    from segjax import predict

    use_compilation_cache(args.compilation_cache)
    _quiet_orbax()
    with writes_to(args.out, "--out"):
        written = predict.predict(args.checkpoint, args.images, args.out, multi_scale=args.multi_scale, flip=args.flip,
                                  tile=_tile(args), overlap=args.overlap, tile_batch=args.tile_batch,
                                  save_probs=args.save_probs, crf=_crf(args))
    print(f"wrote {len(written)} files to {args.out}")


# ------------------------------------------------------------------------------------------ export

def _add_export(sub):
    p = sub.add_parser("export", help="a jax.export StableHLO artifact (+ model.json, optionally ONNX) of a checkpoint")
    p.add_argument("--checkpoint", required=True, help="a workdir, its checkpoints/ folder, a checkpoint step "
                   "directory or a converted checkpoint")
    p.add_argument("out_dir", help="output directory (model.stablehlo, model.json[, model.onnx])")
    p.add_argument("--probabilities", action="store_true", help="output softmax (sigmoid) probabilities, not logits")
    p.add_argument("--fixed-size", nargs=2, type=int, default=None, metavar=("H", "W"),
                   help="export for one input size instead of symbolic H and W")
    p.add_argument("--onnx", action="store_true", help='also model.onnx through jax2onnx (pip install "segjax[export]")')
    p.add_argument("--onnx-fixed-size", nargs=2, type=int, default=None, metavar=("H", "W"),
                   help="convert the ONNX model at this size (symbolic batch) while the StableHLO keeps symbolic "
                   "H and W; U2-Net needs it (its symbolic ONNX conversion does not finish)")
    p.set_defaults(run=_run_export)


def _run_export(args):
    from segjax import export, inference

    if args.fixed_size and args.onnx_fixed_size and args.fixed_size != args.onnx_fixed_size:
        raise SegjaxError(f"--fixed-size {' '.join(map(str, args.fixed_size))} and --onnx-fixed-size "
                          f"{' '.join(map(str, args.onnx_fixed_size))} differ; give one of them")
    if args.onnx or args.onnx_fixed_size:
        export.require_onnx()  # before the checkpoint is read or anything is written
    _quiet_orbax()
    loaded = inference.load_for_inference(args.checkpoint)
    size = tuple(args.fixed_size or args.onnx_fixed_size or (64, 64))
    with writes_to(args.out_dir, "output directory"):
        export.export(loaded.card, loaded.variables, args.out_dir, model=loaded.model,
                      probabilities=args.probabilities, symbolic=args.fixed_size is None,
                      onnx=args.onnx or bool(args.onnx_fixed_size), onnx_symbolic_hw=args.onnx_fixed_size is None,
                      example_size=size)
    import os
    print(f"wrote {args.out_dir}: {loaded.card.model} ({', '.join(sorted(os.listdir(args.out_dir)))})")


# ------------------------------------------------------------------------------------------ inspect

def _add_inspect(sub):
    p = sub.add_parser("inspect", help="parameters, FLOPs, output stride and receptive field of a model")
    p.add_argument("name")
    p.add_argument("--size", nargs=2, type=int, default=(480, 480), metavar=("H", "W"))
    p.add_argument("--num-classes", type=int, default=21)
    p.set_defaults(run=_run_inspect)


def _run_inspect(args):
    from segjax import analysis

    print(analysis.report(args.name, num_classes=args.num_classes, size=tuple(args.size)))


# ------------------------------------------------------------------------------------------ convert

def _add_convert(sub):
    p = sub.add_parser("convert", help="convert PyTorch weights (.pth/.safetensors) to a segjax checkpoint")
    p.add_argument("name", help="model name, e.g. deeplabv3_resnet50, unet, u2net")
    p.add_argument("weights", help="input .pth / .safetensors (never unpickled with code execution)")
    p.add_argument("out_dir")
    p.add_argument("--num-classes", type=int, default=None, help="default: read off the weights")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="model_kwargs",
                   help="a model option the weights can't tell, e.g. --set output_stride=16 (repeatable)")
    p.set_defaults(run=_run_convert)


def _model_kwargs(pairs: list[str]) -> dict:
    """['output_stride=16', 'bilinear=False'] -> {'output_stride': 16, 'bilinear': False}."""
    import ast

    kw = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.isidentifier():
            raise SegjaxError(f"--set {pair}: expected KEY=VALUE, e.g. --set output_stride=16")
        try:
            kw[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            kw[key] = raw  # a bare word is a string
    return kw


def _run_convert(args):
    from segjax import convert

    kw = _model_kwargs(args.model_kwargs)
    if args.num_classes is not None:
        kw["num_classes"] = args.num_classes
    with writes_to(args.out_dir, "output directory"):
        variables = convert.convert_file(args.name, args.weights, args.out_dir, **kw)
    from segjax import analysis
    print(f"wrote {args.out_dir}: {args.name}, {analysis.param_count(variables.get('params', {})):,} parameters")


# ------------------------------------------------------------------------------------------ data

def _add_data(sub):
    p = sub.add_parser("data", help="prepare data sets (tfds, array_record) under --data-dir, or check one")
    verbs = p.add_subparsers(dest="data_verb", required=True)
    q = verbs.add_parser("prepare", help="build a data set once (idempotent); prints its split sizes")
    q.add_argument("name", help="voc2012 | voc2012_aug | drive | duts | folder | synthetic")
    q.add_argument("--data-dir", default=None, help="default: $SEGJAX_DATA_DIR or ~/.cache/segjax/data")
    q.add_argument("--manual-dir", default=None,
                   help="folder with the downloaded archives or extracted folders (not for synthetic)")
    q.add_argument("--manifest", default=None, help="JSON manifest for 'folder' (see segjax/data/folder.py)")
    q.add_argument("--image-size", type=int, default=None, help="synthetic: image side in pixels")
    q.add_argument("--num-train", type=int, default=None, help="synthetic: training images")
    q.add_argument("--num-val", type=int, default=None, help="synthetic: validation images")
    q.add_argument("--seed", type=int, default=None, help="synthetic: generator seed")
    q.set_defaults(run=_run_data_prepare)
    c = verbs.add_parser("check", help="one table of a data set: counts, sizes, labels, class frequencies, "
                         "suggested class weights; exits 1 naming the files training would choke on")
    c.add_argument("name", metavar="NAME|DIR", help="a prepared data set (voc2012, folder:NAME, ...) or a folder "
                   "(a manifest, or DIR/{train,val}/images + masks)")
    c.add_argument("--num-classes", type=int, default=None, help="what the model will predict "
                   "(default: the data set's classes)")
    c.add_argument("--in-channels", type=int, default=None, help="a folder's image bands (default: its "
                   "manifest's, else 3); images with another band count are problems")
    c.add_argument("--data-dir", default=None, help="default: $SEGJAX_DATA_DIR or ~/.cache/segjax/data")
    c.set_defaults(run=_run_data_check)


def _run_data_prepare(args):
    from segjax import data

    opts = {k: getattr(args, k) for k in ("image_size", "num_train", "num_val", "seed") if getattr(args, k) is not None}
    if opts and args.name != "synthetic":
        raise SegjaxError(f"--{sorted(opts)[0].replace('_', '-')} only applies to 'synthetic'")
    sizes = data.prepare(args.name, data_dir=args.data_dir, manual_dir=args.manual_dir, manifest=args.manifest, **opts)
    print(f"{args.name}: " + ", ".join(f"{split} {n:,}" for split, n in sizes.items()))


def _run_data_check(args):
    from segjax import data

    report = data.check(args.name, data_dir=args.data_dir, num_classes=args.num_classes,
                        in_channels=args.in_channels)
    print(report.table)
    if report.ok:
        return 0
    print(f"{len(report.problems)} problem(s): training would fail or learn wrong labels", file=sys.stderr)
    for line in report.problems:
        print(f"  {line}", file=sys.stderr)
    return 1


# ------------------------------------------------------------------------------------------ main

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segjax", description=__doc__.split("\n\n", 1)[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="verb", required=True)
    for add in (_add_train, _add_eval, _add_predict, _add_export, _add_inspect, _add_convert, _add_data):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    try:
        return args.run(args) or 0
    except SegjaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return getattr(e, "exit_status", 2)  # preemption.Interrupted: 128 + signal number


if __name__ == "__main__":
    sys.exit(main())
