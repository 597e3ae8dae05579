"""Command line: `astolfo-dist merge|inspect|demo`. Maps the engine's typed errors to exit
codes (0 ok, 2 bad input or usage, 1 internal error, 130 interrupted) and one line each."""

from __future__ import annotations

import argparse
import gc
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import yaml

from . import __version__
from .budget import parse_size
from .errors import AstolfoError
from .executors.ray import SINKS
from .merge import DEFAULT_CHUNK_MB, EXECUTORS, MergeResult
from .recipe.library import REGISTRY as METHODS
from .recipe.spec import ACCUMULATE_CHOICES, DTYPE_CHOICES, KEY_POLICIES

log = logging.getLogger("astolfo_dist")


def _weights(text: str) -> list[float]:
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _param(text: str) -> tuple[str, object]:
    name, sep, raw = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        value = yaml.safe_load(raw)  # numbers, true/false, lists [0.5, 0.5], strings
    except yaml.YAMLError:
        value = raw
    return name.strip(), value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="astolfo-dist", description="Merge many checkpoints in bounded memory.")
    parser.add_argument("--version", action="version", version=f"astolfo-dist {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    common.add_argument("-q", "--quiet", action="store_true", help="only errors on stderr")
    sub = parser.add_subparsers(dest="command", required=True)
    ex = argparse.ArgumentParser(add_help=False)  # how to run: shared by merge and run
    ex.add_argument("-o", "--output", required=True, help="output .safetensors path (a folder with --shard-size)")
    ex.add_argument("--memory", type=_size, default=None,
                   help="memory budget of the whole merge, e.g. 400MB, 4GiB (default: half of what is available)")
    ex.add_argument("--chunk-mb", type=float, default=None,
                   help=f"accumulator chunk size in MiB (default {DEFAULT_CHUNK_MB:g}, less if --memory is tight)")
    ex.add_argument("--shard-mb", type=float, default=None, help="input MiB per shard (default: plan size / 64)")
    ex.add_argument("--workers", type=int, default=None, help="worker threads (default: CPU count)")
    ex.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ex.add_argument("--tensor-cache-mb", type=float, default=None,
                   help="per worker: keep a tensor's inputs on the device between a method's statistic passes when "
                        "they fit (default: half the free GPU memory with --device cuda, 0 on the CPU)")
    ex.add_argument("--executor", choices=EXECUTORS, default="local", help="threads in-process, or Ray tasks")
    ex.add_argument("--address", help="Ray cluster to join (auto, HOST:PORT, ray://...); default a private local Ray")
    ex.add_argument("--sink", choices=SINKS, default="auto",
                   help="ray: direct = workers write the output files; writer = an actor on this node does")
    ex.add_argument("--spill-dir", help="ray: object spilling folder (an SSD path) of a private local Ray")
    ex.add_argument("--object-store-mb", type=float, help="ray: object store of a private local Ray (default: budget)")
    ex.add_argument("--writer-inflight-mb", type=float,
                   help="ray writer sink: MiB of chunks in flight to the writer (default: half the object store)")
    ex.add_argument("--shard-size", type=_size, help="write a folder of HF shards of at most SIZE (e.g. 5GB, 500MiB)")
    ex.add_argument("--resume", action="store_true", help="reuse the verified shards of an interrupted run")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing output")
    ex.add_argument("--cache-dir",
                   help="cache folder: converted .ckpt files, and byte ranges read from remote (s3://...) inputs")


    m = sub.add_parser("merge", parents=[common, ex], help="merge models into one safetensors file")
    m.add_argument("models", nargs="+", metavar="MODEL", help="safetensors file, HF folder, fsspec URL or .ckpt")
    m.add_argument("--weights", type=_weights, help="w1,w2,... one per model, normalised to sum 1 (default 1/N)")
    m.add_argument("--keys", choices=KEY_POLICIES, default="strict", help="key-set policy (default strict)")
    m.add_argument("--dtype", choices=DTYPE_CHOICES, default="keep", help="output float dtype (default keep)")
    m.add_argument(
        "--accumulate",
        choices=ACCUMULATE_CHOICES,
        default="auto",
        help="accumulator: auto = fp32 for fp16/fp8 outputs, fp64 for bf16/fp32/fp64 outputs",
    )
    m.add_argument("--method", help="merge method (default: uniform, or weighted_sum with --weights); "
                   "one of: " + ", ".join(sorted(METHODS)))
    m.add_argument("--base", metavar="MODEL", help="base model of task-vector methods (ties, dare, ...)")
    m.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", type=_param,
                   help="a method parameter, repeatable (e.g. --set density=0.2 --set seed=7)")
    m.add_argument("--drop", action="append", default=[], metavar="REGEX", help="drop keys matching (repeatable)")
    m.add_argument(
        "--replace", action="append", default=[], metavar="PREFIX=MODEL", help="copy keys under PREFIX from MODEL"
    )

    r = sub.add_parser("run", parents=[common, ex],
                       help="run a YAML recipe, or re-run the recipe stored in a merged file")
    r.add_argument("recipe", metavar="RECIPE", help="recipe.yaml, or a .safetensors file merged by astolfo-dist")
    r.add_argument("--node", metavar="NAME",
                   help="write this node of a recipe DAG instead of its output (an intermediate model)")

    i = sub.add_parser("inspect", parents=[common], help="summarise a checkpoint from its header")
    i.add_argument("model", metavar="MODEL")

    d = sub.add_parser("demo", parents=[common], help="make small SD1.5-layout models and merge them")
    d.add_argument("--dir", default="astolfo-demo", help="folder for the demo models and output")
    d.add_argument("--models", type=int, default=4)
    d.add_argument("--scale", type=int, default=16, help="shrink every dimension by this factor")
    return parser


