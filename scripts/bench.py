#!/usr/bin/env python3
"""`doa bench` from a checkout, without installing the package: `python3 scripts/bench.py [flags]`.

Builds only the bench command's parser, so it runs where the rest of the `doa` CLI's
dependencies (TensorFlow, SeqIO, gin) are absent, e.g. on the lent GPU machine.

Examples:
  python3 scripts/bench.py --parts train decode --sizes small base --peer peer.json --out ours.json
  doa aot --target h100 --size xxl --phase train --optimizer adafactor --param-dtype bfloat16 --remat full  (compile only)
  python3 scripts/bench.py --show ours.json --peer peer.json
See `python3 scripts/bench.py --help` and notes/performance.md.
"""
import argparse
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from doa_jax.cli import UserError  # noqa: E402  (the cli module imports nothing heavy)
from doa_jax.commands import bench  # noqa: E402


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench.py")
    bench.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", *argv])
    try:
        return int(args.func(args) or 0)
    except (UserError, FileNotFoundError, ValueError) as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
