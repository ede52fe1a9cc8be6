"""`doa advise`: curves fitted to pilots, options priced, a recommendation with its odds; bad input refused."""
import json

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.collections import PolyCollection

from conftest import load_script
from doa_jax import cli
from doa_jax.commands import advise as advise_cmd
from doa_jax.experiment import advise



def linear_pricing(per_label=0.5, per_label_compute=0.01, per_input=0.001) -> advise.Pricing:
    """The paper's shape of prices: labels, plus compute = alpha L + beta U when a teacher runs."""
    return advise.Pricing(advise.LinearPrices(per_label, per_label_compute, per_input), "test", "linear test prices")


def synthetic_pilots(ann=(80.0, 60.0, 0.5), dist=(90.0, 400.0), L=1000, noise=0.0, seed=0):
    """Pilots on known curves: annotate at 5 label counts, distill (teacher on L labels) at 3 U."""
    rng = np.random.default_rng(seed)
    a, b, c = ann
    pilots = [advise.Pilot("annotate", n, 0, a - b * n ** -c + noise * rng.standard_normal())
              for n in (100, 300, 1000, 3000, 10000)]
    pilots += [advise.Pilot("distill", L, u, dist[0] - dist[1] * u ** -c + noise * rng.standard_normal())
               for u in (3000, 10000, 30000)]
    return pilots


