"""Rewrite a T5 checkpoint (or a random init) as a native Orbax or a HuggingFace checkpoint.

`doa convert SRC DST --to {orbax,hf}`. SRC is any checkpoint `doa_jax.checkpoints.load_checkpoint` reads (HF directory, T5X checkpoint_N,
doa-jax native checkpoint or run directory) or a size name (`tiny`, `small`, `t5_base`, ...), which
is initialised randomly from `--seed`. `--to orbax` writes the native doa-jax checkpoint, `--to hf`
a HuggingFace directory that `transformers.T5ForConditionalGeneration.from_pretrained` loads.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import shutil

TARGETS = {"orbax": "native", "hf": "hf"}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("convert", description=__doc__.split("\n\n")[0],
                              help="convert a T5 checkpoint or a random init to native Orbax or HF")
    p.add_argument("src", help="checkpoint directory (HF, T5X checkpoint_N, doa-jax) or a size name")
    p.add_argument("dst", help="output directory (must not exist unless --force)")
    p.add_argument("--to", required=True, choices=sorted(TARGETS), help="output format")
    p.add_argument("--seed", type=int, default=0, help="init seed when SRC is a size name (default 0)")
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from doa_jax.checkpoints import detect_format, load_checkpoint, save_checkpoint
    from doa_jax.cli import UserError
    from doa_jax.model import config_for_size
    from doa_jax.model.config import SIZES

    dst = pathlib.Path(args.dst)
    if dst.exists() and not args.force:
        raise UserError(f"{dst} exists; pass --force to replace it")
    if os.path.exists(args.src):
        source = f"{detect_format(args.src)} checkpoint {args.src}"
        config, params = load_checkpoint(args.src)
    else:
        try:
            config = config_for_size(args.src)
        except ValueError:
            raise UserError(f"SRC {args.src!r} is neither an existing checkpoint path nor a size name "
                            f"({', '.join(sorted(SIZES))})") from None
        from doa_jax.api import init_params

        source = f"random init of {args.src!r} (seed {args.seed})"
        params = init_params(config, args.seed)
    if dst.exists():
        shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
    save_checkpoint(dst, config, params, format=TARGETS[args.to])
    kind = "T5 v1.1" if config.gated and not config.logits_via_embedding else "T5"
    print(f"wrote {'native orbax' if args.to == 'orbax' else 'hf'} checkpoint: {dst} "
          f"({kind}, {config.num_params():,} params, d_model {config.emb_dim}, "
          f"{config.num_encoder_layers}+{config.num_decoder_layers} layers) from {source}")
    return 0
