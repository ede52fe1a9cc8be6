"""Gin plumbing: parses gin files plus `--gin.X=V` flags (the configurables are registered by
`doa_jax.configurables`, which the CLI calls first).

Code never reads global gin state: gin builds objects (e.g. `MODEL_CONFIG = @T5Config()`,
`TRAIN_CONFIG = @TrainConfig()`) and the caller passes them on explicitly.

Flags follow T5X: `--gin_file F` (repeatable; searched in the cwd, `--gin_search_paths` and the
project's `gin/`), `--gin.MACRO=value` (rewritten to the binding `MACRO = value`) and
`--gin_bindings 'X = V'`. A value that is not a Python literal, `@reference` or `%macro` is taken
as a string, so `--gin.MODEL_DIR=/tmp/run` works without T5X's escaped quotes. Run files declare
their inputs as `%gin.REQUIRED` macros; `check_required` names any left unset and the file (and
line) that requires it. `write_operative_config` saves what a run actually used as
`MODEL_DIR/config.gin`.
"""
from __future__ import annotations

from doa_jax.gin_flags import binding, rewrite_gin_args  # noqa: F401 (re-exported: the T5X flag rewrite)

import argparse

import contextlib
import logging
import os
import pathlib
import re
from typing import Any, Iterable, Optional

import gin

GIN_DIR = pathlib.Path(__file__).resolve().parents[1] / "gin"

_registered = False
_search_paths: list[pathlib.Path] = []


def registered() -> bool:
    """Whether the project's configurables are registered (`doa_jax.configurables.register`)."""
    return _registered


def mark_registered() -> None:
    global _registered
    _registered = True


# ----------------------------------------------------------------------------- flags

# ----------------------------------------------------------------------------- parsing

def _resolve(name: str, relative_to: Optional[pathlib.Path] = None) -> Optional[pathlib.Path]:
    candidates = [pathlib.Path(name)]
    if relative_to is not None:
        candidates.append(relative_to / name)
    candidates += [p / name for p in _search_paths] + [GIN_DIR / name]
    for c in candidates:
        if c.is_file():
            return c
    return None


_INCLUDE = re.compile(r"""^\s*include\s+['"]([^'"]+)['"]""")
_REQUIRED = re.compile(r"^\s*([A-Za-z_]\w*)\s*=\s*%gin\.REQUIRED\b")


def required_macros(gin_files: Iterable[str]) -> dict[str, tuple[str, int]]:
    """{macro: (file, line)} for every `MACRO = %gin.REQUIRED` in the files and their includes."""
    found: dict[str, tuple[str, int]] = {}
    seen: set[pathlib.Path] = set()

    def visit(name: str, parent: Optional[pathlib.Path]) -> None:
        path = _resolve(name, parent)
        if path is None or path.resolve() in seen:
            return
        seen.add(path.resolve())
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            m = _INCLUDE.match(line)
            if m:
                visit(m.group(1), path.parent)
            m = _REQUIRED.match(line)
            if m:
                found.setdefault(m.group(1), (_display(path), lineno))

    for f in gin_files:
        visit(f, None)
    return found


def _display(path: pathlib.Path) -> str:
    try:
        return str(path.resolve().relative_to(GIN_DIR.parent))
    except ValueError:
        return str(path)


def _is_required(value: Any) -> bool:
    return value is gin.config.REQUIRED or (
        isinstance(value, gin.config.ConfigurableReference) and str(value) == "%gin.REQUIRED")


def check_required(gin_files: Iterable[str]) -> None:
    """Raises ValueError naming each `%gin.REQUIRED` macro still unset, and the file requiring it."""
    missing = []
    for name, (path, lineno) in sorted(required_macros(gin_files).items(), key=lambda kv: kv[1][1]):
        try:
            value = gin.query_parameter(f"{name}/macro.value")
        except ValueError:
            continue
        if _is_required(value):
            missing.append(f"{name} (required by {path}:{lineno})")
    if missing:
        first = missing[0].split(" ")[0]
        raise ValueError(f"gin macro{'s' if len(missing) > 1 else ''} not set: {', '.join(missing)}; "
                         f"set each with --gin.{first}=VALUE (or in a gin file; None where allowed)")


class _DropPathNotFound(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != "Path not found: %s"


@contextlib.contextmanager
def _quiet_resource_lookups():
    """Gin logs an error for every search-path prefix an `include` is not under; drop those."""
    root, f = logging.getLogger(), _DropPathNotFound()
    root.addFilter(f)
    try:
        yield
    finally:
        root.removeFilter(f)


def parse(gin_files: Iterable[str], bindings: Iterable[str] = (), *, finalize: bool = True,
          search_paths: Iterable[str] = (), check: bool = True) -> None:
    """Clears gin, then parses files (searched in cwd, `search_paths` and `gin/`) and bindings.

    With `check`, an unset `%gin.REQUIRED` macro raises a ValueError naming it and its file.
    """
    global _search_paths
    if not _registered:
        raise RuntimeError("no gin configurables registered: call doa_jax.configurables.register() first "
                           "(the doa CLI does)")
    gin.clear_config()
    _search_paths = [pathlib.Path(p) for p in search_paths if p]
    for p in [*_search_paths, GIN_DIR]:
        if str(p) not in gin.config._LOCATION_PREFIXES:   # gin appends duplicates otherwise
            gin.add_config_file_search_path(str(p))
    gin_files = list(gin_files)
    resolved = []
    for f in gin_files:
        path = _resolve(f)
        if path is None:
            raise FileNotFoundError(f"gin file {f!r} not found in the current directory, "
                                    f"{', '.join(map(str, _search_paths + [GIN_DIR]))}")
        resolved.append(str(path))
    with _quiet_resource_lookups():
        gin.parse_config_files_and_bindings(resolved, list(bindings), finalize_config=False)
    if check:
        check_required(gin_files)
    if finalize:
        gin.finalize()


_NO_DEFAULT = object()


def macro(name: str, default: Any = _NO_DEFAULT) -> Any:
    """The value of macro `name`, with `@configurable()` references built (e.g. 'MODEL_CONFIG').

    An undefined macro raises a ValueError naming it, unless `default` is given.
    """
    try:
        value = gin.query_parameter(f"{name}/macro.value")
    except ValueError:
        if default is not _NO_DEFAULT:
            return default
        raise ValueError(f"gin macro {name} is not defined by the gin files") from None
    if isinstance(value, gin.config.ConfigurableReference):
        if _is_required(value):
            raise ValueError(f"gin macro {name} is %gin.REQUIRED and was not set: --gin.{name}=VALUE")
        return value.scoped_configurable_fn() if value.evaluate else value.scoped_configurable_fn
    return value


def write_operative_config(model_dir: str | os.PathLike, name: str = "config.gin") -> pathlib.Path:
    """Writes the operative config (what the run used) into `model_dir`; returns its path."""
    path = pathlib.Path(model_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(gin.operative_config_str())
    return path


__all__ = ["GIN_DIR", "binding", "check_required", "macro", "mark_registered", "parse", "registered",
           "required_macros", "rewrite_gin_args", "write_operative_config"]


def parse_flags(args: argparse.Namespace) -> None:
    """`parse` with the files, bindings and search paths of `add_gin_flags`."""
    parse(args.gin_file, args.gin_bindings, search_paths=[s for s in args.gin_search_paths.split(",") if s])