def write_lines(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_fit_recovers_the_curves_that_made_the_pilots():
    fit = advise.fit_curves(synthetic_pilots(), 1000, n_boot=200)
    a, b, c = fit.annotate
    assert a == pytest.approx(80.0, abs=0.5) and b == pytest.approx(60.0, rel=0.05) and c == pytest.approx(0.5, rel=0.05)
    assert fit.distill == pytest.approx([90.0, 400.0], rel=0.01)
    assert fit.sigma < 0.05


def test_noisier_pilots_give_wider_intervals():
    def width(noise):
        fit = advise.fit_curves(synthetic_pilots(noise=noise, seed=3), 1000, n_boot=500)
        o = advise.plan_options(linear_pricing(), 1000, 100.0, strategies_=("annotate",))
        return advise.recommend(fit, o, task="t", metric="m", budget=100.0, cost_profile="test").recommended.interval
    narrow, wide = width(0.2), width(2.0)
    assert (wide[1] - wide[0]) > 3 * (narrow[1] - narrow[0])


def test_distill_on_a_higher_ceiling_is_recommended_with_high_odds():
    a = advise.advise(synthetic_pilots(noise=0.3), linear_pricing(), task="t", metric="m", start_labels=1000,
                      budget=100.0, strategies_=("annotate", "distill"), n_boot=500)
    opts = {o.strategy: o for o in a.options}
    assert opts["annotate"].labels_bought == 200            # $100 at $0.50 a label
    assert opts["distill"].unlabeled == 90000               # ($100 - 1000 x $0.01) / $0.001
    assert a.recommended.strategy == "distill" and a.p_best > 0.95 and not a.cannot_tell_apart
    assert a.runner_up.strategy == "annotate"
    lo, hi = a.recommended.interval
    assert lo < a.recommended.expected < hi


def test_equal_curves_cannot_be_told_apart():
    # Distillation's curve is the annotation curve itself: both options predict about the same.
    pilots = synthetic_pilots(dist=(80.0, 60.0), noise=1.0, seed=1)
    pricing = linear_pricing(per_label=0.001, per_label_compute=0.0, per_input=0.001)
    a = advise.advise(pilots, pricing, task="t", metric="m", start_labels=1000, budget=10.0,
                      strategies_=("annotate", "distill"), n_boot=500)
    assert a.cannot_tell_apart and a.p_best < 0.8
    assert a.verdict().startswith("cannot tell apart: ")


def test_mixed_share_buys_labels_with_the_rest_of_the_budget():
    opts = advise.plan_options(linear_pricing(), 1000, 100.0, shares=(0.25,), strategies_=("mixed",))
    (mixed,) = opts
    assert mixed.labels_bought == 150 and mixed.compute_share == 0.25     # $75 of labels at $0.50
    assert mixed.unlabeled == 13500                                        # $25 - 1150 x $0.01, at $0.001


def test_pools_cap_what_the_budget_buys():
    opts = {o.strategy: o for o in advise.plan_options(linear_pricing(), 200, 100.0, strategies_=("annotate", "distill"),
                                                       label_pool=250, unlabeled_pool=512)}
    assert opts["annotate"].labels_bought == 50 and opts["distill"].unlabeled == 512


def test_paper_pricing_reproduces_the_papers_compute_dollars_within_25_percent():
    for row in advise.read_pareto():
        if row["unlabeled"] == 0:
            continue
        p = advise.paper_pricing(row["task"])
        compute = p.extra("distill", row["labels"], row["labels"], row["unlabeled"])
        assert compute == pytest.approx(row["compute_usd"], rel=0.25), row


def test_paper_pricing_keeps_the_papers_infeasible_cell_infeasible():
    # NQ, 10K labels, +$50: the paper could not distil (the teacher's fine-tuning alone costs more).
    opts = {o.strategy: o for o in advise.plan_options(advise.paper_pricing("nq"), 10000, 50.0,
                                                       strategies_=("annotate", "distill"))}
    assert not opts["distill"].feasible and "teacher's fine-tuning on 10000 labels" in opts["distill"].reason
    assert opts["annotate"].labels_bought == 387


def test_the_papers_pareto_points_predict_the_papers_winner_in_16_of_16_main_cells():
    cells = load_script("advise_vs_paper").compare((1000,))
    assert len(cells) == 16
    assert [c for c in cells if not c["match"]] == []
    # Where the paper's gap is smallest, the advice says it cannot be sure (P < 0.8).
    unsure = sorted((c["task"], c["budget_usd"]) for c in cells if c["cannot_tell_apart"])
    assert unsure == [("multipit_gen", 100.0), ("multipit_gen", 150.0)]


def test_rows_of_a_run_directory_become_pilots():
    rows = [{"task": "t", "strategy": "annotate", "status": "ok", "value": 40.0, "labels_used": 100, "metric": "f1",
             "spent_usd": {"labels": 26.0, "student_training": 0.5}},
            {"task": "t", "strategy": "distill", "status": "ok", "value": 55.0, "labels_used": 100,
             "unlabeled_used": 512, "metric": "f1"},
            {"task": "t", "strategy": "distill", "status": "infeasible", "value": None, "labels_used": 100},
            {"task": "t", "strategy": "mixed", "status": "ok", "value": 50.0, "labels_used": 120}]
    pilots, notes = advise.pilots_from_rows(rows, "run/results.jsonl")
    assert [(p.strategy, p.labels, p.unlabeled, p.value) for p in pilots] == [
        ("annotate", 100, 0, 40.0), ("distill", 100, 512, 55.0)]
    assert pilots[0].cost_usd == 0.5
    assert notes == ["1 row(s) of run/results.jsonl left out: not finished",
                     "1 row(s) of run/results.jsonl left out: mixed cells are not fitted"]


def test_pilot_grid_spans_the_start_labels_and_what_the_budget_buys():
    assert advise_cmd.pilot_grid(200, 512) == ([25, 50, 100, 200], [64, 128, 256])


# ---------------------------------------------------------------- bad input, one clear message each

@pytest.mark.parametrize("line,message", [
    ({"strategy": "annotate", "labels": 100, "unlabeled": 0}, "pilots.jsonl:2: field 'value' is missing"),
    ({"strategy": "annotate", "labels": 100, "unlabeled": 0, "value": "high"},
     "pilots.jsonl:2: field 'value' must be a finite number, got 'high'"),
    ({"strategy": "annotate", "labels": -5, "unlabeled": 0, "value": 3.0},
     "pilots.jsonl:2: field 'labels' must be a whole number >= 0"),
    ({"strategy": "mixed", "labels": 100, "unlabeled": 10, "value": 3.0},
     "pilots.jsonl:2: field 'strategy' must be one of annotate, distill"),
    ({"strategy": "distill", "labels": 100, "unlabeled": 0, "value": 3.0},
     "pilots.jsonl:2: field 'unlabeled' must be >= 1 for a distill pilot"),
    ({"strategy": "annotate", "labels": 100, "unlabeled": 0, "value": 3.0, "sed": 1},
     "pilots.jsonl:2: field 'sed' is not a pilot field"),
    ("{not json", "pilots.jsonl:2: not JSON"),
])
def test_a_bad_pilot_line_is_named_with_file_line_and_field(tmp_path, line, message):
    path = write_lines(tmp_path / "pilots.jsonl", [{"strategy": "annotate", "labels": 50, "unlabeled": 0, "value": 1.0},
                                                   line])
    with pytest.raises(ValueError) as e:
        advise.read_pilots(path)
    assert message in str(e.value)


def test_pilots_of_another_task_are_refused(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [{"strategy": "annotate", "labels": 50, "unlabeled": 0, "value": 1.0,
                                               "task": "fever"}])
    with pytest.raises(ValueError, match=r"p.jsonl:1: field 'task' is 'fever', but the advice is for nq"):
        advise.check_pilots(advise.read_pilots(path), {"nq"}, "f1")


def test_pilots_of_another_metric_are_refused(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [{"strategy": "annotate", "labels": 50, "unlabeled": 0, "value": 1.0,
                                               "metric": "accuracy"}])
    with pytest.raises(ValueError, match=r"p.jsonl:1: field 'metric' is 'accuracy', but the task's metric is 'f1'"):
        advise.check_pilots(advise.read_pilots(path), {"nq"}, "f1")


def test_too_few_pilots_name_how_many_the_fit_needs():
    pilots = synthetic_pilots()
    few_annotate = [p for p in pilots if p.strategy == "distill" or p.labels in (100, 1000)]
    with pytest.raises(ValueError, match="it has 3 parameters, so it needs pilots at 3 or more label counts; got 2"):
        advise.fit_curves(few_annotate, 1000)
    few_distill = [p for p in pilots if p.strategy == "annotate" or p.unlabeled == 3000]
    with pytest.raises(ValueError, match="it has 2 parameters, so it needs pilots at 2 or more unlabeled counts; got 1"):
        advise.fit_curves(few_distill, 1000)
    few_in_all = [p for p in pilots if p.labels in (100, 1000, 3000) and p.unlabeled in (0, 3000, 10000)]
    with pytest.raises(ValueError, match=r"the two curves have 5 parameters, so the fit needs at least 6 pilots "
                                         r"\(annotate, and distill at 1000 start labels\); got 5"):
        advise.fit_curves(few_in_all, 1000)


def test_a_budget_that_buys_nothing_is_one_clear_message():
    with pytest.raises(ValueError, match=r"a budget of \$0.2 buys nothing: annotate: \$0.2 buys no label \(one costs "
                                         r"\$0.5\); distill: \$0.2 does not cover the teacher's fine-tuning"):
        advise.advise(synthetic_pilots(), linear_pricing(), task="t", metric="m", start_labels=1000, budget=0.2,
                      strategies_=("annotate", "distill"))


def test_unknown_cost_profile_and_missing_calibration_are_refused(tmp_path):
    from doa_jax.data.cards import load_card
    from doa_jax.model import config_for_size

    models = dict(teacher=config_for_size("xxl"), student=config_for_size("small"))
    with pytest.raises(ValueError, match="unknown cost profile 'cheap'; profiles: paper, calibrated, mfu"):
        advise.pricing_for(load_card("nq"), "cheap", None, **models)
    with pytest.raises(FileNotFoundError, match="cal.json"):
        advise.pricing_for(load_card("nq"), None, str(tmp_path / "cal.json"), **models)


def test_the_paper_profile_prices_options_as_doa_plan_does():
    from doa_jax.data.cards import load_card
    from doa_jax.model import config_for_size

    pricing = advise.pricing_for(load_card("nq"), None, None, teacher=config_for_size("xxl"),
                                 student=config_for_size("small"))
    assert pricing.profile == "paper" and "cost profile paper" in pricing.note
    # §7.2: NQ, 1K labels, 10K unlabeled inputs cost the paper $16 of compute (the profile fits within 25%).
    compute = pricing.price("distill", 1000, 10000) - 1000 * 0.129
    assert compute == pytest.approx(16, rel=0.25)
    assert pricing.price("annotate", 1500, 0) == pytest.approx(1500 * 0.129)   # the paper charges labels only


# ---------------------------------------------------------------- the command

def paper_pilot_file(tmp_path, task="nq"):
    return write_lines(tmp_path / "pilots.jsonl", [
        {"strategy": p.strategy, "labels": p.labels, "unlabeled": p.unlabeled, "value": p.value, "task": task,
         "metric": p.metric} for p in advise.paper_pilots(task)])


def test_cli_json_has_the_recommendation_interval_and_each_option(tmp_path, capsys):
    argv = ["advise", "--task", "nq", "--start-labels", "1000", "--budget", "50", "--pilots",
            str(paper_pilot_file(tmp_path)), "--json", "--bootstrap", "300", "--plot", str(tmp_path / "a.png"),
            "--unlabeled-pool", "none"]
    assert cli.main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["recommended"] == "distill" and out["compute_share"] == 1.0 and out["cost_profile"] == "paper"
    assert out["interval"][0] < out["expected"] < out["interval"][1]
    by = {(o["strategy"], o["compute_share"]): o for o in out["options"]}
    assert by[("annotate", 0.0)]["labels_bought"] == 387 and by[("annotate", 0.0)]["expected"] < out["expected"]
    assert all(o["cost_usd"] <= 50.0 for o in out["options"])
    assert (tmp_path / "a.png").stat().st_size > 10_000


def nq_advice(tmp_path, capsys, *extra) -> dict:
    argv = ["advise", "--task", "nq", "--start-labels", "1000", "--budget", "50", "--pilots",
            str(paper_pilot_file(tmp_path)), "--json", "--bootstrap", "300", *extra]
    assert cli.main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_buys_no_more_unlabeled_inputs_than_the_pool_holds(tmp_path, capsys):
    # Uncapped, $50 buys NQ 49,226 inputs at the paper's prices; a pool of 3,000 caps every option's U.
    uncapped = {o["strategy"] + str(o["compute_share"]): o["unlabeled"]
                for o in nq_advice(tmp_path, capsys, "--unlabeled-pool", "none")["options"]}
    out = nq_advice(tmp_path, capsys, "--unlabeled-pool", "3000")
    capped = {o["strategy"] + str(o["compute_share"]): o["unlabeled"] for o in out["options"]}
    assert uncapped["distill1.0"] == 49226 and capped["distill1.0"] == 3000
    assert capped == {k: min(u, 3000) for k, u in uncapped.items()}
    assert out["unlabeled_pool"] == "3000 inputs (--unlabeled-pool)"


def test_cli_caps_u_by_the_tasks_local_pool_as_doa_plan_does(tmp_path, capsys, doa_data):
    pilots = [{"strategy": "annotate", "labels": n, "unlabeled": 0, "value": v, "task": "wlp", "metric": "f1"}
              for n, v in ((125, 30.1), (250, 38.0), (500, 44.2), (1000, 49.5))]
    pilots += [{"strategy": "distill", "labels": 1000, "unlabeled": u, "value": v, "task": "wlp", "metric": "f1"}
               for u, v in ((1000, 47.0), (2000, 50.3), (4000, 52.1))]
    common = ["--task", "wlp", "--start-labels", "1000", "--budget", "100", "--json"]
    assert cli.main(["plan", *common]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert cli.main(["advise", *common, "--pilots", str(write_lines(tmp_path / "p.jsonl", pilots)),
                     "--bootstrap", "300"]) == 0
    out = json.loads(capsys.readouterr().out)
    distill = next(o for o in out["options"] if o["strategy"] == "distill")
    assert distill["unlabeled"] == plan["distill"]["unlabeled"] == 3391     # the local WLP pool, not 22,208
    assert out["unlabeled_pool"] == plan["unlabeled_pool"] == "3391 inputs (the task's local unlabeled pool)"


def test_cli_writes_no_plot_unless_asked(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = nq_advice(tmp_path, capsys, "--unlabeled-pool", "none")
    assert out["plot"] is None and not list(tmp_path.glob("*.png"))
    assert cli.main(["advise", "--task", "nq", "--start-labels", "1000", "--budget", "50", "--pilots",
                     str(paper_pilot_file(tmp_path)), "--bootstrap", "300", "--unlabeled-pool", "none"]) == 0
    assert "plot: none (--plot PATH writes one)" in capsys.readouterr().out and not list(tmp_path.glob("*.png"))
    out = nq_advice(tmp_path, capsys, "--unlabeled-pool", "none", "--plot", "here/advise.png")
    assert out["plot"] == "here/advise.png" and (tmp_path / "here" / "advise.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_budget_that_buys_nothing_exits_2_with_one_line(tmp_path, capsys):
    argv = ["advise", "--task", "nq", "--start-labels", "1000", "--budget", "0.1", "--pilots",
            str(paper_pilot_file(tmp_path)), "--plot", str(tmp_path / "a.png")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("doa advise: error: a budget of $0.1 buys nothing") and err.count("\n") == 1


def test_cli_refuses_pilots_of_another_task(tmp_path, capsys):
    argv = ["advise", "--task", "fever", "--start-labels", "1000", "--budget", "50", "--pilots",
            str(paper_pilot_file(tmp_path, task="nq")), "--plot", str(tmp_path / "a.png")]
    assert cli.main(argv) == 2
    assert "field 'task' is 'nq', but the advice is for fever" in capsys.readouterr().err


def test_demo_pilot_cells_train_on_exactly_the_pilot_label_and_input_counts(tmp_path):
    import argparse

    args = argparse.Namespace(task="demo", start_labels=200, budget=1.0, out=str(tmp_path), seed=0, quiet=True,
                              gin=[], gin_file=[])
    cells = advise_cmd.Cells(args)
    assert (cells.label_pool, cells.unlabeled_pool) == (512, 4096)   # gin/runs/demo_models.gin
    ann = cells.annotate_pilot(25)
    plan = cells.planner.plan("annotate", ann.start_labels, ann.extra_budget_usd)
    assert (ann.strategy, ann.start_labels, plan.labels_used) == ("annotate", 24, 25)
    dist = cells.distill_pilot(64)
    plan = cells.planner.plan("distill", dist.start_labels, dist.extra_budget_usd,
                              unlabeled_available=dist.distill.max_unlabeled)
    assert (dist.strategy, dist.start_labels, plan.unlabeled_used, plan.feasible) == ("distill", 200, 64, True)


def test_a_run_interval_stays_within_the_metrics_range():
    # distill pilots that all scored 0 (the demo's 64-256 inputs): the noise must not push a run below 0 F1
    pilots = ([advise.Pilot("annotate", n, 0, v) for n, v in ((12, 7.3), (25, 7.4), (50, 16.6), (100, 36.5))]
              + [advise.Pilot("distill", 100, u, 0.0) for u in (64, 128, 256)])
    pricing = linear_pricing(per_label=0.26, per_label_compute=0.0282, per_input=0.005)   # the teacher: $2.82 on 100
    advice = advise.advise(pilots, pricing, task="demo", metric="f1", start_labels=100, budget=5.0,
                           strategies_=("annotate", "distill"), n_boot=300)
    assert all(0.0 <= o.interval[0] <= o.interval[1] <= 100.0 for o in advice.options if o.feasible)


def test_demo_options_cost_what_their_cells_then_charge(tmp_path):
    import argparse

    args = argparse.Namespace(task="demo", start_labels=200, budget=5.0, out=str(tmp_path), seed=0, quiet=True,
                              gin=[], gin_file=[], cost_profile=None, calibration=None)
    cells = advise_cmd.Cells(args)
    pricing = advise_cmd.option_pricing(args, cells.card, cells)
    plan = cells.planner.plan("distill", 200, 1e9, unlabeled_available=1024)   # the cells' own planner
    compute = pricing.price("distill", 200, 1024) - 200 * cells.card.annotation_cost_usd
    assert compute == pytest.approx(plan.compute_usd, rel=1e-9)
    assert plan.teacher_finetune_usd == pytest.approx(6.222, abs=0.001)   # 40 epochs (demo_models.gin), not 20


def test_pilots_are_read_from_and_the_plot_written_to_an_object_store(tmp_path, capsys):
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe_file("/advise_in/pilots.jsonl", paper_pilot_file(tmp_path).read_bytes())
    argv = ["advise", "--task", "nq", "--start-labels", "1000", "--budget", "50", "--pilots",
            "memory://advise_in/pilots.jsonl", "--out", "memory://advise_out", "--json", "--bootstrap", "300",
            "--unlabeled-pool", "none"]
    assert cli.main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["recommended"] == "distill" and out["plot"] == "memory://advise_out/advise.png"
    assert fs.cat_file("/advise_out/advise.png")[:8] == b"\x89PNG\r\n\x1a\n"
    assert fs.size("/advise_out/advise.png") > 10_000


@pytest.fixture(scope="module")
def steep_figure(tmp_path_factory):
    """The advice plot of pilots whose annotation curve, drawn left of them, falls below 0 (60 - 6000/n
    at n = 70 is -25.7), at a budget that cannot pay the teacher ($0.20 per label x 1000 > $100).
    Rendered to a tmp dir like `doa advise --plot` does."""
    a = advise.advise(synthetic_pilots(ann=(60.0, 6000.0, 1.0)), linear_pricing(per_label_compute=0.2), task="t",
                      metric="f1", start_labels=1000, budget=100.0, strategies_=("annotate", "distill"), n_boot=200)
    fig = advise.figure(a)
    fig.savefig(tmp_path_factory.mktemp("advise") / "advise.png")
    yield fig
    plt.close(fig)


def test_plot_clips_curves_bands_and_axis_to_the_metrics_range(steep_figure):
    for ax in steep_figure.axes:
        ys = [y for line in ax.get_lines() for y in line.get_ydata()]
        bands = [c for c in ax.collections if isinstance(c, PolyCollection)]   # fill_between's
        ys += [y for band in bands for p in band.get_paths() for y in p.vertices[:, 1]]
        assert bands and ys and 0.0 <= min(ys) and max(ys) <= 100.0
        low, high = ax.get_ylim()
        assert low == 0.0 and high <= 100.0


def test_plot_labels_the_metric_axis_with_its_unit_like_the_report(steep_figure):
    assert steep_figure.axes[0].get_ylabel() == "F1 (%)"


def test_a_panel_whose_strategy_the_budget_cannot_buy_says_so(steep_figure):
    ax_a, ax_d = steep_figure.axes
    said = [t.get_text().replace("\n", " ") for t in ax_d.texts]
    assert said == ["infeasible at +$100: $100 does not cover the teacher's fine-tuning on 1000 labels and one "
                    "unlabeled input ($200)"]
    assert len(ax_a.texts) == 0
