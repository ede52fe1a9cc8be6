"""Reports: summaries over seeds, the paper's numbers beside, Pareto frontier, plots written."""
import json

import pytest

from doa_jax.experiment import report


def row(strategy, budget, value, seed, spent, **extra):
    return {"task": "wlp", "start_labels": 1000, "extra_budget_usd": budget, "strategy": strategy,
            "student": "t5_1_1_small", "teacher": "t5_1_1_xxl", "metric": "f1", "value": value, "seed": seed,
            "spent_total_usd": spent, "spent_usd": {"labels": spent / 2, "student_training": spent / 2}, **extra}


ROWS = [row("annotate", 100, 50.0, 0, 360.0), row("annotate", 100, 52.0, 1, 360.0),
        row("distill", 100, 70.0, 0, 355.0), row("distill", 100, 72.0, 1, 357.0),
        row("distill", 200, 0.0, 0, 0.0, status="infeasible", reason="teacher fine-tune costs $210 > $200")]


def test_cells_average_over_seeds_and_carry_the_papers_number():
    cells = report.summarise(ROWS)
    ann = next(c for c in cells if c.strategy == "annotate")
    assert (ann.mean, round(ann.std, 4), ann.mean_spent) == (51.0, 1.4142, 360.0)
    assert report.paper_value(report.read_paper_results(), ann) == 50.0
    dist = next(c for c in cells if c.strategy == "distill" and c.extra_budget_usd == 100)
    assert report.paper_value(report.read_paper_results(), dist) == 71.1
    assert dist.usd_per_point == pytest.approx(356.0 / 71.0)


def test_infeasible_cells_keep_their_reason_and_no_value():
    cell = next(c for c in report.summarise(ROWS) if c.extra_budget_usd == 200)
    assert cell.values == [] and cell.infeasible == ["teacher fine-tune costs $210 > $200"]


def test_pareto_frontier_drops_dominated_points():
    pts = [(10, 50), (12, 49), (15, 60), (15, 55), (20, 58), (30, 70)]
    assert report.pareto_frontier(pts) == [(10, 50), (15, 60), (30, 70)]


def test_paper_table_has_48_main_cells_per_strategy():
    main = [r for r in report.read_paper_results() if r["table"] == "main"]
    assert len(main) == 96 and {r["strategy"] for r in main} == {"annotate", "distill"}


def test_write_report_renders_tables_and_plots(tmp_path):
    (tmp_path / "results.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    md = report.write_report(tmp_path).read_text()
    assert "| wlp | 1000 | 100 | Ann. | f1 | 51.0 ± 1.4 | 2 | 50.0 |" in md
    assert "teacher fine-tune costs $210 > $200" in md
    for name in ("wlp_cost_vs_metric.png", "wlp_budget_bars.png"):
        png = tmp_path / "plots" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_a_bad_results_line_names_file_and_line(tmp_path):
    (tmp_path / "results.jsonl").write_text(json.dumps(ROWS[0]) + "\n{broken\n")
    with pytest.raises(ValueError, match=r"results.jsonl:2: not JSON"):
        report.write_report(tmp_path)
