"""`doa report RUN_DIR`: report.md and plots for runs over several tasks, strategies (mixed too) and
seeds, the paper's numbers beside where a cell matches (main results, student- and teacher-size
tables, stand-in models priced as the paper's), sweep progress, and one clear message on bad input."""
import json

import pytest

from doa_jax import cli
from doa_jax.experiment import report

PNG = b"\x89PNG\r\n\x1a\n"


def row(task, strategy, budget, value, seed, spent, *, start=1000, metric="f1", student="t5_1_1_small",
        teacher="t5_1_1_xxl", **extra):
    return {"cell_key": f"{task}-{start}-{strategy}-{budget}-{seed}-{student}-{teacher}-{extra.get('compute_share')}",
            "task": task, "start_labels": start, "extra_budget_usd": budget, "strategy": strategy, "student": student,
            "teacher": teacher, "metric": metric, "value": value, "seed": seed, "status": "ok",
            "spent_total_usd": spent, "measured_usd": 0.004,
            "spent_usd": {"labels": spent if strategy == "annotate" else 0.0,
                          "teacher_finetune": 0.0 if strategy == "annotate" else spent * 0.25,
                          "teacher_inference": 0.0 if strategy == "annotate" else spent * 0.5,
                          "student_training": 0.0 if strategy == "annotate" else spent * 0.25},
            "accelerator": "a100", "mfu": 0.4, **extra}


ROWS = [
    row("wlp", "annotate", 100, 40.0, 0, 99.0), row("wlp", "annotate", 100, 44.0, 1, 99.0),
    row("wlp", "distill", 100, 60.0, 0, 80.0), row("wlp", "distill", 100, 64.0, 1, 84.0, status="capped",
                                                  reason="budget reached at student step 7"),
    row("wlp", "mixed", 100, 55.0, 0, 95.0, compute_share=0.5),
    row("fever", "annotate", 50, 48.0, 0, 49.0, metric="accuracy"),
    row("fever", "distill", 50, None, 0, 0.0, metric="accuracy", status="infeasible",
        reason="the teacher's fine-tuning reached the budget at step 3"),
]


