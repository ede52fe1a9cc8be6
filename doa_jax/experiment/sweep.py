"""A sweep: tasks x start labels x extra budgets x strategies x seeds, run as resumable cells.

    sweep gin file (GRID_* macros + experiment.gin settings) ──► Grid ──► points (validated, ordered)
    each point ──► its macros bound (TASK, START_LABELS, EXTRA_BUDGET_USD, STRATEGY, SEED) ──► CellConfig
    cells ──► run_sweep: skip cells whose key has a row in OUTPUT_DIR/results.jsonl, run the rest
              (experiment.run_cell appends the row) ──► summary ──► report.md

A cell is exactly what `doa run` builds from the same gin files and macros, so its key
(`CellConfig.key()`, a hash of its whole config) is the same too: a killed sweep, rerun, runs
only the cells without a row, and each cell has one row. Cells that can share a fine-tuned
teacher (same task, start labels and seed) run next to each other; the teacher runs and teacher
stores live in the cells' shared `cache_dir`.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
import time
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import gin

from doa_jax import gin_utils, partitioning, storage
from doa_jax.data import cards
from doa_jax.experiment import costs, locking, report, strategies, task_setup
from doa_jax.experiment import results as results_lib
from doa_jax.experiment.cell import run_cell

# Grid axis -> the gin macro that sets it (a sweep file sets these) and the cell macro it binds.
AXES = (
    ("tasks", "GRID_TASKS", "TASK"),
    ("start_labels", "GRID_START_LABELS", "START_LABELS"),
    ("budgets_usd", "GRID_BUDGETS_USD", "EXTRA_BUDGET_USD"),
    ("strategies", "GRID_STRATEGIES", "STRATEGY"),
    ("seeds", "GRID_SEEDS", "SEED"),
)
GRID_MACRO = {field: grid for field, grid, _ in AXES}
STATE_FILE = results_lib.SWEEP_STATE_FILE
PAPER_STRATEGIES = strategies.PAPER   # the default grid: the paper's Ann. vs Dist.


@dataclasses.dataclass(frozen=True)
class Point:
    """One cell's grid coordinates."""

    task: str
    start_labels: int
    extra_budget_usd: float
    strategy: str
    seed: int

    def macros(self) -> dict[str, Any]:
        return {"TASK": self.task, "START_LABELS": self.start_labels, "EXTRA_BUDGET_USD": self.extra_budget_usd,
                "STRATEGY": self.strategy, "SEED": self.seed}

    def describe(self) -> str:
        return (f"{self.task}, {self.start_labels} labels, +${self.extra_budget_usd:g}, {self.strategy}, "
                f"seed {self.seed}")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _as_list(value: Any, macro: str, of: str = "") -> list:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"{macro} must be a list{' ' + of if of else ''}, got {value!r}")
    return list(value)


