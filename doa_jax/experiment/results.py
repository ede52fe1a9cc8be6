"""`results.jsonl`: one row per finished cell, one schema, one reader and one appender.

The torn-line rule, the same for every reader: a last line without its newline is a write cut
short by a kill. Readers skip it; the appender (and `read_rows(repair=True)`, under a lock) cuts it
off the file first, so the cell reruns and the next row starts on a line of its own. Any other
line that is not a results row is an error naming the file and line. On an object store (gs://)
each row is an object of its own (`doa_jax.storage.append_line`), so no row is ever torn.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

from doa_jax import storage
from doa_jax.data import jsonl

RESULTS_FILE = "results.jsonl"
SWEEP_STATE_FILE = "sweep.json"   # a sweep's cells, in grid order, with their keys
# Rows written before the experiment layer was rebuilt have no `key_version`: their cell keys
# hashed a flat config, so the same cell now has another key and runs again (see `stale_rows`).
KEY_VERSION = 2
# Paper rows scored against the released code's references (`vocab.released_references`) say so; those
# written before (2026-12-06) scored against the data's text, and their cells run again under new keys.
PAPER_REFERENCES = "tokenized"
REQUIRED = ("task", "strategy", "extra_budget_usd", "metric", "value")


@dataclasses.dataclass
class ResultRow:
    """One cell's outcome. `value` is the task's primary metric (percent); `status` is `ok`,
    `capped` (the budget stopped the student early), `diverged` (training blew up; `value` is of the
    broken model) or `infeasible` (with `reason`)."""

    cell_key: str
    task: str
    strategy: str
    start_labels: int
    extra_budget_usd: float
    seed: int
    student: str
    teacher: str
    metric: Optional[str]
    status: str
    reason: str = ""
    value: Optional[float] = None
    compute_share: Optional[float] = None
    priced_as: Optional[dict[str, Optional[str]]] = None
    accelerator: str = ""
    mfu: Optional[float] = None
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    spent_usd: dict[str, float] = dataclasses.field(default_factory=dict)
    spent_total_usd: Optional[float] = None
    measured_usd: Optional[float] = None
    labels_used: Optional[int] = None
    labels_bought: Optional[int] = None
    unlabeled_used: Optional[int] = None
    pseudo_labels_kept: Optional[int] = None
    student_steps: Optional[int] = None
    plan: Optional[dict[str, Any]] = None
    test_examples: Optional[int] = None
    output: Optional[str] = None
    wall_seconds: Optional[float] = None
    student_trained_by: Optional[str] = None   # another cell with the same plan trained this student
    cost_profile: Optional[dict[str, Any]] = None   # what priced the compute: name, source, assumed, ...
    protocol: Optional[str] = None   # 'efficient' | 'paper' (rows written before protocols: None = efficient)
    references: Optional[str] = None   # paper rows: PAPER_REFERENCES (what their outputs were scored against)
    teacher_given: Optional[str] = None   # TEACHER_FINETUNED: the checkpoint of a teacher fine-tuned elsewhere (T5X)
    key_version: int = KEY_VERSION

    def to_json(self) -> dict[str, Any]:
        row = dataclasses.asdict(self)
        row["budget_usd"] = self.extra_budget_usd   # older readers' name for the extra budget
        return row


def _lines(data: bytes) -> tuple[list[str], int]:
    """Complete lines, and the byte offset where a torn last line starts (len(data) if none)."""
    cut = len(data) if not data or data.endswith(b"\n") else data.rfind(b"\n") + 1
    return data[:cut].decode("utf-8", errors="strict").splitlines(), cut


def read_rows(path: str | os.PathLike, *, repair: bool = False) -> list[dict[str, Any]]:
    """The rows of a results file, in order ([] when it does not exist); see the torn-line rule."""
    path = os.fspath(path)
    data = storage.read_appended(path)
    if not data:
        return []
    try:
        lines, cut = _lines(data)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None
    if repair and cut < len(data):
        storage.cut_torn_line(path)
    rows = []
    for lineno, row in jsonl.parse_lines(lines, str(path)):
        missing = [k for k in REQUIRED if not isinstance(row, dict) or k not in row]
        if missing:
            raise ValueError(f"{path}:{lineno}: results row lacks {', '.join(missing)}")
        rows.append(row)
    return rows


def finished(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Rows by cell key (the last row of a key wins)."""
    return {row["cell_key"]: row for row in read_rows(path) if "cell_key" in row}


def stale_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows whose cell keys were made by an older key scheme (their cells will run again)."""
    return [r for r in rows if "cell_key" in r and r.get("key_version", 1) != KEY_VERSION]


def is_superseded_paper_row(row: dict[str, Any]) -> bool:
    """A paper row scored against the data's text instead of the released code's references: its cell runs
    again under a new key, and reports leave it out (it would be averaged with its rerun)."""
    return row.get("protocol") == "paper" and row.get("references") != PAPER_REFERENCES


def superseded_paper_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of `rows` that `is_superseded_paper_row`."""
    return [r for r in rows if is_superseded_paper_row(r)]


def append_row(path: str | os.PathLike, row: ResultRow | dict[str, Any]) -> None:
    """Appends one row durably, first cutting a torn last line back to its newline."""
    payload = row.to_json() if isinstance(row, ResultRow) else row
    storage.append_line(path, json.dumps(payload))
