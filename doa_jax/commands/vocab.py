"""`doa vocab build`: a SentencePiece model with T5's ids (pad 0, eos 1, unk 2; +100 extra ids) from task text.
`doa vocab convert`: T5's SentencePiece model rebuilt from a Hugging Face tokenizer.json (Unigram).

`--out` (and `--text` files) may be URLs (gs://bucket/spiece.model): a bucket that cannot be
written is an error before any text is read.
"""
from __future__ import annotations

import json


def register(subparsers) -> None:
    parser = subparsers.add_parser("vocab", help="build a T5-style SentencePiece vocabulary offline")
    sub = parser.add_subparsers(dest="vocab_command", metavar="ACTION")
    sub.required = True
    build = sub.add_parser("build", help="train a SentencePiece model on task text (T5 ids)")
    build.add_argument("--out", required=True,
                       help="model path or URL, ending in .model (a .vocab is written beside)")
    build.add_argument("--tasks", nargs="+", default=["all"], help="task card names, or 'all' (default)")
    build.add_argument("--text", nargs="*", default=[], help="extra plain-text files, one sentence a line")
    build.add_argument("--vocab-size", type=int, default=32000, help="pieces (T5: 32000), an upper bound")
    build.add_argument("--model-type", default="unigram", choices=["unigram", "bpe"])
    build.add_argument("--data-dir", help="data folder for a single task (default: the cards')")
    build.set_defaults(func=run_build)
    convert = sub.add_parser("convert", help="rebuild a SentencePiece model (T5's spiece.model) from a Hugging "
                                             "Face tokenizer.json of a Unigram model")
    convert.add_argument("tokenizer_json", help="the tokenizer.json (a path or URL)")
    convert.add_argument("--out", required=True, help="model path or URL, ending in .model")
    convert.set_defaults(func=run_convert)


def run_build(args) -> int:
    import sys

    from doa_jax import storage
    from doa_jax.data import cards, vocab
    from doa_jax.model.config import VOCAB_PAD_MULTIPLE

    if storage.is_url(args.out):
        storage.check_writable(args.out.rpartition("/")[0], "--out folder")
    names = cards.card_names() if args.tasks == ["all"] else args.tasks
    data_dir = args.data_dir if len(names) == 1 else None
    texts = vocab.task_texts(names, data_dir) if names else []
    for path in args.text:
        p = storage.path(path)
        if not p.is_file():
            raise FileNotFoundError(f"text file {p} not found")
        texts.extend(p.read_text(encoding="utf-8").splitlines())
    path = vocab.build_vocab(texts, args.out, vocab_size=args.vocab_size, model_type=args.model_type)
    v = vocab.Vocabulary(path)
    rows = vocab.padded_vocab_size(v)
    print(json.dumps({"pieces": v.base_vocab_size, **v.spec(), "model_vocab_size": rows}, indent=2))
    print(f"models for this vocabulary need vocab_size {rows} ({v.vocab_size} ids padded to a multiple of "
          f"{VOCAB_PAD_MULTIPLE}). doa train/run/sweep follow VOCABULARY by default (MODEL_VOCAB_SIZE = None); "
          f"to pin it: --gin.MODEL_VOCAB_SIZE={rows}", file=sys.stderr)
    return 0


def run_convert(args) -> int:
    import sys

    from doa_jax import storage
    from doa_jax.data import vocab

    if storage.is_url(args.out):
        storage.check_writable(args.out.rpartition("/")[0], "--out folder")
    path, extra_ids = vocab.from_tokenizer_json(args.tokenizer_json, args.out)
    v = vocab.Vocabulary(path)
    print(json.dumps({"pieces": v.base_vocab_size, **v.spec(), "model_vocab_size": vocab.padded_vocab_size(v),
                      "extra_ids_in_json": extra_ids}, indent=2))
    note = "" if extra_ids == v.extra_ids else (f"; the json held {extra_ids} extra ids, not {v.extra_ids}: "
                                                f"load it with extra_ids={extra_ids}")
    print(f"wrote {v.path}: {v.base_vocab_size} pieces (+{v.extra_ids} extra ids); use it as VOCABULARY or "
          f"--vocab{note}", file=sys.stderr)
    return 0
