"""`doa score --task TASK --predictions P.jsonl --references R.jsonl [--protocol paper [--vocab V]]`: the task's
metrics as JSON (`paper`: scored as the released code scores them; with `--vocab`, its references too)."""
from __future__ import annotations

import json
import os
import sys


def register(subparsers) -> None:
    from doa_jax.metrics import PROTOCOLS

    parser = subparsers.add_parser("score", help="score predictions with a task's metric (JSON, percent)")
    parser.add_argument("--task", required=True, help="task card name (see tasks/) or a card .toml")
    parser.add_argument("--predictions", required=True, help='JSON lines {"prediction": str}, in references order')
    parser.add_argument("--references", required=True, help='JSON lines {"source": str, "target": str}')
    parser.add_argument("--scorer-model", default=os.environ.get("DOA_BERTSCORE_MODEL"),
                        help="BERTScore model folder for BERT-iBLEU (deberta-xlarge-mnli in the paper); "
                        "default $DOA_BERTSCORE_MODEL")
    parser.add_argument("--protocol", default="efficient", choices=PROTOCOLS,
                        help="'paper': score as the released code does (an out-of-label output counts as the "
                        "card's paper_invalid_label; WLP's f1 is the released parse; with --vocab, references "
                        "through the tokenizer too); default 'efficient'")
    parser.add_argument("--vocab", help="with --protocol paper: the SentencePiece model the outputs were decoded "
                        "with; references are then scored as the released code scored them, encoded, cut at "
                        "--targets-length tokens (EOS included) and decoded (what the vocabulary cannot write, "
                        "e.g. µ in T5's, is lost on both sides)")
    parser.add_argument("--targets-length", type=int, help="with --vocab: the released val_max_target_length "
                        "(default: the card's targets length)")
    parser.add_argument("--num-layers", type=int, help="BERTScore hidden layer (default: 40 for "
                        "deberta-xlarge-mnli, else the last)")
    parser.set_defaults(func=run)


def run(args) -> int:
    from doa_jax.data import cards, jsonl

    card = cards.load_card(args.task)
    predictions = jsonl.load_predictions(args.predictions)
    policy = "keep" if card.empty_targets == "skip" else card.empty_targets  # keep lines aligned
    references = jsonl.load_examples(args.references, empty_targets=policy).examples
    if len(predictions) != len(references):
        raise ValueError(
            f"{args.predictions} has {len(predictions)} predictions but {args.references} has "
            f"{len(references)} references; they must pair line by line"
        )
    # A paper cell's predictions.jsonl holds the references it scored, and the data's as raw_target.
    raw = [r.get("raw_target", r["target"]) for r in references]
    targets = [r["target"] for r in references] if args.protocol == "paper" else raw
    if args.protocol != "paper" and (args.vocab or args.targets_length is not None):
        raise ValueError("--vocab and --targets-length apply to --protocol paper only (the released code's "
                         "references); 'efficient' scores the references as given")
    if args.targets_length is not None and not args.vocab:
        raise ValueError("--targets-length needs --vocab (the references are cut in its tokens)")
    if args.protocol == "paper" and args.vocab:
        from doa_jax.data import vocab as vocab_lib

        length = card.feature_lengths["targets"] if args.targets_length is None else args.targets_length
        if length < 2:
            raise ValueError(f"--targets-length {length}: the released code keeps length - 1 tokens and an EOS; "
                             "give at least 2")
        targets = vocab_lib.released_references(vocab_lib.Vocabulary(args.vocab), raw, length)
    elif args.protocol == "paper" and not any("raw_target" in r for r in references):
        print("note: references scored as given; if they are the data's text (not a paper cell's "
              "predictions.jsonl), the released code scored them through its tokenizer: pass --vocab V",
              file=sys.stderr)
    options = {}
    if card.metric == "bert_ibleu":
        options = {"scorer_model": args.scorer_model, "num_layers": args.num_layers}
    result = card.score(
        predictions,
        targets,
        sources=[r["source"] for r in references],
        protocol=args.protocol,
        **options,
    )
    print(json.dumps({"task": card.name, "protocol": args.protocol, **result}, indent=2))
    return 0
