"""`segjax` command line: the only place that parses arguments. Library functions take plain values.

    segjax train | eval | predict | inspect | convert | data

A `SegjaxError` (bad input, a checkpoint that doesn't fit, ...) prints as one line, `error: ...`,
with no traceback, and exits with status 2.
"""
from __future__ import annotations

import argparse
import sys

from segjax.errors import SegjaxError


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
    p.set_defaults(run=_run_convert)


def _run_convert(args):
    from segjax import convert

    kw = {} if args.num_classes is None else {"num_classes": args.num_classes}
    variables = convert.convert_file(args.name, args.weights, args.out_dir, **kw)
    import jax
    n = sum(x.size for x in jax.tree_util.tree_leaves(variables.get("params", {})))
    print(f"wrote {args.out_dir}: {args.name}, {n:,} parameters")


# ------------------------------------------------------------------------------------------ main

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segjax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="verb", required=True)
    for add in (_add_inspect, _add_convert):
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
        return 2


if __name__ == "__main__":
    sys.exit(main())
