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



def test_marginal_dollars_per_point_is_the_next_budget_steps_cost_per_point_gained():
    rows = ROWS[:4] + [row("annotate", 200, 55.0, 0, 460.0), row("distill", 200, 70.0, 0, 455.0)]
    cells = report.summarise(rows)
    by = {(c.strategy, c.extra_budget_usd): c for c in cells}
    marginal = report.marginal_usd_per_point(cells)
    assert marginal[id(by[("annotate", 200.0)])] == "25.00"          # ($460 - $360) / (55 - 51) points
    assert marginal[id(by[("distill", 200.0)])] == "no gain (-1.0)"  # 70 after 71 on average
    assert id(by[("annotate", 100.0)]) not in marginal                # no smaller budget to compare with


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
    assert "| wlp | 1000 | 100 | Ann. | efficient | mfu (ASSUMED) | f1 | 51.0 ± 1.4 [50.0, 52.0] | 2 | 50.0 (not comparable) |" in md
    assert "teacher fine-tune costs $210 > $200" in md
    for name in ("wlp_cost_vs_metric.png", "wlp_budget_bars.png"):
        png = tmp_path / "plots" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_two_arms_that_both_scored_zero_are_no_answer_not_a_tie():
    zeros = [row("annotate", 100, 0.0, 0, 360.0), row("distill", 100, 0.0, 0, 0.02)]
    md = report.render_markdown(report.summarise(zeros), report.read_paper_results(), [])
    assert "| wlp | 1000 | 100 | no answer: both arms scored 0 (nothing learned) | Dist. by 21.1 |" in md
    assert "tie" not in md.split("## Ann. vs Dist.")[1].split("##")[0]


def test_a_bad_results_line_names_file_and_line(tmp_path):
    (tmp_path / "results.jsonl").write_text(json.dumps(ROWS[0]) + "\n{broken\n")
    with pytest.raises(ValueError, match=r"results.jsonl:2: not JSON"):
        report.write_report(tmp_path)


PAPER_ROW = dict(protocol="paper", references="tokenized",
                 cost_profile={"name": "paper", "source": "the paper's GPU-hours"})


def _verdict(rows):
    cell = report.summarise(rows)[0]
    return report.paper_comparison(report.read_paper_results(), cell)


def test_a_row_under_the_papers_protocol_models_data_and_cost_profile_is_comparable():
    assert _verdict([row("distill", 100, 70.0, 0, 355.0, **PAPER_ROW)]) == (71.1, [])


def test_an_efficient_row_before_cost_profiles_is_not_comparable_for_protocol_and_profile():
    value, reasons = _verdict([row("distill", 100, 70.0, 0, 355.0)])
    assert value == 71.1 and reasons == [
        "protocol efficient (paper: the released code's; run with protocols/paper.gin)",
        "cost profile mfu (paper: the paper's own)"]


def test_stand_in_models_priced_as_the_papers_are_not_comparable():
    stand_in = row("distill", 100, 70.0, 0, 355.0, student="tiny", teacher="tiny",
                   priced_as={"student": "small", "teacher": "xxl"}, **PAPER_ROW)
    value, reasons = _verdict([stand_in])
    assert value == 71.1 and reasons == ["models tiny as xxl ⇒ tiny as small (paper: xxl ⇒ small)"]


def test_a_task_carved_from_the_papers_evaluation_file_is_not_comparable():
    fever = dict(row("annotate", 50, 80.0, 0, 50.0, **PAPER_ROW), task="fever", metric="accuracy")
    value, reasons = _verdict([fever])
    assert value is not None and reasons == [
        "data: test, train and unlabeled carved from fever_dev_all.json (the paper's training file and unlabeled "
        "pool for fever are not released)"]


