"""`doa plan`: what an extra budget buys under each strategy (or what a fixed (L, U) point costs), before any compute.

Compute is priced by a cost profile: `paper` (the paper's accounting, fitted to its costs on four tasks;
the default without a calibration; for any other task an extrapolation, said so with its expected error), `calibrated` (throughput measured by `doa calibrate`, the default with
--calibration) or `mfu` (an assumed model FLOP utilisation).

`--target SLICE` (a TPU slice or GPU count as `doa aot` names them: v4-8, v5e-8, v5p-8, v6e-8, h100,
h100x8, ...) prices compute on that slice (`mfu`, an ASSUMED MFU, unless a calibration measured on it
is given) and adds each arm's chip-hours, the slice's wall time, and its dollars on demand and on spot,
from the rate card's prices and their sources (`doa_jax/experiment/slices.py`).
"""
from __future__ import annotations

import argparse
import json
import math

CALIBRATE_HINT = ("to price your own hardware, run `doa calibrate --accelerator NAME --teacher SIZE --student SIZE "
                  "--task T --out cal.json` on it, then `doa plan ... --calibration cal.json`")


def _budget(text: str) -> float:
    try:
        value = float(text.replace("$", "").replace(",", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"budget must be a number of dollars, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"budget must be a non-negative, finite number of dollars, got {text!r}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text.replace(",", "").replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number of inputs >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number of inputs >= 0, got {text!r}")
    return value


def _grid(text: str) -> list[int]:
    values = [_count(part) for part in text.split(",") if part.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"must be comma-separated counts >= 1 (e.g. 10000,100000), got {text!r}")
    return values


def _pool(text: str):
    return text if text in ("data", "none") else _count(text)


def register(sub) -> None:
    p = sub.add_parser("plan", help="project what a budget buys: labels vs teacher/student compute",
                       description=__doc__)
    p.add_argument("--task", required=True, help="task card name (see tasks/), path to a card, or 'demo'")
    p.add_argument("--start-labels", type=int, required=True, help="labels already bought (L)")
    p.add_argument("--budget", type=_budget, default=None, help="extra budget in USD (needed unless --unlabeled)")
    p.add_argument("--unlabeled", type=_count, default=None,
                   help="price the distill arm at this fixed number U of unlabeled inputs instead of searching")
    p.add_argument("--unlabeled-grid", type=_grid, default=None,
                   help="choose U from these values only, e.g. 10000,100000 (the paper's)")
    p.add_argument("--unlabeled-pool", type=_pool, default="data",
                   help="unlabeled inputs available: 'data' (the task's local pool when its data is present; "
                        "default), 'none' (no cap) or a number")
    p.add_argument("--cost-profile", default=None,
                   help="paper | calibrated | mfu (default: calibrated with --calibration, else paper)")
    p.add_argument("--calibration", default=None, help="calibration file written by `doa calibrate`")
    p.add_argument("--accelerator", default=None, help="rate card (default: the profile's; mfu: a100)")
    p.add_argument("--teacher", default="xxl", help="teacher size (default xxl)")
    p.add_argument("--student", default="small", help="student size (default small)")
    p.add_argument("--mfu", type=float, default=None, help="assumed MFU for --cost-profile mfu (default 0.4)")
    p.add_argument("--soft-targets", choices=("stored", "online"), default=None,
                   help="distillation soft targets (default: online under paper, the paper's code; else stored)")
    p.add_argument("--compute-share", type=float, default=0.5, help="share of budget for compute in 'mixed'")
    p.add_argument("--teacher-epochs", type=float, default=None)
    p.add_argument("--distill-epochs", type=float, default=None)
    p.add_argument("--student-epochs", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="training batch size (default 32, the paper's)")
    p.add_argument("--data-dir", default=None, help="the task's data folder (for the unlabeled pool)")
    p.add_argument("--rate-cards", default=None, help="TOML rate-card file (default: packaged)")
    p.add_argument("--target", default=None,
                   help="a slice to run on, as `doa aot` names it (v5e-8, v5p-8, v6e-8, v4-8, h100x8, ...): adds "
                        "chip-hours, wall time and on-demand / spot dollars")
    p.add_argument("--usd-per-chip-hour", type=_budget, default=None,
                   help="with --target: your on-demand price per chip-hour (over the rate card's, or where it has none)")
    p.add_argument("--spot-usd-per-chip-hour", type=_budget, default=None,
                   help="with --target: your spot price per chip-hour (the rate cards carry no published spot price)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=run)


def _unlabeled_pool(args, card):
    """(pool size or None, what it is) for capping U."""
    if args.unlabeled_pool == "none":
        return None, "no cap (--unlabeled-pool none)"
    if args.unlabeled_pool != "data":
        return args.unlabeled_pool, f"{args.unlabeled_pool} inputs (--unlabeled-pool)"
    from doa_jax.experiment import calibration

    try:
        size = len(calibration.task_pools(card, args.data_dir).unlabeled)
    except FileNotFoundError:
        return None, "no cap: the task's data is not here"
    return size, f"{size} inputs (the task's local unlabeled pool)"


def _arm(plan) -> dict:
    row = plan.as_row()
    return {"compute_usd": row["compute_usd"], "teacher_finetune_usd": row["teacher_finetune_usd"],
            "teacher_inference_usd": row["teacher_inference_usd"], "student_training_usd": row["student_training_usd"],
            "labels": row["labels_used"], "unlabeled": row["unlabeled_used"], "labels_bought": row["labels_bought"],
            "labels_usd": row["labels_usd"], "total_usd": row["total_usd"], "budget_usd": row["budget_usd"],
            "unspent_usd": row["unspent_usd"], "feasible": row["feasible"], "reason": row["reason"],
            "note": row["note"]}


def make_plans(args):
    """(card, profile, lengths, pool note, {strategy: Plan}, the slice's prices or None) for the parsed arguments."""
    from doa_jax.experiment import calibration
    from doa_jax.experiment import planner

    if args.budget is None and args.unlabeled is None:
        raise ValueError("give --budget (what an extra budget buys) or --unlabeled U (what a fixed point costs)")
    profile, price = _profile(args)
    card = calibration.task_card(args.task)
    teacher, student = calibration.model_configs(card, args.teacher, args.student)
    p, lengths = planner.build_planner(card, teacher, student, profile,
                                       soft_targets=args.soft_targets, teacher_epochs=args.teacher_epochs,
                                       student_epochs=args.student_epochs, distill_epochs=args.distill_epochs,
                                       batch_size=args.batch_size)
    plans = {}
    pool, pool_note = (None, "not used: U is fixed") if args.unlabeled is not None else _unlabeled_pool(args, card)
    if args.unlabeled is not None:
        plans["distill"] = p.price(args.start_labels, args.unlabeled, args.budget)
    if args.budget is not None:
        for s in planner.STRATEGIES:
            if s == "distill" and "distill" in plans:
                continue
            plans[s] = p.plan(s, args.start_labels, args.budget, unlabeled_available=pool,
                              compute_share=args.compute_share, unlabeled_grid=args.unlabeled_grid)
    return card, profile, lengths, pool_note, plans, price


def _profile(args):
    """The plan's cost profile, and the slice's prices when --target names one (else None)."""
    from doa_jax.experiment import cost_profiles
    from doa_jax.experiment import slices

    name = args.cost_profile or ("mfu" if args.target and args.calibration is None
                                 else cost_profiles.default_profile_name(args.calibration))
    if args.mfu is not None and name != "mfu":
        raise ValueError(f"--mfu applies to --cost-profile mfu only (this plan uses {name!r})")
    if args.target is None:
        if args.usd_per_chip_hour is not None or args.spot_usd_per_chip_hour is not None:
            raise ValueError("--usd-per-chip-hour and --spot-usd-per-chip-hour price a --target slice: give --target")
        return cost_profiles.load_profile(name, accelerator=args.accelerator, calibration=args.calibration,
                                          mfu=args.mfu, rate_cards=args.rate_cards), None
    if args.accelerator is not None:
        raise ValueError("--target names the accelerator (its slice's chips): drop --accelerator")
    return slices.slice_profile(args.target, cost_profile=name, calibration=args.calibration, mfu=args.mfu,
                                rate_cards=args.rate_cards, usd_per_chip_hour=args.usd_per_chip_hour,
                                spot_usd_per_chip_hour=args.spot_usd_per_chip_hour)


def run(args) -> int:
    card, profile, lengths, pool_note, plans, price = make_plans(args)
    if args.json:
        arms = {s: {**_arm(pl), **(price.arm(pl.compute_usd) if price else {})} for s, pl in plans.items()}
        print(json.dumps({"task": card.name, "start_labels": args.start_labels, "budget_usd": args.budget,
                          "cost_profile": profile.as_dict(card.name), "lengths": lengths, "unlabeled_pool": pool_note,
                          **({"slice": price.as_dict()} if price else {}), **arms}, indent=1))
        return 0
    _print_table(args, card, profile, lengths, pool_note, plans)
    if price:
        _print_slice(price, plans)
    return 0


def _print_slice(price, plans) -> None:
    """Each arm's compute on the slice: chip-hours, wall time, on-demand and spot dollars."""
    print(f"\non {price.target} ({price.chips} chips of {price.accelerator}); time: {price.time_source}")
    print(f"  on demand: {price.price_source}")
    print(f"  spot: {price.spot_price_source}")
    assumed = " (ASSUMED MFU)" if price.assumed else ""
    header = f"{'strategy':<9} {'chip-hours':>10} {'wall hours':>10} {'on-demand $':>11} {'spot $':>8}{assumed}"
    print(header)
    print("-" * len(header))
    for pl in plans.values():
        row = price.arm(pl.compute_usd)
        spot = "n/a" if row["spot_usd"] is None else f"{row['spot_usd']:.2f}"
        print(f"{pl.strategy:<9} {row['chip_hours']:>10.2f} {row['wall_hours']:>10.2f} {row['on_demand_usd']:>11.2f} "
              f"{spot:>8}")


def _print_table(args, card, profile, lengths, pool_note, plans) -> None:
    extra = f"+${args.budget:g} extra" if args.budget is not None else f"U = {args.unlabeled} unlabeled inputs"
    print(f"{card.name}: {args.start_labels} start labels, {extra}; labels ${card.annotation_cost_usd:.3f} each; "
          f"teacher {args.teacher}, student {args.student}")
    print(f"cost profile: {profile.name}: {profile.source}")
    fit = profile.as_dict(card.name).get("fit")
    if fit:
        print(f"  {fit['note']}")
    if profile.name == "paper" and not args.cost_profile:
        print(f"  (no calibration given, so the paper's accounting prices compute; {CALIBRATE_HINT})")
    print(f"lengths: {lengths['inputs']:g} input / {lengths['targets']:g} target tokens: {lengths['source']}")
    print(f"unlabeled pool: {pool_note}")
    assumed = " (ASSUMED MFU)" if profile.assumed else ""
    header = (f"{'strategy':<9} {'labels+':>7} {'unlabeled':>9} {'labels $':>9} {'teacher ft $':>12} "
              f"{'teacher inf $':>13} {'student $':>9} {'total $':>8}  note{assumed}")
    print(header)
    print("-" * len(header))
    digits = 2 if max(pl.total_usd for pl in plans.values()) >= 1 else 4   # cents hide a CPU run's cost
    for pl in plans.values():
        note = ("INFEASIBLE: " + pl.reason) if not pl.feasible else pl.note
        print(f"{pl.strategy:<9} {pl.labels_bought:>7} {pl.unlabeled_used:>9} {pl.labels_usd:>9.{digits}f} "
              f"{pl.teacher_finetune_usd:>12.{digits}f} {pl.teacher_inference_usd:>13.{digits}f} "
              f"{pl.student_training_usd:>9.{digits}f} {pl.total_usd:>8.{digits}f}  {note}")
