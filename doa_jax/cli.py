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
    "aot": "doa_jax.commands.aot",
    "advise": "doa_jax.commands.advise",
}


# The persistent XLA compilation cache (`compilation_cache`): where it lives unless the user set
# JAX_COMPILATION_CACHE_DIR, and the switch that turns it off.
CACHE_ENV = "DOA_COMPILATION_CACHE"


class UserError(Exception):
    """A problem with the user's input: printed as one clear line, exit code 2, no traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="doa", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module_name in COMMANDS.values():
        importlib.import_module(module_name).register(sub)
    return parser


def compilation_cache() -> str | None:
    """Turns on JAX's persistent compilation cache for this process; returns its directory (None: off).

    The cells of a demo, sweep or advice, and reruns of a command, compile the same programs again
    (each process, and each new model or loss, builds its own jitted functions); with the cache a
    repeated compile of an identical program is a file read (MaxText turns its `jax_cache_dir` on by
    default too). The directory is JAX_COMPILATION_CACHE_DIR when set, else
    $XDG_CACHE_HOME/doa_jax/xla (~/.cache/doa_jax/xla); DOA_COMPILATION_CACHE=off turns it off.
    Programs are cached however fast they compiled (the demo's take a second each, and there are
    dozens). Set through the environment before JAX is imported, and through jax.config when it
    already is (`doa` called in-process, e.g. by tests).
    """
    jax = sys.modules.get("jax")
    if os.environ.get(CACHE_ENV, "").strip().lower() in ("off", "0", "false", "no"):
        os.environ["JAX_ENABLE_COMPILATION_CACHE"] = "false"   # also a JAX_COMPILATION_CACHE_DIR set elsewhere
        if jax is not None:
            jax.config.update("jax_enable_compilation_cache", False)
        return None
    default = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                           "doa_jax", "xla")
    directory = os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", default)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    if jax is not None:   # imported before: its config read the environment then
        if jax.config.jax_compilation_cache_dir is None:
            jax.config.update("jax_compilation_cache_dir", directory)
        jax.config.update("jax_persistent_cache_min_compile_time_secs",
                          float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
        directory = jax.config.jax_compilation_cache_dir
    return directory


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    args = build_parser().parse_args(argv)
    compilation_cache()
    try:
        return int(args.func(args) or 0)
    except (UserError, FileNotFoundError, ValueError) as e:
        print(f"doa {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        code = _failed(args.command, e)
        if code is None:
            raise
        return code


def _failed(command: str, e: Exception) -> int | None:
    """Failures that are not the user's, said in one line: a store or disk that cannot be written
    (exit 1), process 0 failing in a multi-host job (exit 1, on the other processes), a host of
    the job that went away (exit 75 at once: the shutdown barrier would wait for it in vain).
    None for anything else (raised with its traceback)."""
    storage = sys.modules.get("doa_jax.storage")
    partitioning = sys.modules.get("doa_jax.partitioning")
    hosts = sys.modules.get("doa_jax.hosts")
    if hosts is not None:
        hosts.exit_if_hosts_lost(e, f"doa {command}")
    if storage is not None and isinstance(e, storage.StorageError):
        print(f"doa {command}: error: {e}. What was written before is intact: fix that and rerun the same "
              f"command to resume", file=sys.stderr)
        return 1
    if partitioning is not None and isinstance(e, partitioning.ChiefFailed):
        print(f"doa {command}: error: {e}", file=sys.stderr)
        return 1
    return None

