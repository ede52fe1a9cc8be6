#!/usr/bin/env python3
"""`doa advise` fed the paper's own Pareto points vs the paper's main-results winners.

For each of the four tasks whose Pareto points the paper gives (section 7.2: annotation at 0.1K-10K
labels, distillation at U = 10K and 100K), those points are the pilots, prices are the paper's own
(`advise.paper_pricing`), and the advice at each main-results budget (section 7.1, block A: 1K
start labels; block B, 5K/10K start, too with --all) is compared with the paper's winner, Ann. vs
Dist. (options: the paper's pair). Prints the table, the count, and each miss with why.
    python3 scripts/advise_vs_paper.py [--all] [--json PATH]
"""
import argparse
import csv
import json
import pathlib
import sys

from doa_jax.experiment import advise, report

PAPER_RESULTS = report.PAPER_RESULTS


def main_results(path: pathlib.Path = PAPER_RESULTS) -> dict:
    """{(task, start_labels, extra budget): {strategy: value}} of the paper's main results."""
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(line for line in f if not line.startswith("#")) if r["table"] == "main"]
    cells = {}
    for r in rows:
        cells.setdefault((r["task"], int(r["start_labels"]), float(r["extra_budget_usd"])), {})[r["strategy"]] = \
            float(r["value"])
    return cells


def why(cell: dict) -> str:
    """Which curve missed, by how much, and whether the pilots themselves said so."""
    misses = []
    for s in ("annotate", "distill"):
        if cell[f"predicted_{s}"] is None:
            misses.append(f"{s} infeasible at this budget")
            continue
        misses.append(f"{s} predicted {cell[f'predicted_{s}']:.1f} vs paper {cell[f'paper_{s}']:.1f}")
    text = "; ".join(misses)
    u = cell["distill_pilots"]
    drops = [f"U={b[0]:,} ({b[1]:.1f}) below U={a[0]:,} ({a[1]:.1f})" for a, b in zip(u, u[1:]) if b[1] < a[1]]
    if drops:
        text += f"; the distill pilots at {cell['start_labels']:,} labels fall: " + ", ".join(drops)
    if cell["cannot_tell_apart"]:
        text += f"; flagged 'cannot tell apart' (P = {cell['p_best']:.2f})"
    return text


def compare(start_labels: tuple[int, ...] = (1000,), n_boot: int = 2000) -> list[dict]:
    """One dict per main-results cell of the four tasks with the given start labels."""
    out = []
    tasks = sorted({r["task"] for r in advise.read_pareto()})
    for (task, L, budget), values in sorted(main_results().items()):
        if task not in tasks or L not in start_labels:
            continue
        pilots = advise.paper_pilots(task)
        a = advise.advise(pilots, advise.paper_pricing(task), task=task, metric=pilots[0].metric, start_labels=L,
                          budget=budget, strategies_=("annotate", "distill"), n_boot=n_boot)
        opts = {o.strategy: o for o in a.options}
        winner = max(("annotate", "distill"), key=lambda s: values[s])
        cell = {"task": task, "start_labels": L, "budget_usd": budget, "paper_winner": winner,
                "recommended": a.recommended.strategy, "match": a.recommended.strategy == winner,
                "p_best": a.p_best, "cannot_tell_apart": a.cannot_tell_apart,
                "distill_pilots": sorted(zip(a.fit.distill_points[0].astype(int).tolist(),
                                             a.fit.distill_points[1].tolist()))}
        for s in ("annotate", "distill"):
            cell[f"paper_{s}"] = values[s]
            cell[f"predicted_{s}"] = opts[s].expected
            cell[f"interval_{s}"] = list(opts[s].interval) if opts[s].interval else None
        cell["why"] = "" if cell["match"] else why(cell)
        out.append(cell)
    return out


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="block B (5K/10K start labels) too")
    parser.add_argument("--json", help="write the cells to this file")
    args = parser.parse_args()
    cells = compare((1000, 5000, 10000) if args.all else (1000,))
    print(f"{'task':<14} {'L':>6} {'+$':>5} {'paper Ann':>9} {'Dist':>6} {'pred Ann':>9} {'Dist':>6} "
          f"{'winner':>8} {'advice':>8} {'P':>5}  ok")
    for c in cells:
        print(f"{c['task']:<14} {c['start_labels']:>6} {c['budget_usd']:>5g} {c['paper_annotate']:>9.1f} "
              f"{c['paper_distill']:>6.1f} {_fmt(c['predicted_annotate']):>9} {_fmt(c['predicted_distill']):>6} "
              f"{c['paper_winner']:>8} {c['recommended']:>8} {c['p_best']:>5.2f}  {'yes' if c['match'] else 'NO'}")
    for block, Ls in (("A (1K start)", (1000,)), ("B (5K/10K start)", (5000, 10000))):
        part = [c for c in cells if c["start_labels"] in Ls]
        if part:
            print(f"block {block}: the advice matches the paper's winner in {sum(c['match'] for c in part)} of "
                  f"{len(part)} cells")
    for c in cells:
        if not c["match"]:
            print(f"  wrong: {c['task']} {c['start_labels']} +${c['budget_usd']:g}: {c['why']}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(cells, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