@dataclasses.dataclass(frozen=True)
class Grid:
    """The sweep's axes. `budgets_usd` is one list for every task, or {task: [...]} per task (the
    paper's main grid spends different amounts per task)."""

    tasks: Sequence[str]
    start_labels: Sequence[int]
    budgets_usd: Union[Sequence[float], Mapping[str, Sequence[float]]]
    strategies: Sequence[str] = PAPER_STRATEGIES
    seeds: Sequence[int] = (0,)

    def budgets_for(self, task: str) -> list[float]:
        if isinstance(self.budgets_usd, Mapping):
            if task not in self.budgets_usd:
                raise ValueError(f"GRID_BUDGETS_USD has no budgets for task {task!r} "
                                 f"(it has {', '.join(map(repr, self.budgets_usd))})")
            return _as_list(self.budgets_usd[task], f"GRID_BUDGETS_USD[{task!r}]", "of dollar amounts")
        return _as_list(self.budgets_usd, "GRID_BUDGETS_USD", "of dollar amounts (or {task: [...]})")

    def validate(self) -> None:
        """Raises ValueError naming the macro and value of the first bad axis (before any compute)."""
        axes = {f: _as_list(getattr(self, f), GRID_MACRO[f]) for f in ("tasks", "start_labels", "strategies", "seeds")}
        for field, values in axes.items():
            if not values:
                raise ValueError(f"the sweep's grid is empty: {GRID_MACRO[field]} has no values")
        for task in axes["tasks"]:
            if not isinstance(task, str) or not task:
                raise ValueError(f"GRID_TASKS: a task is a card name (or 'demo'), got {task!r}")
        for n in axes["start_labels"]:
            if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                raise ValueError(f"GRID_START_LABELS: start labels must be whole numbers >= 0, got {n!r}")
        for s in axes["strategies"]:
            if s not in strategies.TABLE:
                raise ValueError(f"GRID_STRATEGIES: unknown strategy {s!r}; strategies: {', '.join(strategies.NAMES)}")
        for seed in axes["seeds"]:
            if not isinstance(seed, int) or isinstance(seed, bool):
                raise ValueError(f"GRID_SEEDS: a seed is a whole number, got {seed!r}")
        if isinstance(self.budgets_usd, Mapping):
            extra = sorted(set(self.budgets_usd) - set(axes["tasks"]))
            if extra:
                raise ValueError(f"GRID_BUDGETS_USD has budgets for {', '.join(map(repr, extra))}, "
                                 f"not in GRID_TASKS {axes['tasks']!r}")
        for task in axes["tasks"]:
            budgets = self.budgets_for(task)
            where = f"GRID_BUDGETS_USD[{task!r}]" if isinstance(self.budgets_usd, Mapping) else "GRID_BUDGETS_USD"
            if not budgets:
                raise ValueError(f"the sweep's grid is empty: {where} has no budgets")
            for b in budgets:
                if not _is_number(b) or math.isnan(b) or math.isinf(b):
                    raise ValueError(f"{where}: a budget is a number of dollars, got {b!r}")
                if b < 0:
                    raise ValueError(f"{where}: a budget must be >= 0 dollars, got {b!r}")

    def points(self) -> list[Point]:
        """Every cell, ordered task, start labels, seed, strategy, budget (the user's order on each
        axis), so cells that share a teacher fine-tune run next to each other. Repeats are dropped."""
        self.validate()
        out, seen = [], set()
        for task in self.tasks:
            for start in self.start_labels:
                for seed in self.seeds:
                    for strategy in self.strategies:
                        for budget in self.budgets_for(task):
                            # The budget as written (100 stays an int): the cell then has the key
                            # `doa run` gives it with the same EXTRA_BUDGET_USD literal.
                            p = Point(task, int(start), budget, strategy, int(seed))
                            if p not in seen:
                                seen.add(p)
                                out.append(p)
        return out


# ----------------------------------------------------------------------------- gin -> cells

def check_task(task: str) -> None:
    """A task is 'demo' or a card name/path; an unknown one is an error listing the known tasks."""
    if task == "demo":
        return
    try:
        cards.load_card(task)
    except FileNotFoundError as e:
        raise ValueError(f"GRID_TASKS: {e}") from None


def cells_from_gin(points: Iterable[Point], cell_macro: str = "CELL") -> list:
    """Builds each point's CellConfig from the parsed (not finalized) gin config, by binding the
    point's macros and building `cell_macro`, as `doa run` would with those macros set."""
    points = list(points)
    names = list(points[0].macros()) if points else []
    before = {name: gin_utils.macro(name, None) for name in names}
    cells = []
    for p in points:
        for name, value in p.macros().items():
            gin.bind_parameter(f"{name}/macro.value", value)
        cells.append(gin_utils.macro(cell_macro))
    for name, value in before.items():      # the config as parsed again (as config.gin records it)
        gin.bind_parameter(f"{name}/macro.value", value)
    return cells


