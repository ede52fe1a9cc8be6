"""`doa bench`: train-step, decoding, start-up and distillation speed on this machine's device.

Measures T5 v1.1 shapes with random weights and bf16 activations (`doa_jax.bench`), prints a
table, writes the rows as JSON, and with `--peer PEER.json` (the output of the PyTorch peer
`hf_t5_baseline.py`) puts the peer's figures and the ratios beside ours. `--show ROWS.json`
prints the table of stored rows without measuring. `--out`, `--show` and `--peer` may be URLs
(gs://...): the rows are put whole after every case; a bucket that cannot be written is an error
before any measurement. `--profile` traces go to a local folder. Compiling for a TPU slice or a GPU
this host does not have (memory per device, fits) is `doa aot`.
"""
from __future__ import annotations

import argparse
import json
import pathlib

from doa_jax.model.config import DECODE_CROSS_KV

PARTS = ("train", "decode", "startup", "distill")


def _int_at_least(minimum: int):
    """An argparse type: an integer >= minimum, with a message naming the bad value."""
    what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


_positive, _count = _int_at_least(1), _int_at_least(0)


def register(sub) -> None:
    p = sub.add_parser("bench", help="measure train/decode speed, MFU, memory and start-up on this device",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", choices=PARTS, default=["train", "decode"],
                   help="what to measure (default: train decode); 'startup' = init + compile + first step")
    p.add_argument("--sizes", nargs="+", default=["small", "base"], help="model sizes (tiny ... xxl)")
    p.add_argument("--optimizers", nargs="+", choices=("adamw", "adafactor"), default=["adamw"],
                   help="train-step optimizers (default adamw, as the peer)")
    p.add_argument("--batch", type=_positive, default=None, help="train batch (default 32; 8 for xl/xxl)")
    p.add_argument("--enc-len", type=_positive, default=512, help="train encoder tokens (default 512)")
    p.add_argument("--dec-len", type=_positive, default=128, help="train decoder tokens (default 128)")
    p.add_argument("--steps", type=_count, default=10, help="timed train steps (default 10)")
    p.add_argument("--warmup", type=_count, default=2, help="untimed steps after the first (default 2)")
    p.add_argument("--decode-batch", type=_positive, default=256, help="decode rows (default 256)")
    p.add_argument("--in-len", type=_positive, default=128, help="decode input tokens (default 128)")
    p.add_argument("--new-tokens", type=_positive, default=32, help="tokens decoded per row, exactly (default 32)")
    p.add_argument("--cross-kv", choices=DECODE_CROSS_KV, default="cache",
                   help="decode: cross-attention K/V cached (default) or recomputed each step "
                        "(T5Config.decode_cross_kv)")
    p.add_argument("--reps", type=_count, default=3, help="timed decode calls (default 3)")
    p.add_argument("--scan", action=argparse.BooleanOptionalAction, default=True,
                   help="scan over layers (default) or unroll them")
    p.add_argument("--remat", choices=("none", "full", "dots"), default="none", help="rematerialisation policy")
    p.add_argument("--param-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="train-state parameter dtype (bfloat16: half the memory; updates written back "
                        "with stochastic rounding, as TrainConfig.param_dtype)")
    p.add_argument("--teacher", default="xxl", help="distill: teacher size (default xxl)")
    p.add_argument("--student", default="small", help="distill: student size (default small)")
    p.add_argument("--topk", type=_positive, default=8, help="distill: stored teacher logits per token")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="also write a jax.profiler trace of 3 train steps / 1 decode call per case under DIR")
    p.add_argument("--peer", default=None, help="the PyTorch peer's JSON (hf_t5_baseline.py OUT.json)")
    p.add_argument("--out", default="bench.json", help="rows as JSON (default bench.json)")
    p.add_argument("--append", action="store_true", help="add to the rows already in --out")
    p.add_argument("--in-process", action="store_true",
                   help="run every case in this process (faster; start-up and peak memory then mix cases)")
    p.add_argument("--timeout", type=float, default=None, help="seconds allowed per case (isolated runs)")
    p.add_argument("--show", default=None, metavar="ROWS.json", help="print the table of stored rows; measure nothing")
    p.set_defaults(func=run)


def _read_rows(path: str, what: str) -> list[dict]:
    from doa_jax import storage
    from doa_jax.cli import UserError

    file = storage.path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{what} {file} does not exist")
    try:
        rows = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{what} {file} is not JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise UserError(f"{what} {file} must hold a JSON list of row objects")
    return rows


def run(args) -> int:
    from doa_jax import storage
    from doa_jax.bench import run as bench_run, table
    from doa_jax.model import config_for_size

    peer = _read_rows(args.peer, "peer JSON") if args.peer else []
    if args.show:
        print(table.table(_read_rows(args.show, "rows JSON"), peer))
        return 0
    for size in set(args.sizes) | ({args.teacher, args.student} if "distill" in args.parts else set()):
        config_for_size(size)  # unknown names fail here, naming the known sizes
    settings = dict(batch=args.batch, enc_len=args.enc_len, dec_len=args.dec_len, steps=args.steps,
                    warmup=args.warmup, decode_batch=args.decode_batch, in_len=args.in_len,
                    new_tokens=args.new_tokens, cross_kv=args.cross_kv, reps=args.reps, scan=args.scan, remat=args.remat,
                    param_dtype=args.param_dtype, teacher=args.teacher, student=args.student, topk=args.topk)
    cases = bench_run.expand(args.parts, args.sizes, optimizers=args.optimizers, **settings)
    if args.profile:
        for i, case in enumerate(cases):
            case["profile"] = str(pathlib.Path(args.profile).absolute() / f"{i:02d}_{case['part']}_{case.get('size', '')}")
    out = storage.path(args.out)
    if storage.is_url(out):
        storage.check_writable(args.out.rpartition("/")[0], "--out folder")
    rows = _read_rows(args.out, "rows JSON") if args.append and out.is_file() else []

    def save(row):
        rows.append(row)
        storage.write_atomic(out, json.dumps(rows, indent=1))   # after every case: a killed run keeps its rows
        print(json.dumps(row), flush=True)

    bench_run.run_cases(cases, isolate=not args.in_process, timeout_s=args.timeout, on_row=save)
    print(table.table(rows, peer))
    print(f"wrote {len(rows)} rows to {out}")
    return 1 if any("error" in r for r in rows[-len(cases):]) else 0