def test_rows_of_the_two_protocols_are_separate_cells_and_the_report_says_which_compare(tmp_path):
    rows = [row("distill", 100, 70.0, 0, 355.0, **PAPER_ROW), row("distill", 100, 60.0, 0, 355.0)]
    (tmp_path / "results.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    md = report.write_report(tmp_path).read_text()
    assert "| wlp | 1000 | 100 | Dist. | paper | paper | f1 | 70.0 | 1 | 71.1 |" in md
    assert "| wlp | 1000 | 100 | Dist. | efficient | mfu (ASSUMED) | f1 | 60.0 | 1 | 71.1 (not comparable) |" in md
    assert "| wlp | 1000 | 100 | Dist. | paper | 71.1 | comparable |" in md
    assert ("| wlp | 1000 | 100 | Dist. | efficient | 71.1 | not comparable: protocol efficient (paper: the "
            "released code's; run with protocols/paper.gin); cost profile mfu (paper: the paper's own) |") in md


def test_paper_rows_scored_against_the_datas_text_are_left_out_of_the_report_and_said(tmp_path, capsys):
    # Written before paper cells scored the released code's references: their cells ran again under new keys.
    old = {k: v for k, v in row("distill", 100, 50.0, 0, 355.0, **PAPER_ROW).items() if k != "references"}
    rows = [old, row("distill", 100, 70.0, 0, 355.0, **PAPER_ROW)]
    (tmp_path / "results.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    md = report.write_report(tmp_path).read_text()
    assert "| wlp | 1000 | 100 | Dist. | paper | paper | f1 | 70.0 | 1 | 71.1 |" in md
    assert "the report leaves out 1 PROTOCOL='paper' row(s)" in capsys.readouterr().err
    (tmp_path / "results.jsonl").write_text(json.dumps(old) + "\n")
    with pytest.raises(ValueError, match="has no result rows left"):
        report.write_report(tmp_path)


def _cell_with_predictions(tmp_path, name, predictions, references):
    out = tmp_path / name
    out.mkdir()
    (out / "predictions.jsonl").write_text("".join(
        json.dumps({"id": i, "prediction": p, "source": "", "target": r}) + "\n"
        for i, (p, r) in enumerate(zip(predictions, references))))
    value = 100.0 * sum(p == r for p, r in zip(predictions, references)) / len(references)
    return dict(row("annotate", 50, value, 0, 50.0), task="fever", metric="accuracy", output=str(out))


def test_bootstrap_over_test_examples_brackets_the_metric_and_tells_close_arms_apart_or_not(tmp_path):
    refs = ["SUPPORTS", "REFUTES"] * 50
    good = _cell_with_predictions(tmp_path, "good", refs[:90] + ["maybe"] * 10, refs)        # 90%
    close = _cell_with_predictions(tmp_path, "close", refs[:88] + ["maybe"] * 12, refs)      # 88%
    bad = _cell_with_predictions(tmp_path, "bad", refs[:40] + ["maybe"] * 60, refs)          # 40%
    cells = [report.summarise([r])[0] for r in (good, close, bad)]
    for c in cells:
        c.interval = report.bootstrap(c)
    g, c_, b = cells
    assert g.interval[0] < 90.0 < g.interval[1] and g.interval[1] - g.interval[0] > 5   # n = 100: wide
    assert report.distinguishable(g, c_) is False and report.distinguishable(g, b) is True


def test_one_seed_without_per_example_predictions_has_no_interval():
    assert report.bootstrap(report.summarise([row("annotate", 100, 50.0, 0, 360.0)])[0]) is None


def _perturbed(task, target, i):
    """A model-like prediction for a real reference: WLP drops its last entity (every other one) or
    retypes its first (every fourth); Stanceosaurus answers the wrong label (every fourth) or no label
    (every seventh)."""
    if task == "wlp":
        words = target.split()
        tags = [j for j, w in enumerate(words) if w.startswith("[")]
        if i % 2 == 0 and len(tags) > 1:
            words = words[: tags[-2] + 1]
        elif i % 4 == 1 and tags:
            words[tags[0]] = "[Reagent]" if words[tags[0]] != "[Reagent]" else "[Action]"
        return " ".join(words)
    return "Querying" if i % 4 == 0 and target != "Querying" else ("maybe" if i % 7 == 0 else target)


@pytest.mark.parametrize("task, path, metric, protocol", [
    ("wlp", "wlp/wlp_test_all.jsonl", "f1", "efficient"), ("wlp", "wlp/wlp_test_all.jsonl", "f1", "paper"),
    ("stanceosaurus", "stanceosaurus/stanceosaurus_test_all.jsonl", "macro_f1", "efficient")])
def test_the_bootstrap_from_example_statistics_equals_rescoring_every_resample(tmp_path, doa_data, monkeypatch,
                                                                                task, path, metric, protocol):
    from doa_jax.data import cards

    lines = (doa_data / path).read_text().splitlines()[:80]
    refs = [json.loads(line)["target"] for line in lines]
    out = tmp_path / "cell"
    out.mkdir()
    (out / "predictions.jsonl").write_text("".join(
        json.dumps({"id": i, "prediction": _perturbed(task, r, i), "source": "", "target": r}) + "\n"
        for i, r in enumerate(refs)))
    value = cards.load_card(task).score([_perturbed(task, r, i) for i, r in enumerate(refs)], refs,
                                        protocol=protocol)[metric]
    cell = report.summarise([dict(row("annotate", 50, value, 0, 50.0), task=task, metric=metric,
                                  protocol=protocol, output=str(out))])[0]
    fast = report.bootstrap(cell, resamples=100)
    monkeypatch.setattr(cards.Card, "example_statistics", lambda self, *args, **kwargs: None)
    rescored = report.bootstrap(cell, resamples=100)
    assert fast == rescored and fast[0] < value < fast[1] and value < 95


def test_a_paper_priced_row_of_a_task_outside_the_fit_is_labelled_an_extrapolation():
    fit = {"status": "extrapolation", "expected_error": {"median": 0.046, "max": 0.167}, "note": "EXTRAPOLATION: ..."}
    extrapolated = row("distill", 100, 70.0, 0, 355.0, cost_profile={"name": "paper", "source": "s", "fit": fit})
    md = report.render_markdown(report.summarise([extrapolated]), report.read_paper_results(), [])
    assert "| wlp | 1000 | 100 | Dist. | efficient | paper (extrapolated, ±5% (up to 17%)) | f1 | 70.0 |" in md
    fitted = dict(extrapolated, cost_profile={"name": "paper", "source": "s", "fit": {**fit, "status": "fitted"}})
    assert "extrapolated" not in report.render_markdown(report.summarise([fitted]), report.read_paper_results(), [])