def check_cells(cells: Sequence) -> list:
    """Everything that can be checked before compute: one output dir, tasks, accelerators, data
    files, and that each vocabulary fits its models. Returns the cells with their models' vocab
    sizes resolved (`task_setup.resolve_models`), as `run_cell` will run them."""
    if not cells:
        raise ValueError("the sweep's grid is empty")
    dirs = {c.output_dir for c in cells}
    if len(dirs) > 1:
        raise ValueError(f"the sweep's cells write to several OUTPUT_DIRs ({', '.join(sorted(dirs))}); "
                         f"a sweep has one")
    cards_ = costs.load_rate_cards()
    for c in cells:
        for macro, key in (("ACCELERATOR", c.pricing.accelerator), ("MEASURED_ON", c.pricing.measured_on)):
            if key is None:    # MEASURED_ON = None: the job's own devices' card, found when a cell starts
                continue
            try:
                costs.get_accelerator(key, cards_)
            except ValueError as e:
                raise ValueError(f"{macro}: {e}") from None
    checked = set()
    for c in cells:
        if c.task in checked:
            continue
        checked.add(c.task)
        check_task(c.task)
        if c.task != "demo":
            card = cards.load_card(c.task)
            for key in card.files:
                card.file_path(key)          # a missing data file is named now, not mid-sweep
            if c.vocab is None:
                raise ValueError(f"task {card.name} needs VOCABULARY: T5's spiece.model (or `doa vocab build`)")
    vocabs: dict[str, Any] = {}
    resolved = []
    for c in cells:                           # each model's vocab size, fitted to its vocabulary now
        try:
            vocab = vocabs.get(c.vocab) or task_setup.task_vocab(c)
        except (ValueError, OSError) as e:
            raise ValueError(f"VOCABULARY: {e}") from None
        vocabs.setdefault(c.vocab, vocab)
        resolved.append(task_setup.resolve_models(c, vocab))
    return resolved


def load_sweep(gin_files: Sequence[str], bindings: Sequence[str] = (), search_paths: Sequence[str] = (),
               grid_macro: str = "GRID") -> tuple[list[Point], list]:
    """Parses a sweep's gin files and returns (points, cells), all checked before any compute."""
    gin_utils.parse(gin_files, bindings, search_paths=search_paths, finalize=False)
    grid = gin_utils.macro(grid_macro)
    if not isinstance(grid, Grid):
        raise ValueError(f"{grid_macro} must be @SweepGrid(), got {grid!r}")
    points = grid.points()
    for task in dict.fromkeys(p.task for p in points):
        check_task(task)
    cells = check_cells(cells_from_gin(points))
    return points, cells


# ----------------------------------------------------------------------------- running

def _fmt_seconds(s: Optional[float]) -> str:
    if s is None or not math.isfinite(s):
        return "?"
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _fmt_value(row: Mapping[str, Any]) -> str:
    v = row.get("value")
    return "-" if v is None else f"{v:.1f}"


@dataclasses.dataclass
class SweepResult:
    rows: list[dict[str, Any]]      # one per cell, in grid order
    ran: int                        # cells run by this call
    skipped: int                    # cells that already had a row
    report: Optional[pathlib.Path]


def run_sweep(points: Sequence[Point], cells: Sequence, *, runner: Optional[Callable[[Any], dict]] = None,
              write_report: bool = True, log: Optional[Callable[[str], None]] = None,
              config_gin: Optional[str] = None, take_over_lock: bool = False) -> SweepResult:
    """Runs the cells without a row in OUTPUT_DIR/results.jsonl, in order; returns every cell's row.

    `config_gin` (the sweep's gin config) is written to OUTPUT_DIR/config.gin once the sweep holds
    the folder's lock, so a second sweep refused by the lock overwrites nothing.

    `runner` (default `run_cell`) runs one cell and appends its row to results.jsonl.
    `take_over_lock`: take the folder's lock (and each cell's) even from a live holder (`locking`).
    """
    runner = runner or functools.partial(run_cell, take_over_lock=take_over_lock)
    if log is None:
        log = functools.partial(print, flush=True)
    if not cells or len(cells) != len(points):
        raise ValueError(f"run_sweep needs one cell per point, got {len(cells)} cells for {len(points)} points")
    if len({c.output_dir for c in cells}) > 1:
        raise ValueError("the sweep's cells write to several OUTPUT_DIRs; a sweep has one")
    out = storage.path(cells[0].output_dir)
    storage.makedirs(out)
    results = out / "results.jsonl"
    # Multi-host: process 0 holds the lock, writes the shared files and reads which cells are done
    # for every process (all run the same cells in the same order).
    chief = partitioning.is_chief()
    with locking.hold_on_chief(out / ".sweep.lock", f"a sweep in {out}", take_over=take_over_lock):
        keys = [c.key() for c in cells]
        if chief:
            storage.clean_orphans(out)        # temporary files a kill left (the cells clean their caches)
            _write_state(out, config_gin, points, keys, log)
        done = partitioning.from_chief(
            lambda: {r.get("cell_key"): r for r in results_lib.read_rows(results, repair=True)})
        todo = [k for k in keys if k not in done]
        n = len(cells)
        log(f"sweep: {n} cells in {out}: {n - len(todo)} already finished, {len(todo)} to run")
        spent = sum(float(done[k].get("spent_total_usd") or 0.0) for k in keys if k in done)
        ran, timings = 0, []
        for i, (p, cell, key) in enumerate(zip(points, cells, keys), 1):
            if key in done:
                continue
            left = len(todo) - ran
            eta = sum(timings) / len(timings) * left if timings else None
            log(f"[cell {i}/{n}] {p.describe()} (key {key}) | spent so far ${spent:.2f} | "
                f"{left} to run, ETA {_fmt_seconds(eta)}")
            start = time.perf_counter()
            try:
                row = runner(cell)
            except Exception:
                log(f"[cell {i}/{n}] failed: {p.describe()}; finished cells are kept in {results}; "
                    f"rerun the same command to resume")
                raise
            timings.append(time.perf_counter() - start)
            done[key], ran = row, ran + 1
            spent += float(row.get("spent_total_usd") or 0.0)
            log(f"[cell {i}/{n}] {row.get('status', 'ok')}: {row.get('metric') or 'metric'} {_fmt_value(row)}, "
                f"spent ${float(row.get('spent_total_usd') or 0.0):.2f} in {timings[-1]:.0f} s"
                + (f" ({row['reason']})" if row.get("reason") else ""))
        rows = [done[k] for k in keys]
        log(summary_table(points, rows))
        note = stand_in_note(rows)
        if note:
            log(note)
        report_path = None
        if write_report and chief:
            report_path = report.write_report(out)
            log(f"report: {report_path}")
    return SweepResult(rows, ran, n - len(todo), report_path)


