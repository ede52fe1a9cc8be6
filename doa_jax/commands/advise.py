"""`doa advise`: which split to buy (annotate, distill or mixed) before spending, from learning curves.

Fits a learning curve per strategy to pilot results, prices what the budget buys under each, and
recommends the split with the highest expected metric, with an interval, the runner-up and the
probability that the recommendation is the better one (`doa_jax.experiment.advise`).

Pilots come from `--pilots FILE` (JSON lines {"strategy", "labels", "unlabeled", "value"}, optional
"task", "metric", "seed", "cost_usd"), and/or from the finished cells of `--out DIR`; without
`--pilots`, cheap pilot cells are run in `--out DIR` first (annotate at a few label counts up to
the start labels; distill with the start-label teacher at a few unlabeled counts), reusing any
already there. Examples:
    doa advise --task demo --start-labels 100 --budget 5 --out advise_demo
    doa advise --task nq --start-labels 1000 --budget 50 --pilots nq_pilots.jsonl --json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time

from doa_jax.commands.plan import _budget, _pool, _unlabeled_pool

DEMO_GIN = ("runs/experiment.gin", "runs/demo_models.gin")


def register(subparsers) -> None:
    p = subparsers.add_parser("advise", help="which split to buy before spending: curves, prices, a recommendation",
                              description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, help="task card name/path, or 'demo'")
    p.add_argument("--start-labels", type=int, required=True, help="labels already bought (L)")
    p.add_argument("--budget", type=_budget, required=True, help="extra budget in USD")
    p.add_argument("--cost-profile", default=None, help="paper | mfu | calibrated (default: paper where the "
                   "paper's costs exist for the task, else mfu)")
    p.add_argument("--calibration", default=None, help="a calibration file from `doa calibrate`")
    p.add_argument("--pilots", default=None, help="pilot results, JSON lines (see above)")
    p.add_argument("--out", default=None, help="run directory: its finished cells are pilots; pilot cells run here")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", default=None, metavar="PATH",
                   help="write the advice's figure (PNG) to PATH (default: OUT/advise.png with --out, else none)")
    p.add_argument("--unlabeled-pool", type=_pool, default="data",
                   help="unlabeled inputs available, capping U as `doa plan` does: 'data' (the task's local pool "
                        "when its data is present; default), 'none' (no cap) or a number; pilot cells: their pool")
    p.add_argument("--data-dir", default=None, help="the task's data folder (for the unlabeled pool)")
    p.add_argument("--level", type=float, default=0.8, help="interval level (default 0.8)")
    p.add_argument("--threshold", type=float, default=0.8,
                   help="below this P(best), say the options cannot be told apart (default 0.8)")
    p.add_argument("--shares", type=float, nargs="*", default=[0.25, 0.5, 0.75], help="mixed: compute shares")
    p.add_argument("--strategies", nargs="+", default=["annotate", "distill", "mixed"], help="options to weigh")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap replicates (default 2000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gin_file", action="append", default=[], help="pilot cells: gin files (after runs/experiment.gin)")
    p.add_argument("--gin", action="append", default=[], help="pilot cells: gin bindings, e.g. VOCABULARY='x'")
    p.add_argument("--quiet", action="store_true", help="no per-step training lines from pilot cells")
    p.set_defaults(func=run)


def _check_args(args) -> None:
    if args.start_labels < 1:
        raise ValueError(f"--start-labels must be >= 1, got {args.start_labels}")
    if not 0 < args.level < 1 or not 0 < args.threshold <= 1:
        raise ValueError(f"--level must be in (0, 1) and --threshold in (0, 1], got {args.level}, {args.threshold}")
    if any(not 0 < s < 1 for s in args.shares):
        raise ValueError(f"--shares must be in (0, 1), got {args.shares}")
    if args.bootstrap < 100:
        raise ValueError(f"--bootstrap must be >= 100, got {args.bootstrap}")
    if args.pilots is None and args.out is None:
        raise ValueError("give --pilots FILE, or --out DIR to run pilot cells there (or reuse its finished cells)")


def make_cell(args, strategy: str, start_labels: int, budget: float, **extra):
    """A cell configured as `doa demo` / `doa run` build theirs, with extra gin macros (e.g. MAX_UNLABELED)."""
    from doa_jax import configurables, gin_utils
    from doa_jax.experiment import task_setup

    configurables.register()
    files = list(DEMO_GIN) if args.task == "demo" else ["runs/experiment.gin"]
    bindings = [f"STRATEGY = '{strategy}'", f"EXTRA_BUDGET_USD = {budget!r}", f"START_LABELS = {start_labels}",
                f"OUTPUT_DIR = '{args.out}'", f"SEED = {args.seed}", f"CellConfig.verbose = {not args.quiet}"]
    if args.task != "demo":
        bindings.append(f"TASK = '{args.task}'")
    bindings += [f"{k} = {v!r}" for k, v in extra.items()] + list(args.gin)
    gin_utils.parse(files + list(args.gin_file), bindings)
    return task_setup.resolve_models(gin_utils.macro("CELL"))   # vocab sizes fixed, as run_cell keys the cell


class Cells:
    """The task as pilot cells see it: its card, pools and the planner that prices its cells."""

    def __init__(self, args):
        from doa_jax.experiment import task_setup
        from doa_jax.experiment.pricing import Pricer

        self.args = args
        self.base = make_cell(args, "annotate", args.start_labels, args.budget)
        self.setup = task_setup.load_task(self.base)
        self.card = self.setup.card
        # The cells' own pricing, so each pilot's budget buys exactly its labels or inputs.
        self.planner = Pricer.for_cell(self.base, self.card, self.setup.lengths).planner
        pools = self.setup.pools
        cap = self.base.distill.max_unlabeled
        self.label_pool = len(pools.train)
        self.unlabeled_pool = len(pools.unlabeled) if cap is None else min(cap, len(pools.unlabeled))

    def annotate_pilot(self, n: int):
        """The cell that trains the student on exactly the first n labels: start n - 1, buy one."""
        ppl = self.card.annotation_cost_usd
        budget = round(ppl * 1.5 + self.planner.student_finetune_usd(n) * 2, 6)
        plan = self.planner.plan("annotate", n - 1, budget, labels_available=self.label_pool)
        if plan.labels_used != n:
            raise RuntimeError(f"pilot budget ${budget} buys {plan.labels_used} labels, not {n}")
        return make_cell(self.args, "annotate", n - 1, budget)

    def distill_pilot(self, u: int):
        """The cell that distils the start-label teacher on exactly the first u unlabeled inputs."""
        L = self.args.start_labels
        plan = self.planner.plan("distill", L, 1e9, unlabeled_available=u)
        budget = round(plan.total_usd * 1.25 + 0.01, 6)
        return make_cell(self.args, "distill", L, budget, MAX_UNLABELED=u)


def pilot_grid(start_labels: int, unlabeled_budget: int) -> tuple[list[int], list[int]]:
    """Label counts (L/8, L/4, L/2, L) and unlabeled counts (U/8, U/4, U/2 of what the budget buys):
    seven pilots for the curves' five parameters, each curve one more than its own."""
    labels = sorted({max(start_labels // 2 ** k, 1) for k in (3, 2, 1, 0)})
    unlabeled = sorted({max(unlabeled_budget // 2 ** k, 1) for k in (3, 2, 1)})
    return labels, unlabeled


def run_pilots(args, cells: Cells, pricing) -> list[dict]:
    """Runs (or finds finished) pilot cells in args.out; returns their rows."""
    from doa_jax import experiment
    from doa_jax.experiment import advise

    buys = {o.strategy: o for o in advise.plan_options(pricing, args.start_labels, args.budget,
                                                       strategies_=("distill",), unlabeled_pool=cells.unlabeled_pool)}
    u_budget = buys["distill"].unlabeled if buys["distill"].feasible else cells.unlabeled_pool
    labels, unlabeled = pilot_grid(args.start_labels, max(u_budget, 8))
    todo = [cells.annotate_pilot(n) for n in labels] + [cells.distill_pilot(u) for u in unlabeled]
    rows, started = [], time.perf_counter()
    for i, cell in enumerate(todo, 1):
        print(f"== pilot {i}/{len(todo)}: {cell.strategy} start {cell.start_labels} +${cell.extra_budget_usd:g}"
              f"{'' if cell.distill.max_unlabeled is None else f' U={cell.distill.max_unlabeled}'} "
              f"({time.perf_counter() - started:.0f} s so far)", file=sys.stderr, flush=True)
        rows.append(experiment.run_cell(cell))
    return rows


def gather_pilots(args, task_names, cells) -> tuple[list, list[str]]:
    """Pilots from --pilots and from the finished cells of --out (rows of this task and models)."""
    from doa_jax import storage
    from doa_jax.experiment import advise, results
    from doa_jax.experiment.cell import size_name

    pilots, notes = [], []
    if args.pilots:
        pilots += advise.read_pilots(args.pilots)
    if args.out:
        path = storage.join(args.out, results.RESULTS_FILE)
        rows = results.read_rows(path)
        mine = [r for r in rows if r.get("task") in task_names and (cells is None or (
            r.get("student") == size_name(cells.base.student) and r.get("teacher") == size_name(cells.base.teacher)))]
        if len(mine) < len(rows):
            notes.append(f"{len(rows) - len(mine)} row(s) of {path} are of another task or models: left out")
        found, more = advise.pilots_from_rows(mine, str(path))
        pilots, notes = pilots + found, notes + more
    return pilots, notes


def option_pricing(args, card, cells: "Cells | None"):
    """How the options are priced. With cells to run (the demo, or pilots run here): as those cells
    run and will charge (their models, lengths, epochs, batch, soft targets); with pilots from a file
    only: the paper's XXL teacher and Small student under the profile's recipe."""
    from doa_jax.experiment import advise
    from doa_jax.experiment.pricing import recipe_of
    from doa_jax.model import config_for_size

    if cells is None:
        return advise.pricing_for(card, args.cost_profile, args.calibration, teacher=config_for_size("xxl"),
                                  student=config_for_size("small"))
    teacher, student = cells.base.pricing_models()
    return advise.pricing_for(dataclasses.replace(card, feature_lengths=dict(cells.setup.lengths)), args.cost_profile,
                              args.calibration, teacher=teacher, student=student, **recipe_of(cells.base))


def run(args) -> int:
    from doa_jax import storage
    from doa_jax.data import cards
    from doa_jax.experiment import advise

    _check_args(args)
    started = time.perf_counter()
    plot_to = args.plot or (storage.join(args.out, "advise.png") if args.out else None)   # none unless asked
    if args.out is None and args.task == "demo":   # the demo's vocabulary is built in a cache directory
        args.out = tempfile.mkdtemp(prefix="doa_advise_")
    cells = Cells(args) if (args.task == "demo" or args.pilots is None) else None
    card = cells.card if cells else cards.load_card(args.task)
    task_names = {args.task, card.name}
    pricing = option_pricing(args, card, cells)
    pool, pool_note = ((cells.unlabeled_pool, f"{cells.unlabeled_pool} inputs (the pilot cells' unlabeled pool)")
                       if cells else _unlabeled_pool(args, card))
    if args.pilots is None:
        run_pilots(args, cells, pricing)
    pilots, notes = gather_pilots(args, task_names, cells)
    metric = advise.check_pilots(pilots, task_names, card.primary_metric)
    advice = advise.advise(pilots, pricing, task=args.task, metric=metric, start_labels=args.start_labels,
                           budget=args.budget, strategies_=args.strategies, shares=args.shares,
                           label_pool=cells.label_pool if cells else None,
                           unlabeled_pool=pool, n_boot=args.bootstrap,
                           level=args.level, threshold=args.threshold, seed=args.seed)
    advice.notes[:0] = notes
    plot_path = advise.plot(advice, plot_to) if plot_to else None
    out = advice.as_json()
    out.update(pricing_note=pricing.note, unlabeled_pool=pool_note, plot=plot_path,
               seconds=round(time.perf_counter() - started, 1),
               pilot_compute_usd=sum(p.cost_usd or 0.0 for p in pilots))
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        print_advice(advice, out)
    return 0


def print_advice(advice, out: dict) -> None:
    print(f"{advice.task}: +${advice.budget_usd:g} over {advice.start_labels} labels; prices: {out['pricing_note']}")
    fit = out["fit"]
    print(f"unlabeled pool: {out['unlabeled_pool']}")
    print(f"pilots: {fit['pilots']['annotate']} annotate, {fit['pilots']['distill']} distill at {advice.start_labels} labels; "
          f"run noise sigma {fit['sigma']:.2f} ({fit['dof']} dof)")
    header = f"{'option':<20} {'labels+':>8} {'unlabeled':>10} {'cost $':>9} {'expected':>9} {'interval':>15}"
    print(header + "\n" + "-" * len(header))
    for o in advice.options:
        pred = (f"{o.expected:>9.1f} {f'{o.interval[0]:.1f}-{o.interval[1]:.1f}':>15}" if o.feasible
                else f"  infeasible: {o.reason}")
        print(f"{o.name:<20} {o.labels_bought:>8} {o.unlabeled:>10} {o.cost_usd:>9.2f} {pred}")
    print(f"\nrecommendation: {advice.verdict()}")
    for note in advice.notes:
        print(f"  note: {note}")
    print(f"plot: {out['plot'] or 'none (--plot PATH writes one)'}  ({out['seconds']:.0f} s)")
