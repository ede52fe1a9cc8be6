"""`doa score --task TASK --predictions P.jsonl --references R.jsonl [--protocol paper]`: the task's metrics
as JSON (`paper`: scored as the released code scores them)."""
from __future__ import annotations

import json
import os


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
                        "card's paper_invalid_label; WLP's f1 is the released parse); default 'efficient'")
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
    options = {}
    if card.metric == "bert_ibleu":
        options = {"scorer_model": args.scorer_model, "num_layers": args.num_layers}
    result = card.score(
        predictions,
        [r["target"] for r in references],
        sources=[r["source"] for r in references],
        protocol=args.protocol,
        **options,
    )
    print(json.dumps({"task": card.name, "protocol": args.protocol, **result}, indent=2))
    return 0
