"""`doa demo [--out DIR]`: the paper's question end to end, offline, on 2 CPU cores in minutes.

A built-in, seeded task in WLP's format (protocol sentences -> typed spans), a vocabulary built on
the fly, a tiny teacher and a tinier student priced as the T5-XXL teacher and T5-Small student they
stand for (on an A100 at the paper's $1.875/GPU-hour), and both arms at two extra budgets over 200
starting labels. Prints a results table; writes DIR/results.jsonl, DIR/report.md and DIR/plots/.
"""
from __future__ import annotations

import argparse

# Under the paper's accounting the teacher's fine-tuning on 200 labels costs $6.22 (at +$5 only
# annotation can run: `--budgets 5 10 30`); at +$10 distillation buys 2,757 unlabeled inputs, at +$30 the
# whole pool of 4,096 (README's demo table). Two budgets keep the demo under 5 minutes on 2 cores (a third
# cell costs ~30 s).
BUDGETS = (10.0, 30.0)
START_LABELS = 200


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="offline end-to-end demo: annotate vs distill at two budgets",
                              description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_out", help="output directory (default: ./demo_out)")
    p.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS), help="extra budgets in USD")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start-labels", type=int, default=START_LABELS, help="labels already bought")
    p.add_argument("--quiet", action="store_true", help="no per-step training lines")
    p.add_argument("--gin", action="append", default=[], metavar="BINDING",
                   help="a gin binding after the demo's own, e.g. 'TEACHER_EPOCHS = 10' (repeatable)")
    p.set_defaults(func=run)


def run(args) -> int:
    import time

    from doa_jax import configurables, experiment, gin_utils
    from doa_jax.experiment import report
    from doa_jax.commands.run import format_row

    if any(b < 0 for b in args.budgets):
        raise ValueError(f"budgets must be non-negative, got {args.budgets}")
    configurables.register()
    started = time.perf_counter()
    rows = []
    cells = [(s, b) for s in ("annotate", "distill") for b in args.budgets]
    for i, (strategy, budget) in enumerate(cells, 1):
        gin_utils.parse(["runs/experiment.gin", "runs/demo_models.gin"],
                        [f"STRATEGY = '{strategy}'", f"EXTRA_BUDGET_USD = {budget}", f"START_LABELS = {args.start_labels}",
                         f"OUTPUT_DIR = '{args.out}'", f"SEED = {args.seed}", f"CellConfig.verbose = {not args.quiet}"]
                        + list(args.gin))
        cell = gin_utils.macro("CELL")
        if i == 1:
            gin_utils.write_operative_config(args.out)
        print(f"== cell {i}/{len(cells)}: {strategy} +${budget:g} ({time.perf_counter() - started:.0f} s so far)",
              flush=True)
        rows.append(experiment.run_cell(cell))
    path = report.write_report(args.out)
    profile = next((r.get("cost_profile") for r in rows if r.get("cost_profile")), None) or {}
    print(f"\nresults (tiny stand-in models priced as T5-XXL teacher / T5-Small student; cost profile "
          f"{profile.get('name', '?')}: {profile.get('source', '')}):")
    print("  " + loss_note(cell.train.loss.kd_weight, cell.train.loss.kd_temperature))
    for row in rows:
        print("  " + format_row(row))
    print("\n" + who_wins(rows, cell_intervals(rows)))
    print(f"\ndone in {time.perf_counter() - started:.0f} s: {args.out}/results.jsonl, {path}, {args.out}/plots/")
    print(_cache_note())
    return 0


def loss_note(kd_weight: float, temperature: float) -> str:
    """How the distilled student learns from the teacher's outputs, and whether that is the paper's loss."""
    paper = f"the paper's T²·KL at T = {temperature:g}"
    if kd_weight == 1.0:
        return f"distillation loss: {paper} on the teacher's greedy outputs (KD_WEIGHT = 1)"
    if kd_weight == 0.0:
        return ("distillation loss: sequence-level KD, cross-entropy on the teacher's greedy outputs (KD_WEIGHT = 0), "
                f"NOT {paper} (KD_WEIGHT = 1)")
    return f"distillation loss: {kd_weight:g} x {paper} + {1 - kd_weight:g} x sequence-level KD (NOT the paper's loss)"


