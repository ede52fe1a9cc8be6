"""The `doa` command: a table of subcommands, each in its own module under `doa_jax.commands`.

A command module defines `register(subparsers)`, which adds its parser and sets
`func=run` (a function taking the parsed args and returning an exit code). Command modules keep
heavy imports (JAX, TensorFlow) inside `run`, so `doa --help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# name -> module; order is the order of `doa --help`.
COMMANDS: dict[str, str] = {
    "demo": "doa_jax.commands.demo",
    "run": "doa_jax.commands.run",
    "predict": "doa_jax.commands.predict",
    "sweep": "doa_jax.commands.sweep",
    "report": "doa_jax.commands.report",
    "convert": "doa_jax.commands.convert",
    "data": "doa_jax.commands.data",
    "score": "doa_jax.commands.score",
    "vocab": "doa_jax.commands.vocab",
    "plan": "doa_jax.commands.plan",
    "calibrate": "doa_jax.commands.calibrate",
    "train": "doa_jax.commands.train",
    "bench": "doa_jax.commands.bench",
    "advise": "doa_jax.commands.advise",
}


class UserError(Exception):
    """A problem with the user's input: printed as one clear line, exit code 2, no traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="doa", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module_name in COMMANDS.values():
        importlib.import_module(module_name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (UserError, FileNotFoundError, ValueError) as e:
        print(f"doa {args.command}: error: {e}", file=sys.stderr)
        return 2

