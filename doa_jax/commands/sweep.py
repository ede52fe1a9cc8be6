"""`doa sweep --gin_file sweeps/X.gin [--gin.X=V]`: a grid of budget cells, resumable, then a report.

The grid (GRID_TASKS x GRID_START_LABELS x GRID_BUDGETS_USD x GRID_STRATEGIES x GRID_SEEDS, see
gin/runs/sweep.gin) is expanded into `doa run` cells, all checked before any compute. Every cell
appends one row to OUTPUT_DIR/results.jsonl, keyed by the hash of its config; rerunning the same
command (after a kill, or with a larger grid) runs only the cells without a row. Cells that share a
teacher fine-tune run next to each other and share it through OUTPUT_DIR/cache. Writes
OUTPUT_DIR/config.gin, OUTPUT_DIR/sweep.json (the cells and their keys) and, at the end,
OUTPUT_DIR/report.md with plots (as `doa report OUTPUT_DIR`).
    doa sweep --gin_file sweeps/demo.gin --gin.OUTPUT_DIR=/tmp/demo_sweep
    doa sweep --gin_file sweeps/paper_main.gin --gin.OUTPUT_DIR=/runs/paper_main \\
      --gin.VOCABULARY=/t5/spiece.model --gin.TEACHER_CHECKPOINT=/ckpt/t5-v1_1-xxl \\
      --gin.STUDENT_CHECKPOINT=/ckpt/t5-v1_1-small
    doa sweep --gin_file sweeps/demo.gin --dry_run     # list the cells (done or to run), run none
Multi-host: the same command on every host with --multihost (TPU VMs) or --coordinator_address,
--num_processes and --process_id, OUTPUT_DIR a gs:// URL: every host runs every cell together.
"""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    from doa_jax.commands.run import add_dry_run_flags, add_lock_flag
    from doa_jax.commands.train import add_multihost_flags
    from doa_jax.gin_flags import add_gin_flags

    p = subparsers.add_parser("sweep", help="run a grid of budget cells from gin (resumable), then report",
                              description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_gin_flags(p)
    add_dry_run_flags(p, "list the grid's cells and which already have a row; run nothing")
    p.add_argument("--no_report", "--no-report", action="store_true", help="do not write report.md at the end")
    add_multihost_flags(p)
    add_lock_flag(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import gin

    from doa_jax import configurables, storage
    from doa_jax.commands.run import check_fit, dry_run, preflight
    from doa_jax.commands.train import start_multihost
    from doa_jax.experiment import sweep

    if not args.dry_run:
        start_multihost(args)   # before any other JAX call
    configurables.register()
    search = [s for s in args.gin_search_paths.split(",") if s]
    points, cells = sweep.load_sweep(args.gin_file, args.gin_bindings, search_paths=search)
    out = storage.path(cells[0].output_dir)
    print(f"sweep output: {storage.absolute(out)} (OUTPUT_DIR; --gin.OUTPUT_DIR=DIR to choose)", flush=True)
    if not args.dry_run:
        preflight(cells[0])
    if args.dry_run:
        return dry_run(cells, str(out), args.target, what="sweep", names=[p.describe() for p in points])
    if args.target:
        raise ValueError("--target goes with --dry_run (a sweep compiles for the devices it runs on)")
    if not args.skip_fit_check:
        check_fit(cells)
    config = ("# doa sweep: the grid sets TASK, START_LABELS, EXTRA_BUDGET_USD, STRATEGY and SEED per cell "
              "(sweep.json lists the cells)\n" + gin.config_str())
    sweep.run_sweep(points, cells, write_report=not args.no_report, config_gin=config,
                    take_over_lock=args.take_over_lock)
    return 0