def write_rows(path, rows):
    path.mkdir(parents=True, exist_ok=True)
    (path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_report_command_writes_report_and_plots_per_task_and_prints_the_path(tmp_path, capsys):
    write_rows(tmp_path, ROWS)
    assert cli.main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"report: {tmp_path / 'report.md'}" in out
    for task in ("wlp", "fever"):
        for kind in ("cost_vs_metric", "budget_bars"):
            png = tmp_path / "plots" / f"{task}_{kind}.png"
            assert png.read_bytes()[:8] == PNG and str(png) in out


def test_seeds_strategies_and_mixed_share_each_get_a_row_with_the_papers_number(tmp_path):
    write_rows(tmp_path, ROWS)
    md = report.write_report(tmp_path).read_text()
    # mean ± std over seeds, n, paper, spent, total = $260 of starting labels (1000 x $0.26) + spent
    # (no smaller budget of the same arm: no marginal $ / point)
    assert ("| wlp | 1000 | 100 | Ann. | efficient | mfu (ASSUMED) | f1 | 42.0 ± 2.8 [40.0, 44.0] | 2 | 50.0 (not comparable) | 99.00 | 359.00 "
            "|  | small |") in md
    assert "| wlp | 1000 | 100 | Dist. | efficient | mfu (ASSUMED) | f1 | 62.0 ± 2.8 [60.0, 64.0] | 2 | 71.1 (not comparable) | 82.00 | 342.00 |" in md
    assert "| wlp | 1000 | 100 | Mixed (50% compute) | efficient | mfu (ASSUMED) | f1 | 55.0 | 1 |  |" in md   # no mixed arm in the paper
    assert "1/2 stopped at the budget cap" in md
    assert "| fever | 1000 | 50 | Dist. | efficient | mfu (ASSUMED) | accuracy | infeasible | 0 | 71.3 (not comparable) |" in md
    assert "the teacher's fine-tuning reached the budget at step 3" in md


def test_ann_vs_dist_table_gives_the_winner_here_and_in_the_paper(tmp_path):
    write_rows(tmp_path, ROWS)
    md = report.write_report(tmp_path).read_text()
    assert "| wlp | 1000 | 100 | Dist. by 20.0 | Dist. by 21.1 |" in md       # 62 - 42; paper 71.1 - 50.0
    assert "| fever | 1000 | 50 | n/a | Dist. by 21.6 |" in md                # 71.3 - 49.7


def test_cost_breakdown_has_each_phase_and_the_measured_view(tmp_path):
    write_rows(tmp_path, ROWS)
    md = report.write_report(tmp_path).read_text()
    assert "| wlp | 1000 | 100 | Dist. | 0.00 | 20.50 | 41.00 | 20.50 | 0.00 | 82.00 | 0.004 |" in md


def test_student_and_teacher_size_tables_match_by_total_budget(tmp_path):
    rows = [row("wlp", "annotate", 300, 65.0, 0, 300.0, student="t5_1_1_base"),        # $260 + $300 = $560
            row("wlp", "distill", 200, 66.0, 0, 150.0, teacher="t5_1_1_xl")]           # $260 + $200 = $460
    cells = report.summarise(rows)
    paper = report.read_paper_results()
    assert {(c.strategy, report.paper_value(paper, c)) for c in cells} == {("annotate", 69.9), ("distill", 69.6)}


def test_stand_in_and_other_models_get_the_papers_main_number_marked_not_comparable(tmp_path):
    priced = row("wlp", "distill", 100, 1.0, 0, 5.0, student="t5_1_1_tiny", teacher="t5_1_1_tiny",
                 priced_as={"teacher": "xxl", "student": "small"})
    plain = row("wlp", "distill", 100, 1.0, 0, 5.0, student="t5_1_1_tiny", teacher="t5_1_1_tiny")
    paper = report.read_paper_results()
    cells = report.summarise([priced, plain])
    got = {c.models: report.paper_comparison(paper, c) for c in cells}
    assert got["tiny as xxl ⇒ tiny as small"][0] == got["tiny ⇒ tiny"][0] == 71.1
    assert "models tiny as xxl ⇒ tiny as small (paper: xxl ⇒ small)" in got["tiny as xxl ⇒ tiny as small"][1]
    assert "models tiny ⇒ tiny (paper: xxl ⇒ small)" in got["tiny ⇒ tiny"][1]


def test_rows_of_different_configs_in_one_cell_are_flagged(tmp_path):
    rows = [row("wlp", "annotate", 100, 40.0, 0, 99.0),
            dict(row("wlp", "annotate", 100, 30.0, 0, 99.0), cell_key="other")]
    write_rows(tmp_path, rows)
    md = report.write_report(tmp_path).read_text()
    assert "| 35.0 ± 7.1 [30.0, 40.0] | 2 |" in md and "1 row(s) repeat a seed: results of different configs are averaged" in md


def test_a_sweeps_report_says_how_many_cells_have_a_result(tmp_path):
    write_rows(tmp_path, ROWS[:3])
    keys = [r["cell_key"] for r in ROWS[:4]]
    (tmp_path / "sweep.json").write_text(json.dumps({"cells": [{"cell_key": k} for k in keys]}))
    md = report.write_report(tmp_path).read_text()
    assert "Sweep progress: 3 of 4 cells have a result; rerun the same `doa sweep` command to run the other 1." in md


@pytest.mark.parametrize("setup,message", [
    (lambda d: None, "is not a directory"),
    (lambda d: d.mkdir(), "no results file at"),
    (lambda d: (d.mkdir(), (d / "results.jsonl").write_text("")), "has no result rows"),
    (lambda d: (d.mkdir(), (d / "results.jsonl").write_text('{"task": "wlp"}\n')),
     "results.jsonl:1: results row lacks"),
])
def test_bad_run_dir_is_one_clear_message(tmp_path, capsys, setup, message):
    run_dir = tmp_path / "run"
    setup(run_dir)
    assert cli.main(["report", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