def _summary(result: MergeResult) -> None:
    gb = result.read_bytes / 1e9
    log.info(
        "merged %d tensors: read %.2f GB in %.2f s (%.2f GB/s), wrote %.2f GB",
        result.tensors,
        gb,
        result.seconds,
        gb / max(result.seconds, 1e-9),
        result.written_bytes / 1e9,
    )


def _run(args: argparse.Namespace) -> int:
    if args.command in ("merge", "run"):
        from .merge import merge, run_recipe

        options = {
            "chunk_mb": args.chunk_mb,
            "shard_mb": args.shard_mb,
            "workers": args.workers,
            "device": args.device,
            "overwrite": args.overwrite,
            "cache_dir": args.cache_dir,
            "progress": None if not args.quiet else False,
            "executor": args.executor,
            "address": args.address,
            "sink": args.sink,
            "spill_dir": args.spill_dir,
            "shard_size": args.shard_size,
            "resume": args.resume,
            "memory": args.memory,
            "object_store_mb": args.object_store_mb,
            "writer_inflight_mb": args.writer_inflight_mb,
            "tensor_cache_mb": args.tensor_cache_mb,
        }
        if args.command == "run":
            from .recipe.files import load_recipe

            recipe = load_recipe(args.recipe)
            if args.node:
                recipe = recipe.upto(args.node)
            result = run_recipe(recipe, args.output, **options)
        else:
            result = merge(
                args.models,
                args.output,
                weights=args.weights,
                keys=args.keys,
                dtype=args.dtype,
                accumulate=args.accumulate,
                drop=args.drop,
                replace=args.replace,
                method=args.method,
                base=args.base,
                params=dict(args.set),
                **options,
            )
        _summary(result)
        print(result.output)
    elif args.command == "inspect":
        from .inspect import inspect_model

        print("\n".join(inspect_model(args.model).lines()))
    elif args.command == "demo":
        from .demo import run_demo

        result = run_demo(Path(args.dir), models=args.models, scale=args.scale)
        _summary(result)
        print(result.output)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.debug else logging.ERROR if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="astolfo-dist: %(message)s", stream=sys.stderr, force=True)
    try:
        return _run(args)
    except AstolfoError as exc:
        if args.debug:
            raise
        print(f"astolfo-dist: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("astolfo-dist: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        if args.debug:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"astolfo-dist: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # the CLI edge: one line, not a traceback, unless --debug
        if args.debug:
            raise
        print(f"astolfo-dist: internal error: {type(exc).__name__}: {exc} (rerun with --debug)", file=sys.stderr)
        return 1


def entry() -> NoReturn:
    """The `astolfo-dist` command (and `python -m astolfo_dist`): main, in a process of its own.

    The objects made at start-up (torch's and this package's modules, about 170 thousand) are
    never garbage: frozen out of the cyclic collector, whose full passes walked them all during
    a merge (a full-size TIES merge: 2 full passes, 0.14 s holding the GIL; 0.024 s frozen).
    Only here, where the process is the command's: a caller of main() keeps its collector as
    it is."""
    gc.freeze()
    sys.exit(main())


if __name__ == "__main__":
    entry()
