"""Rewrite a T5 checkpoint (or a random init) as a native Orbax, a HuggingFace or a T5X checkpoint.

`doa convert SRC DST --to {orbax,hf,t5x}`. SRC is any checkpoint `doa_jax.checkpoints.load_checkpoint`
reads (HF directory, T5X checkpoint_N or msgpack file, doa-jax native checkpoint or run directory) or
a size name (`tiny`, `small`, `t5_base`, ...), which is initialised randomly from `--seed`.
`--to orbax` writes the native doa-jax checkpoint, `--to hf` a HuggingFace directory that
`transformers.T5ForConditionalGeneration.from_pretrained` loads (with `--vocab`, or SRC's own
`spiece.model`, also the tokenizer `AutoTokenizer.from_pretrained` loads), `--to t5x` the train state T5X
saves (`--t5x-format orbax`, T5X's default, or `legacy`) that `t5x.infer` restores as CHECKPOINT_PATH
and `t5x.train` as INITIAL_CHECKPOINT_PATH. T5X reads the step from the directory name: DST named
`checkpoint_N` is written as is, any other DST is a T5X model directory that gets `checkpoint_<step>`.
DST may be a URL (gs://bucket/...): the checkpoint is written to a local temporary folder, then
uploaded file by file; a bucket that cannot be written is an error before SRC is read.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import time

from doa_jax import progress

TARGETS = {"orbax": "native", "hf": "hf", "t5x": "t5x"}
T5X_FORMATS = ("orbax", "legacy")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("convert", description=__doc__.split("\n\n")[0],
                              help="convert a T5 checkpoint or a random init to native Orbax, HF or T5X")
    p.add_argument("src", help="checkpoint (HF, T5X checkpoint_N or msgpack file, doa-jax) or a size name")
    p.add_argument("dst", help="output directory (must not exist unless --force); for --to t5x a "
                              "checkpoint_N directory or a T5X model directory")
    p.add_argument("--to", required=True, choices=sorted(TARGETS), help="output format")
    p.add_argument("--t5x-format", choices=T5X_FORMATS, default="orbax",
                   help="T5X layout for --to t5x: orbax (T5X's default) or legacy msgpack + TensorStore")
    p.add_argument("--step", type=int, default=None,
                   help="T5X step for --to t5x (default: N of a DST named checkpoint_N, else 0)")
    p.add_argument("--vocab", default=None,
                   help="SentencePiece model to export as the tokenizer with --to hf (default: SRC's "
                        "spiece.model when SRC is an HF directory holding one)")
    p.add_argument("--seed", type=int, default=0, help="init seed when SRC is a size name (default 0)")
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    p.set_defaults(func=run)


def _load(src: str, seed: int):
    """(config, params, description) of SRC: a checkpoint path or a size name (random init)."""
    from doa_jax.api import init_params, size_config
    from doa_jax import storage
    from doa_jax.checkpoints import detect_format, load_checkpoint
    from doa_jax.cli import UserError

    if storage.is_url(src) or os.path.exists(src):
        source = f"{detect_format(src)} checkpoint {src}"
        print(f"reading the {source} ...", flush=True)
        return (*load_checkpoint(src), source)
    try:
        config = size_config(src)
    except FileNotFoundError as e:
        raise UserError(f"SRC {e}") from None
    print(f"initialising {src!r} randomly ({progress.params_text(config.num_params())}, seed {seed}; "
          "compiling the initialiser first) ...", flush=True)
    return config, init_params(config, seed), f"random init of {src!r} (seed {seed})"


def _source_vocab(src: str):
    """SRC's SentencePiece model when SRC is an HF directory that ships one (`spiece.model`)."""
    from doa_jax.checkpoints import hf

    candidate = pathlib.Path(src) / hf.TOKENIZER_MODEL_FILE
    return str(candidate) if candidate.is_file() and (pathlib.Path(src) / hf.CONFIG_FILE).is_file() else None


def _destination(args: argparse.Namespace) -> tuple[str, dict]:
    """(the checkpoint's path, local or URL, and the saver's options) from DST and the flags."""
    from doa_jax import storage
    from doa_jax.checkpoints import t5x_save
    from doa_jax.cli import UserError

    dst, options = os.fspath(args.dst), {}
    if args.to == "t5x":
        base, sep, name = dst.rstrip("/").rpartition("/")     # a URL's '//' must not be collapsed
        local, step = t5x_save.checkpoint_dir(name, args.step)
        dst, options = f"{base}{sep}{local}", {"step": step}
    elif args.step is not None:
        raise UserError("--step applies to --to t5x only")
    if args.vocab and args.to != "hf":
        raise UserError("--vocab applies to --to hf only (T5X and native checkpoints hold no tokenizer)")
    storage.check_writable(dst.rstrip("/").rpartition("/")[0] if storage.is_url(dst) else dst, "DST folder")
    if storage.exists(dst) and not args.force:
        raise UserError(f"{dst} exists; pass --force to replace it")
    return dst, options


def run(args: argparse.Namespace) -> int:
    from doa_jax import storage
    from doa_jax.checkpoints import hf, save_checkpoint, t5x_save

    started = time.perf_counter()
    dst, options = _destination(args)
    config, params, source = _load(args.src, args.seed)
    if args.to == "t5x":
        t5x_save.check_expressible(config)
    if args.to == "hf":
        options = {"vocab": args.vocab or _source_vocab(args.src)}
        if options["vocab"]:
            hf.tokenizer_config(options["vocab"], config.vocab_size)  # fails before DST is touched
    if storage.exists(dst):
        storage.remove(dst)
    fmt = f"t5x_{args.t5x_format}" if args.to == "t5x" else TARGETS[args.to]
    print(f"writing {fmt} checkpoint to {dst} ({time.perf_counter() - started:.0f} s so far) ...", flush=True)
    with storage.staged(dst) as local:   # a URL: written here, then uploaded
        written = save_checkpoint(local, config, params, format=fmt, **options)
    written = dst if storage.is_url(dst) else written
    kind = "T5 v1.1" if config.gated and not config.logits_via_embedding else "T5"
    name = {"orbax": "native orbax", "hf": "hf", "t5x": f"t5x {args.t5x_format}"}[args.to]
    print(f"wrote {name} checkpoint: {written} "
          f"({kind}, {config.num_params():,} params, d_model {config.emb_dim}, "
          f"{config.num_encoder_layers}+{config.num_decoder_layers} layers) from {source} "
          f"in {time.perf_counter() - started:.0f} s")
    if args.to == "hf":
        print(f"tokenizer: {options['vocab']} (transformers.AutoTokenizer loads it)" if options["vocab"] else
              "no tokenizer written: pass --vocab spiece.model for AutoTokenizer.from_pretrained to work")
    if args.to == "t5x":
        print(f"T5X gin for this model: {t5x_save.t5x_gin(config)}; pass {written} as CHECKPOINT_PATH "
              f"(t5x.infer) or INITIAL_CHECKPOINT_PATH (t5x.train)")
    return 0
