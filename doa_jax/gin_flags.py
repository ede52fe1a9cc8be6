"""Command-line flags for gin-configured commands, without importing gin (so `doa --help` works
where gin is absent): `--gin_file`, `--gin_bindings`, `--gin_search_paths` and T5X's short form
`--gin.MACRO=value`, rewritten to a binding."""
from __future__ import annotations

import argparse
import ast
import re
from typing import Optional, Sequence


def rewrite_gin_args(argv: Optional[Sequence[str]]) -> Optional[list[str]]:
    """T5X-style flags: `--gin.X=V` (or `--gin.X V`) -> `--gin_bindings`, `X = V`."""
    if argv is None:
        return None
    out, args = [], list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--gin.") and len(arg) > len("--gin."):
            name, eq, value = arg[len("--gin."):].partition("=")
            if not eq:
                if i + 1 >= len(args):
                    raise ValueError(f"flag {arg} needs a value: {arg}=VALUE")
                value, i = args[i + 1], i + 1
            out += ["--gin_bindings", binding(name, value)]
        else:
            out.append(arg)
        i += 1
    return out


def binding(name: str, value: str) -> str:
    """`name = value`, quoting `value` when it is not a literal, reference or macro."""
    text = value.strip()
    if not re.fullmatch(r"[A-Za-z_][\w./]*", name):
        raise ValueError(f"--gin.{name}: not a gin macro or parameter name")
    if text.startswith(("@", "%")):
        return f"{name} = {text}"
    try:
        ast.literal_eval(text)
    except (ValueError, SyntaxError):
        text = repr(value)
    return f"{name} = {text}"


class GinFlagParser(argparse.ArgumentParser):
    """Accepts T5X's `--gin.MACRO=value` flags by rewriting them to `--gin_bindings` first."""

    def parse_known_args(self, args=None, namespace=None):
        return super().parse_known_args(rewrite_gin_args(args), namespace)


def add_gin_flags(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """`--gin_file` (repeatable; required unless `required=False`), `--gin_bindings`, `--gin_search_paths`;
    makes the parser take `--gin.X=V` (a subparser from `add_parser` is switched to `GinFlagParser`)."""
    parser.__class__ = GinFlagParser
    parser.add_argument("--gin_file", action="append", required=required, metavar="F",
                        help="gin file (repeatable; searched in the cwd, --gin_search_paths and gin/)")
    parser.add_argument("--gin_bindings", action="append", default=[], metavar="'X = V'",
                        help="a gin binding (repeatable); --gin.X=V is the short form")
    parser.add_argument("--gin_search_paths", default="", metavar="DIRS",
                        help="comma-separated extra directories to search for gin files")
