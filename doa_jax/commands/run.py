"""`doa run --gin_file runs/experiment.gin --gin_file experiments/X.gin [--gin.X=V]`: one budget cell.

Writes OUTPUT_DIR/config.gin (the operative config), OUTPUT_DIR/results.jsonl (one row for the
cell), and OUTPUT_DIR/cells/<key>/ (ledger, checkpoints, predictions); teacher runs and teacher
stores go to OUTPUT_DIR/cache (or CACHE_DIR) and are reused by any later cell that can. Rerunning
the same command after a kill resumes; after the row is written, it does nothing.
Multi-host (a TPU pod slice, or GPU hosts): the same command on every host, with --multihost (TPU
VMs) or --coordinator_address host:port --num_processes N --process_id I; OUTPUT_DIR must be one
folder every host sees (a gs:// URL). Process 0 writes every shared file.
"""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    from doa_jax.commands.train import add_multihost_flags
    from doa_jax.gin_flags import add_gin_flags

    p = subparsers.add_parser("run", help="run one budget cell (annotate | distill | mixed) from gin",
                              description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_gin_flags(p)
    add_dry_run_flags(p, "print the cell's key and whether it already has a row; run nothing")
    add_multihost_flags(p)
    add_lock_flag(p)
    p.set_defaults(func=run)


def add_dry_run_flags(p: argparse.ArgumentParser, what: str) -> None:
    """`--dry_run`, `--target` and `--skip_fit_check` of `doa run` and `doa sweep`."""
    p.add_argument("--skip_fit_check", "--skip-fit-check", action="store_true",
                   help="on an accelerator, start without first compiling every phase for it to check it fits")
    p.add_argument("--dry_run", "--dry-run", action="store_true", help=what)
    p.add_argument("--target", default=None,
                   help="with --dry_run: compile every phase for this TPU slice or GPU (`doa aot` targets, e.g. "
                        "v5e-8, h100) and say per phase whether it fits; exit 3 if any does not (the `aot` extra)")


def add_lock_flag(p: argparse.ArgumentParser) -> None:
    """`--take_over_lock` of `doa run` and `doa sweep` (see `doa_jax.experiment.locking`)."""
    p.add_argument("--take_over_lock", "--take-over-lock", action="store_true",
                   help="take the output folder's and cells' locks even from a process whose lease is live "
                        "(one on a host that is gone for good); it is told, and stops renewing")


def format_row(row: dict) -> str:
    """One line per cell for the console: what it scored, bought and spent (and what priced it), and
    what it really took on this machine."""
    if row.get("status") == "infeasible":
        return (f"{row['task']} {row['strategy']:<8} +${row['extra_budget_usd']:g}: INFEASIBLE: {row['reason']}")
    spent = row.get("spent_usd", {})
    phases = ", ".join(f"{k} ${v:.4g}" for k, v in spent.items() if v)
    profile = (row.get("cost_profile") or {}).get("name", "mfu")
    assumed = " ASSUMED" if (row.get("cost_profile") or {}).get("assumed", profile == "mfu") else ""
    shared = f" (student shared with cell {row['student_trained_by']})" if row.get("student_trained_by") else ""
    status = row.get("status", "ok")
    return (f"{row['task']} {row['strategy']:<8} +${row['extra_budget_usd']:g}: {row['metric']} {row['value']:.2f} "
            f"| labels {row['labels_used']} (+{row['labels_bought']}), unlabeled {row['unlabeled_used']} "
            f"| spent ${row['spent_total_usd']:.4g} of ${row['budget_usd']:g} ({phases or 'nothing'}; "
            f"{profile}{assumed}) | here: {row.get('wall_seconds') or 0:.0f} s{shared}"
            f"{' | ' + status.upper() + ': ' + row['reason'] if status in ('capped', 'diverged') else ''}")


def preflight(cell) -> None:
    """Before any compute: OUTPUT_DIR and CACHE_DIR can be written (a gs:// bucket that is missing or
    whose credentials are missing fails here, naming the path)."""
    from doa_jax import storage

    storage.check_writable(cell.output_dir, "OUTPUT_DIR")
    if cell.cache_dir:
        storage.check_writable(cell.cache_dir, "CACHE_DIR")


def run(args) -> int:
    from doa_jax import configurables, experiment, gin_utils, partitioning
    from doa_jax.commands.train import start_multihost

    if args.target and not args.dry_run:
        raise ValueError("--target goes with --dry_run (a run compiles for the devices it runs on)")
    if not args.dry_run:
        start_multihost(args)   # before any other JAX call
    configurables.register()

    gin_utils.parse_flags(args)
    cell = gin_utils.macro("CELL")
    if args.dry_run:
        return dry_run([cell], cell.output_dir, args.target)
    preflight(cell)
    if not args.skip_fit_check:
        check_fit([cell])
    if partitioning.is_chief():
        path = gin_utils.write_operative_config(cell.output_dir)
        print(f"operative gin config: {path}", flush=True)
    row = experiment.run_cell(cell, take_over_lock=args.take_over_lock)
    print(format_row(row))
    print(f"results: {cell.output_dir}/results.jsonl (cell {row['cell_key']})")
    return 0


def dry_run(cells, output_dir: str, target, *, what: str = "run", names=None) -> int:
    """The cells' keys and which already have a row; with `target`, each phase compiled for it."""
    from doa_jax import storage
    from doa_jax.commands.aot import check_cells
    from doa_jax.experiment import programs, results

    done = {r.get("cell_key") for r in results.read_rows(storage.path(output_dir) / results.RESULTS_FILE)}
    keyed = [programs.resolved(c) for c in cells]
    print(f"{what}: {len(cells)} cells in {output_dir} ({sum(c.key() in done for c in keyed)} already have a row)")
    for i, (c, name) in enumerate(zip(keyed, names or [c.describe() for c in keyed]), 1):
        print(f"  {i:>3}. {'done ' if c.key() in done else 'to run'} {c.key()}  {name}")
    if target is None:
        return 0
    return 0 if check_cells([c for c in keyed if c.key() not in done] or keyed, target) else 3


def check_fit(cells) -> None:
    """On an accelerator `doa aot` knows (a TPU slice, NVIDIA GPUs), before anything is spent: every
    phase of the cells to run compiled for these devices; one that cannot fit stops the run, naming
    the phase, the GiB it needs and `doa aot --search`. Nothing on CPUs; a kind the target table
    lacks, or a machine without the compiler plugin, is said and not checked."""
    import jax

    from doa_jax.bench import targets
    from doa_jax.commands.aot import check_cells

    devices = jax.devices()
    if devices[0].platform == "cpu":
        return
    name = targets.for_devices(devices)
    problem = targets.aot_available(targets.get(name).platform) if name else None
    if name is None or problem:
        print(f"fit check skipped: {len(devices)} x {devices[0].device_kind} "
              f"{'is not in doa_jax/bench/targets.toml' if name is None else f'({problem})'}", flush=True)
        return
    if not check_cells(cells, name):
        raise ValueError(f"a phase does not fit {name} (above): change the layout (TEACHER_MESH_MODEL, "
                         f"TEACHER_REMAT, ...) as `doa aot --target {name} --search` suggests, or rerun with "
                         "--skip_fit_check to try anyway")
