"""`doa report RUN_DIR`: RUN_DIR/report.md (tables) and RUN_DIR/plots/*.png from RUN_DIR/results.jsonl.

Tables: each cell's metric as mean ± std over seeds beside the paper's PyTorch number where the
cell matches one of its main results, dollars spent and $ per metric point; the cost breakdown
by phase (projected onto the rate card the run was priced on, and measured on this machine).
Plots per task: metric vs total cost (starting labels + extra spent) per strategy with the Pareto
frontier, and bars per extra budget with the paper's bars beside. Works on the output of
`doa run`, `doa sweep` and `doa demo`, also while a sweep is still running.
"""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("report", help="write report.md and plots for a run or sweep directory",
                              description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="a directory holding results.jsonl (doa run / sweep / demo)")
    p.add_argument("--results", metavar="FILE", help="read rows from FILE instead of RUN_DIR/results.jsonl")
    p.set_defaults(func=run)


def run(args) -> int:
    from doa_jax import storage
    from doa_jax.experiment import report

    run_dir = storage.path(args.run_dir)     # a local folder or a URL (gs://)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"RUN_DIR {run_dir} is not a directory")
    path = report.write_report(run_dir, args.results)
    plots = sorted(p.name for p in (run_dir / "plots").glob("*.png"))
    print(f"report: {path}")
    if plots:
        print(f"plots: {', '.join(str(run_dir / 'plots' / p) for p in plots)}")
    return 0
