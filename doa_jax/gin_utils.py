"""Gin plumbing: parses gin files plus `--gin.X=V` flags (the configurables are registered by
`doa_jax.configurables`, which the CLI calls first).

Gin builds objects (e.g. `MODEL_CONFIG = @T5Config()`, `TRAIN_CONFIG = @TrainConfig()`) and the
commands pass them on explicitly; the library below the commands reads no gin state. One exception,
by design: a sweep (`experiment.sweep.load_sweep`) rebinds the grid's macros per point and builds
each point's CELL from the parsed config.

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
import dataclasses
import difflib
import io
import logging
import os
import pathlib
import re
import tokenize
from typing import Any, Iterable, Optional

import gin
from gin import resource_reader

from doa_jax import storage

GIN_DIR = pathlib.Path(__file__).resolve().parents[1] / "gin"



def _package_file_exists(path: str) -> bool:
    """gin's check for a gin file inside a Python package, without its crash when the folder part
    names a plain folder on sys.path (a namespace package, e.g. the `runs/` output folder next to
    `include 'runs/sweep.gin'`): such a folder holds no packaged gin files."""
    try:
        return resource_reader.system_path_file_exists(path)
    except TypeError:
        return False


# The project's gin files are found through search paths; the package-resource reader gin registers
# stays (T5X-style `package/file.gin` names), with its existence check made safe.
gin.config._FILE_READERS[:] = [(read, _package_file_exists if exists is resource_reader.system_path_file_exists
                                else exists) for read, exists in gin.config._FILE_READERS]

_registered = False
_search_paths: list[pathlib.Path] = []
_last_parse: dict[str, list[str]] = {"files": [], "bindings": []}   # for error messages only


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
_DEFINES = re.compile(r"^([A-Za-z_]\w*)\s*=")              # a macro binding: a bare name at column 0
_USES = re.compile(r"%([A-Za-z_]\w*)\b")


@dataclasses.dataclass
class MacroScan:
    """What gin files (and their includes) say about macros, each with a (file, line): the first
    requirement and use, the last definition (the one gin keeps)."""

    required: dict[str, tuple[str, int]] = dataclasses.field(default_factory=dict)
    defined: dict[str, tuple[str, int]] = dataclasses.field(default_factory=dict)
    used: dict[str, tuple[str, int]] = dataclasses.field(default_factory=dict)


def scan_macros(gin_files: Iterable[str]) -> MacroScan:
    """Macros the files require (`X = %gin.REQUIRED`), define (`X = ...`) and use (`%X`)."""
    scan = MacroScan()
    seen: set[pathlib.Path] = set()

    def visit(name: str, parent: Optional[pathlib.Path]) -> None:
        path = _resolve(name, parent)
        if path is None or path.resolve() in seen:
            return
        seen.add(path.resolve())
        for lineno, line in _gin_lines(path):
            where = (_display(path), lineno)
            code = line.split("#", 1)[0]
            m = _INCLUDE.match(code)
            if m:
                visit(m.group(1), path.parent)
            m = _REQUIRED.match(code)
            if m:
                scan.required.setdefault(m.group(1), where)
            m = _DEFINES.match(code)
            if m:
                scan.defined[m.group(1)] = where
            for used in _USES.findall(code):
                if used != "gin":
                    scan.used.setdefault(used, where)

    for f in gin_files:
        visit(f, None)
    return scan


def _gin_lines(path: pathlib.Path) -> list[tuple[int, str]]:
    try:
        return list(enumerate(path.read_text(encoding="utf-8").splitlines(), 1))
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte 0x{e.object[e.start]:02x}); "
                         f"save the gin file as UTF-8") from None


def required_macros(gin_files: Iterable[str]) -> dict[str, tuple[str, int]]:
    """{macro: (file, line)} for every `MACRO = %gin.REQUIRED` in the files and their includes."""
    return scan_macros(gin_files).required


def _binding_name(binding_text: str) -> Optional[str]:
    m = _DEFINES.match(binding_text.strip())
    return m.group(1) if m else None


def check_bindings(gin_files: Iterable[str], bindings: Iterable[str], known: Iterable[str] = ()) -> None:
    """Raises ValueError for a binding of a macro that no gin file (or other binding) defines or
    uses, with the nearest known names: a misspelled `--gin.TRAIN_STEPSS=5` would otherwise define
    a new macro nobody reads and the run would silently use the defaults."""
    bindings = list(bindings)
    scan = scan_macros(gin_files)
    names = set(scan.defined) | set(scan.used) | set(known)
    for b in bindings:
        names.update(_USES.findall(b))
    for b in bindings:
        name = _binding_name(b)
        if name is None or name in names:
            continue
        close = difflib.get_close_matches(name, sorted(names), n=3, cutoff=0.6)
        hint = (f"did you mean {' or '.join(close)}?" if close
                else "check the spelling against the macros the gin files define")
        raise ValueError(f"--gin.{name}: unknown gin macro {name} (no loaded gin file defines or uses it); "
                         f"{hint}")


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
          search_paths: Iterable[str] = (), check: bool = True, known_macros: Iterable[str] = ()) -> None:
    """Clears gin, then parses files (searched in cwd, `search_paths` and `gin/`) and bindings.

    With `check`, an unset `%gin.REQUIRED` macro raises a ValueError naming it and its file.
    A binding of a macro that neither the files nor `known_macros` (macros the caller reads
    with a default) mention is a ValueError with a did-you-mean; a syntax error, an unknown
    configurable or parameter is a one-line ValueError naming the file (or flag) and line.
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
    bindings = list(bindings)
    check_bindings(gin_files, bindings, known_macros)
    with _quiet_resource_lookups():
        try:
            gin.parse_config_files_and_bindings(resolved, bindings, finalize_config=False)
        except tokenize.TokenError as e:
            raise ValueError(f"{_token_error_location(resolved, bindings)}: gin syntax error: {e.args[0]} "
                             f"(a bracket left open)") from None
        except (SyntaxError, ValueError) as e:
            raise ValueError(_one_line_parse_error(e, bindings)) from None
    _last_parse.update(files=resolved, bindings=bindings)
    if check:
        check_required(gin_files)
    if finalize:
        gin.finalize()


