"""results.jsonl: one row schema, one reader and appender, one rule for a line torn by a kill."""
import dataclasses
import json

import pytest

from doa_jax.experiment import results, strategies
from doa_jax.experiment.report import read_results


def row(key="k1", **fields):
    base = dict(cell_key=key, task="wlp", strategy="annotate", start_labels=1000, extra_budget_usd=100.0, seed=0,
                student="t5_1_1_small", teacher="t5_1_1_xxl", metric="f1", status="ok", value=50.0)
    return results.ResultRow(**{**base, **fields})


def test_a_row_keeps_the_keys_readers_use():
    written = row().to_json()
    assert written["budget_usd"] == written["extra_budget_usd"] == 100.0
    assert written["key_version"] == results.KEY_VERSION
    assert set(results.REQUIRED) <= set(written)


def test_append_then_read_round_trips(tmp_path):
    path = tmp_path / "results.jsonl"
    results.append_row(path, row("a"))
    results.append_row(path, row("b", value=61.5))
    assert [r["cell_key"] for r in results.read_rows(path)] == ["a", "b"]
    assert results.finished(path)["b"]["value"] == 61.5


def test_a_torn_last_line_is_skipped_on_read_and_cut_before_the_next_append(tmp_path):
    path = tmp_path / "results.jsonl"
    results.append_row(path, row("a"))
    with open(path, "a") as f:
        f.write('{"cell_key": "b", "task": "wl')           # a kill mid-write
    assert [r["cell_key"] for r in results.read_rows(path)] == ["a"]
    assert [r["cell_key"] for r in read_results(path)] == ["a"]   # the report reads the same way
    results.append_row(path, row("c"))
    lines = path.read_text().splitlines()
    assert [json.loads(line)["cell_key"] for line in lines] == ["a", "c"]


def test_repair_cuts_the_torn_line_off_the_file(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps(row("a").to_json()) + "\n" + '{"cell')
    results.read_rows(path, repair=True)
    assert path.read_text().endswith("\n") and len(path.read_text().splitlines()) == 1


def test_a_bad_complete_line_names_the_file_and_line(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps(row("a").to_json()) + "\n" + "not json\n")
    with pytest.raises(ValueError, match=r"results.jsonl:2: not JSON"):
        results.read_rows(path)
    path.write_text(json.dumps({"cell_key": "x", "task": "wlp"}) + "\n")
    with pytest.raises(ValueError, match=r"results.jsonl:1: results row lacks strategy"):
        results.read_rows(path)


def test_rows_from_the_old_key_scheme_are_recognised_as_stale():
    old = {k: v for k, v in row("old").to_json().items() if k != "key_version"}
    assert results.stale_rows([old, row("new").to_json()]) == [old]


def test_paper_rows_without_the_released_references_are_superseded_and_say_so_on_the_next_run(tmp_path, capsys):
    from doa_jax.experiment import cell

    paper = dict(row("new").to_json(), protocol="paper")
    assert results.superseded_paper_rows([paper, dict(paper, references="tokenized"), row("eff").to_json()]) == [paper]
    (tmp_path / "results.jsonl").write_text(json.dumps(paper) + "\n")
    assert cell._finished_row(tmp_path / "results.jsonl", "other", warn=True) is None
    assert "1 PROTOCOL='paper' row(s) scored against the data's text" in capsys.readouterr().err


def test_the_strategy_table_says_what_each_strategy_does():
    ann, dist, mixed = (strategies.get(n) for n in ("annotate", "distill", "mixed"))
    assert (ann.buys_labels, ann.uses_teacher) == (True, False)
    assert (dist.buys_labels, dist.uses_teacher, dist.mixes_gold) == (False, True, False)
    assert mixed.buys_labels and mixed.uses_teacher and mixed.mixes_gold and mixed.splits_budget
    assert strategies.PAPER == ("annotate", "distill")
    with pytest.raises(ValueError, match="unknown strategy 'cheap'; strategies: annotate, distill, mixed"):
        strategies.get("cheap")
    assert dataclasses.is_dataclass(ann)


def test_a_run_directory_from_before_the_new_cell_keys_says_which_rows_are_stale(tmp_path, capsys):
    from doa_jax import gin_utils
    from doa_jax.experiment import run_cell

    old = {k: v for k, v in row("0123456789abcdef", task="demo").to_json().items() if k != "key_version"}
    (tmp_path / "results.jsonl").write_text(json.dumps(old) + "\n")
    gin_utils.parse(["runs/experiment.gin", "runs/demo_models.gin"],
                    ["STRATEGY = 'annotate'", "EXTRA_BUDGET_USD = 0", "START_LABELS = 0", f"OUTPUT_DIR = '{tmp_path}'",
                     "CellConfig.verbose = False"])
    new = run_cell(gin_utils.macro("CELL"))           # no labels at all: infeasible, but it runs
    err = capsys.readouterr().err
    assert "1 row(s) keyed by an older doa-jax (key version 1, now 2" in err and "run again under new keys" in err
    assert new["status"] == "infeasible" and new["cell_key"] != old["cell_key"]
    assert [r["cell_key"] for r in results.read_rows(tmp_path / "results.jsonl")] == [old["cell_key"], new["cell_key"]]


def test_a_cell_already_running_elsewhere_is_refused_with_its_holder(tmp_path):
    import subprocess
    import sys

    from doa_jax import gin_utils
    from doa_jax.experiment import locking, run_cell, task_setup

    gin_utils.parse(["runs/experiment.gin", "runs/demo_models.gin"],
                    ["STRATEGY = 'annotate'", "EXTRA_BUDGET_USD = 0", "START_LABELS = 0", f"OUTPUT_DIR = '{tmp_path}'",
                     "CellConfig.verbose = False"])
    cell = task_setup.resolve_models(gin_utils.macro("CELL"))    # keyed as run_cell keys it
    lock = tmp_path / "cells" / cell.key() / ".lock"
    lock.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); f.write('pid 4242 on elsewhere'); f.flush(); "
                               "print('locked', flush=True); time.sleep(60)", str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(locking.Busy, match=rf"cell {cell.key()} .* is being run by pid 4242 on elsewhere"):
            run_cell(cell)
        assert not (tmp_path / "results.jsonl").exists() or not results.read_rows(tmp_path / "results.jsonl")
    finally:
        holder.kill()
        holder.wait()
    assert run_cell(cell)["status"] == "infeasible"     # the lock died with its process


@pytest.mark.slow
def test_a_diverging_student_marks_its_row_diverged(tmp_path):
    from doa_jax import gin_utils
    from doa_jax.experiment import run_cell

    gin_utils.parse(["runs/experiment.gin", "runs/demo_models.gin"],
                    ["STRATEGY = 'annotate'", "EXTRA_BUDGET_USD = 1", "START_LABELS = 64", f"OUTPUT_DIR = '{tmp_path}'",
                     "LEARNING_RATE = 1e4", "STUDENT_EPOCHS = 3", "CellConfig.verbose = False", "cell/TrainConfig.log_every = 1",
                     "CellConfig.demo_sizes = {'labeled': 96, 'unlabeled': 32, 'test': 16}"])
    row = run_cell(gin_utils.macro("CELL"))
    assert row["status"] == "diverged" and "the student diverged at step" in row["reason"]
    assert not (tmp_path / "cache" / "students").exists()      # a broken run is never shared
