"""The paper's numbers beside a cell: its published rows (`paper_results.csv`, transcribed from the
authors' poster), the row that matches a cell, whether it is comparable and why not, and which arm
wins each budget here and in the paper."""
from __future__ import annotations

import collections
import csv
import os
import pathlib
from typing import Any, Optional

from doa_jax.data import cards
from doa_jax.experiment import strategies
from doa_jax.experiment.report.intervals import distinguishable
from doa_jax.experiment.report.summary import Cell

PAPER_RESULTS = pathlib.Path(__file__).parents[1] / "paper_results.csv"
# The paper's models: its main results distill T5 v1.1 XXL into T5 v1.1 Small.
PAPER_STUDENT, PAPER_TEACHER = "t5_1_1_small", "t5_1_1_xxl"



def read_paper_results(path: str | os.PathLike = PAPER_RESULTS) -> list[dict[str, Any]]:
    with open(path, newline="") as f:
        lines = [line for line in f if not line.startswith("#")]
    rows = []
    for row in csv.DictReader(lines):
        row["value"] = float(row["value"])
        row["start_labels"] = int(row["start_labels"])
        for key in ("extra_budget_usd", "total_budget_usd"):
            row[key] = float(row[key]) if row[key] else None
        rows.append(row)
    return rows


def paper_match(paper: list[dict], cell: Cell) -> Optional[dict]:
    """The paper's row for a cell: its main results (T5 v1.1 XXL ⇒ Small) by extra budget, else its
    student- or teacher-size tables by total budget (start labels' cost + extra). Stand-in models
    match the sizes they are priced as; main results also match other models (not comparable)."""
    if not cell.kind.in_paper:
        return None
    return (_paper_row(paper, cell, cell.as_student, cell.as_teacher)
            or _paper_row(paper, cell, PAPER_STUDENT, PAPER_TEACHER if cell.kind.uses_teacher else "", main_only=True))


def _paper_row(paper: list[dict], cell: Cell, student: str, teacher: str, main_only: bool = False) -> Optional[dict]:
    start_usd = cell.start_usd
    for p in paper:
        if not (p["task"] == cell.task and p["start_labels"] == cell.start_labels and p["strategy"] == cell.strategy
                and p["student"] == student and (p["teacher"] or "") == teacher):
            continue
        if main_only and p["table"] != "main":
            continue
        if p["table"] == "main" and p["extra_budget_usd"] == cell.extra_budget_usd:
            return p
        if (p["table"] != "main" and start_usd is not None and p["total_budget_usd"] is not None
                and abs(start_usd + cell.extra_budget_usd - p["total_budget_usd"]) < 0.5):
            return p
    return None


def paper_value(paper: list[dict], cell: Cell) -> Optional[float]:
    """The paper's number for a cell, if it has one (see `paper_match`; comparable or not)."""
    match = paper_match(paper, cell)
    return None if match is None else match["value"]


# The paper's metric name -> the row metrics it is (the paper's "F1" of Stanceosaurus is read as
# macro F1, the card's primary metric; its poster does not say macro or micro).
PAPER_METRICS = {"f1": ("f1", "macro_f1"), "accuracy": ("accuracy",), "bert_ibleu": ("bert_ibleu",)}


def data_reason(task: str) -> Optional[str]:
    """Why a task's splits are not the paper's, or None: a test split carved out of another file."""
    try:
        card = cards.load_card(task)
    except (FileNotFoundError, ValueError):
        return f"no task card {task!r} to check its data"
    if "test" in card.pool_fractions:
        return (f"data: test, train and unlabeled carved from {card.files[card.carve_from]} (the paper's training "
                f"file and unlabeled pool for {card.name} are not released)")
    return None


def comparability(cell: Cell, match: dict) -> list[str]:
    """Why the paper's number `match` is not comparable with `cell` ([] when it is)."""
    reasons = []
    if cell.protocol != "paper":
        reasons.append(f"protocol {cell.protocol} (paper: the released code's; run with protocols/paper.gin)")
    if cell.metric not in PAPER_METRICS.get(match["metric"], (match["metric"],)):
        reasons.append(f"metric {cell.metric} (paper: {match['metric']})")
    teacher = cell.teacher if cell.kind.uses_teacher else ""
    if (cell.student, teacher) != (match["student"], match["teacher"] or ""):
        paper_models = " ⇒ ".join(m.replace("t5_1_1_", "") for m in (match["teacher"], match["student"]) if m)
        reasons.append(f"models {cell.models} (paper: {paper_models})")
    data = data_reason(cell.task)
    if data:
        reasons.append(data)
    if cell.cost_profile != "paper":
        reasons.append(f"cost profile {cell.cost_profile} (paper: the paper's own)")
    return reasons


def paper_comparison(paper: list[dict], cell: Cell) -> tuple[Optional[float], list[str]]:
    """(the paper's number or None, reasons it is not comparable: [] = comparable)."""
    match = paper_match(paper, cell)
    return (None, []) if match is None else (match["value"], comparability(cell, match))


def winners(cells: list[Cell], paper: list[dict]) -> list[dict[str, Any]]:
    """Per task, start and extra budget with both Ann. and Dist.: which wins here and in the paper."""
    out = []
    by = collections.defaultdict(dict)
    for c in cells:
        if c.kind.in_paper:
            by[(c.task, c.start_labels, c.extra_budget_usd)].setdefault(c.strategy, c)
    for (task, start, extra), pair in sorted(by.items()):
        if len(pair) < 2:
            continue
        ann, dist = (pair[name] for name in strategies.PAPER)
        row = {"task": task, "start_labels": start, "extra_budget_usd": extra, "mine": None, "paper": None}
        if ann.values and dist.values:
            row["mine"] = dist.mean - ann.mean
            row["distinguishable"] = distinguishable(ann, dist)
            row["nothing_learned"] = ann.mean == 0 and dist.mean == 0
        pa, pd = paper_value(paper, ann), paper_value(paper, dist)
        if pa is not None and pd is not None:
            row["paper"] = pd - pa
        out.append(row)
    return out

