"""`doa plan`: what an extra budget buys under each strategy, before any compute."""
from __future__ import annotations

import argparse
import json
import math


def _budget(text: str) -> float:
    try:
        value = float(text.replace("$", "").replace(",", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"budget must be a number of dollars, got {text!r}") from None
    if math.isnan(value) or value < 0:
        raise argparse.ArgumentTypeError(f"budget must be a non-negative number of dollars, got {text!r}")
    return value


def register(sub) -> None:
    p = sub.add_parser("plan", help="project what a budget buys: labels vs teacher/student compute",
                       description=__doc__)
    p.add_argument("--task", required=True, help="task card name (see tasks/) or path to a card")
    p.add_argument("--start-labels", type=int, required=True, help="labels already bought")
    p.add_argument("--budget", type=_budget, required=True, help="extra budget in USD")
    p.add_argument("--accelerator", default="a100", help="rate card to price compute on (default a100)")
    p.add_argument("--teacher", default="xxl", help="teacher size (default xxl)")
    p.add_argument("--student", default="small", help="student size (default small)")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOP utilisation (default 0.4)")
    p.add_argument("--unlabeled", type=int, default=None, help="unlabeled inputs available (default: no cap)")
    p.add_argument("--compute-share", type=float, default=0.5, help="share of budget for compute in 'mixed'")
    p.add_argument("--teacher-epochs", type=int, default=20)
    p.add_argument("--distill-epochs", type=int, default=50)
    p.add_argument("--student-epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=32, help="training batch size (default 32, the paper's)")
    p.add_argument("--rate-cards", default=None, help="TOML rate-card file (default: packaged)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def run(args) -> int:
    from doa_jax.experiment import costs
    from doa_jax.experiment import planner
    from doa_jax.data.cards import load_card
    from doa_jax.model import config_for_size

    card = load_card(args.task)
    acc = costs.get_accelerator(args.accelerator, costs.load_rate_cards(args.rate_cards))
    recipe = planner.Recipe(teacher_epochs=args.teacher_epochs, student_epochs=args.student_epochs,
                            distill_epochs=args.distill_epochs, inputs_length=card.feature_lengths["inputs"],
                            targets_length=card.feature_lengths["targets"], batch_size=args.batch_size,
                            mfu=args.mfu)
    p = planner.Planner(acc, config_for_size(args.student), config_for_size(args.teacher),
                        card.annotation_cost_usd, recipe)
    plans = [p.plan(s, args.start_labels, args.budget, unlabeled_available=args.unlabeled,
                    compute_share=args.compute_share) for s in planner.STRATEGIES]
    if args.json:
        print(json.dumps([pl.as_row() for pl in plans], indent=1))
        return 0
    print(f"{card.name}: {args.start_labels} start labels, +${args.budget:g} extra; labels ${card.annotation_cost_usd:.3f} "
          f"each; compute on {acc.name} at ${acc.usd_per_chip_hour:g}/chip-h, {args.mfu:.0%} MFU; "
          f"teacher {args.teacher}, student {args.student}; lengths {recipe.inputs_length}/{recipe.targets_length}")
    header = f"{'strategy':<9} {'labels+':>7} {'unlabeled':>9} {'labels $':>9} {'teacher ft $':>12} " \
             f"{'teacher inf $':>13} {'student $':>9} {'total $':>8}  note"
    print(header)
    print("-" * len(header))
    for pl in plans:
        print(f"{pl.strategy:<9} {pl.labels_bought:>7} {pl.unlabeled_used:>9} {pl.labels_usd:>9.2f} "
              f"{pl.teacher_finetune_usd:>12.2f} {pl.teacher_inference_usd:>13.2f} {pl.student_training_usd:>9.2f} "
              f"{pl.total_usd:>8.2f}  {('INFEASIBLE: ' if not pl.feasible else '') + pl.reason}")
    return 0