def _one_line_parse_error(e: Exception, bindings: list[str]) -> str:
    """gin's multi-line (or tokenizer) error as `file:line: message`."""
    if isinstance(e, SyntaxError):
        text = (e.text or "").strip()
        if e.filename and not e.filename.startswith("<"):
            return f"{e.filename}:{e.lineno}: gin syntax error: {e.msg}" + (f": {text}" if text else "")
        return f"{_flag_of(bindings, e.lineno)}: gin syntax error: {e.msg}"
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    message = lines[0] if lines else type(e).__name__
    for ln in lines[1:]:
        m = re.match(r'In file "([^"]+)", line (\d+)', ln)
        if m:
            return f"{m.group(1)}:{m.group(2)}: {message}"
        m = re.match(r"In bindings string line (\d+)", ln)
        if m:
            return f"{_flag_of(bindings, int(m.group(1)))}: {message}"
    return message


def _flag_of(bindings: list[str], lineno: Optional[int]) -> str:
    """The flag of gin's `lineno` in the bindings string (the bindings joined by newlines)."""
    lines = "\n".join(bindings).splitlines()
    if not lineno or lineno > len(lines):
        return "--gin_bindings"
    text = lines[lineno - 1].strip()
    name = _binding_name(text)
    return f"--gin.{name} ({text})" if name else f"--gin_bindings '{text}'"


def _token_error_location(files: list[str], bindings: list[str]) -> str:
    """`file:line` of the innermost bracket left open in the first gin text that does not tokenize."""
    texts = [(f, pathlib.Path(f).read_text(encoding="utf-8")) for f in files]
    texts += [(f"--gin.{_binding_name(b)} ({b.strip()})" if _binding_name(b) else f"--gin_bindings '{b}'", b)
              for b in bindings]
    for where, text in texts:
        opened: list[int] = []
        try:
            for tok in tokenize.generate_tokens(io.StringIO(text).readline):
                if tok.type == tokenize.OP and tok.string in "([{":
                    opened.append(tok.start[0])
                elif tok.type == tokenize.OP and tok.string in ")]}" and opened:
                    opened.pop()
        except tokenize.TokenError:
            return where if where.startswith("--gin") else f"{where}:{opened[-1] if opened else 1}"
        except SyntaxError:
            continue
    return "gin"


def _macro_origin(name: str) -> str:
    """Where macro `name` gets its value: the flag, or the last gin file line binding it."""
    if any(_binding_name(b) == name for b in _last_parse["bindings"]):
        return f"--gin.{name}"
    where = scan_macros(_last_parse["files"]).defined.get(name)
    return f"{where[0]}:{where[1]}" if where else "its default"


def _one_line_build_error(name: str, e: Exception) -> str:
    """A failed `@Configurable()` build as one line naming the configurable, and for each of its
    parameters the message mentions, the macro feeding it and where that macro is set."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    message = lines[0] if lines else type(e).__name__
    m = re.search(r"In call to configurable '(\w+)'", str(e))
    configurable = m.group(1) if m else None
    scoped = re.match(rf"([\w/]+/{configurable}): (.*)", message) if configurable else None
    if scoped:     # raised under a scope (doa_jax.configurables): its parameters are the scope's
        configurable, message = scoped.groups()
    origins = []
    for word in dict.fromkeys(re.findall(r"[A-Za-z_]\w*", message)) if configurable else ():
        try:
            ref = gin.query_parameter(f"{configurable}.{word}")
        except (ValueError, KeyError):
            continue
        if isinstance(ref, gin.config.ConfigurableReference) and str(ref).startswith("%"):
            origins.append(f"{word} = {ref} from {_macro_origin(str(ref)[1:])}")
    where = f" ({'; '.join(origins)})" if origins else ""
    return f"{configurable or name}: {message}{where}"


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
        if not value.evaluate:
            return value.scoped_configurable_fn
        try:
            return value.scoped_configurable_fn()
        except (TypeError, ValueError) as e:
            raise ValueError(_one_line_build_error(name, e)) from None
    return value


def write_operative_config(model_dir: str | os.PathLike, name: str = "config.gin") -> storage.AnyPath:
    """Writes the operative config (what the run used) into `model_dir` (local or a URL); returns its path."""
    path = storage.path(model_dir) / name
    storage.write_atomic(path, gin.operative_config_str())
    return path


__all__ = ["GIN_DIR", "binding", "check_required", "macro", "mark_registered", "parse", "registered",
           "required_macros", "rewrite_gin_args", "write_operative_config"]


def parse_flags(args: argparse.Namespace, known_macros: Iterable[str] = ()) -> None:
    """`parse` with the files, bindings and search paths of `add_gin_flags`; `known_macros`: the
    macros the command reads with a default (they may be set though no gin file mentions them)."""
    parse(args.gin_file, args.gin_bindings, search_paths=[s for s in args.gin_search_paths.split(",") if s],
          known_macros=known_macros)