def _write_state(out: storage.AnyPath, config_gin: Optional[str], points: Sequence[Point], keys: list[str],
                 log: Callable[[str], None]) -> None:
    """OUTPUT_DIR/config.gin (when given) and OUTPUT_DIR/sweep.json (the cells and their keys)."""
    if config_gin is not None:
        storage.write_atomic(out / "config.gin", config_gin)
        log(f"sweep gin config: {out / 'config.gin'}")
    storage.write_atomic(out / STATE_FILE, json.dumps({"cells": [dict(dataclasses.asdict(p), cell_key=k)
                                                                 for p, k in zip(points, keys)]}, indent=1) + "\n")


def stand_in_note(rows: Sequence[Mapping[str, Any]]) -> Optional[str]:
    """What a sweep of stand-in models (run as one size, priced as another) can and cannot show."""
    pairs = sorted({f"{r[role]} as {r['priced_as'][role]}" for r in rows for role in ("teacher", "student")
                    if (r.get("priced_as") or {}).get(role) and r.get(role)})
    if not pairs:
        return None
    return (f"note: stand-in models ({', '.join(pairs)}): the dollars are those of the sizes they stand for, "
            "the metrics are these small models' own. A plumbing check of the pipeline and the prices, "
            "not the paper's numbers (the report marks them not comparable).")


def summary_table(points: Sequence[Point], rows: Sequence[Mapping[str, Any]]) -> str:
    header = (f"{'#':>3} {'task':<14} {'start':>6} {'extra $':>8} {'strategy':<9} {'seed':>4} {'status':<10} "
              f"{'metric':<9} {'value':>6} {'spent $':>9} {'wall s':>7}")
    lines = [header, "-" * len(header)]
    for i, (p, r) in enumerate(zip(points, rows), 1):
        lines.append(f"{i:>3} {p.task:<14} {p.start_labels:>6} {p.extra_budget_usd:>8g} {p.strategy:<9} "
                     f"{p.seed:>4} {r.get('status', 'ok'):<10} {str(r.get('metric') or ''):<9} "
                     f"{_fmt_value(r):>6} {float(r.get('spent_total_usd') or 0.0):>9.2f} "
                     f"{float(r.get('wall_seconds') or 0.0):>7.0f}")
    return "\n".join(lines)


__all__ = ["AXES", "Grid", "Point", "SweepResult", "cells_from_gin", "check_cells", "load_sweep",
           "run_sweep", "stand_in_note", "summary_table"]