def _cache_note() -> str:
    """Where this run's compiled programs went (a rerun reads them instead of compiling)."""
    import jax

    where = jax.config.jax_compilation_cache_dir if jax.config.jax_enable_compilation_cache else None
    if not where:
        return "compiled programs were not cached (DOA_COMPILATION_CACHE=off): a rerun compiles them again"
    return f"compiled programs are cached in {where}: a rerun skips their compilation (seconds above include it)"


Interval = tuple[float, float]


def who_wins(rows: list[dict], intervals: dict[tuple[str, float], Interval] | None = None) -> str:
    """Which arm scores higher at each budget, and between which budgets the lead changes hands (a
    cell that could not run, e.g. distillation below the teacher's price, loses to one that did).
    With `intervals` ((strategy, budget) -> 95% bootstrap interval), each score shows its interval
    and a lead whose intervals overlap the other arm's is called within noise, as is a change of
    lead on either side of which the arms are within noise."""
    intervals = intervals or {}
    scores: dict[float, dict[str, float]] = {r["extra_budget_usd"]: {} for r in rows}
    for r in rows:
        if r.get("value") is not None and r.get("status") in ("ok", "capped"):
            scores[r["extra_budget_usd"]][r["strategy"]] = r["value"]
    budgets, lines, leaders, clear = sorted(scores), [], [], {}
    for b in budgets:
        ran = scores[b]
        best = max(ran, key=ran.get) if ran else None
        leaders.append(best)
        rest = {k: v for k, v in ran.items() if k != best}
        clear[b] = _beyond_noise(intervals.get((best, b)), [intervals.get((k, b)) for k in rest])
        text = "nothing ran" if best is None else f"{best} {_score(ran[best], intervals.get((best, b)))}"
        if rest:
            other = max(rest, key=rest.get)
            text += f" vs {_score(rest[other], intervals.get((other, b)))}" + {
                True: ": beyond noise", False: ": within noise (the 95% intervals overlap)", None: ""}[clear[b]]
        elif best is not None:
            text += " (the only arm that ran)"
        lines.append(f"  +${b:g}: {text}")
    changes = []
    for i in range(1, len(budgets)):
        if None not in leaders[i - 1:i + 1] and leaders[i] != leaders[i - 1]:
            noisy = [f"+${b:g}" for b in budgets[i - 1:i + 1] if clear[b] is False]
            changes.append(f"{leaders[i]} overtakes between +${budgets[i - 1]:g} and +${budgets[i]:g}" + (
                f" (not beyond noise: the arms' intervals overlap at {' and '.join(noisy)})" if noisy else ""))
    lead = next((x for x in leaders if x), None)
    verdict = "; ".join(changes) if changes else (
        f"{lead} leads at every budget: no crossover in this range" if lead else "no arm ran")
    return "who wins (higher metric):\n" + "\n".join(lines) + f"\n  {verdict}"


def _score(value: float, interval: Interval | None) -> str:
    return f"{value:.1f}" + ("" if interval is None else f" [{interval[0]:.1f}, {interval[1]:.1f}]")


def _beyond_noise(best: Interval | None, others: list[Interval | None]) -> bool | None:
    """Whether the leader's 95% interval lies above every other arm's (None: an interval is missing,
    or no other arm ran)."""
    if best is None or not others or None in others:
        return None
    return all(o[1] < best[0] for o in others)


def cell_intervals(rows: list[dict]) -> dict[tuple[str, float], Interval]:
    """(strategy, budget) -> the 95% bootstrap interval of that cell of this run, as the report
    computes it (its test examples resampled; `report.attach_intervals`)."""
    from doa_jax.experiment import report

    cells = report.summarise(rows)
    report.attach_intervals(cells)
    return {(c.strategy, c.extra_budget_usd): c.interval for c in cells if c.interval is not None}
