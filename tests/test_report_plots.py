"""What the report's plots draw: exact cost ticks, the table's 95% intervals as labelled error bars,
no Pareto frontier at a metric of 0, labels inside the image; and a header that says what its
intervals resampled. Plots are rendered to a tmp dir and read back from matplotlib's artists."""
import json

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from doa_jax.experiment import report

INTERVAL_KEY = "error bars: 95% bootstrap interval"


def row(strategy, value, spent, *, seed=0, budget=100, start=1000, **extra):
    return {"task": "wlp", "start_labels": start, "extra_budget_usd": budget, "strategy": strategy,
            "student": "t5_1_1_small", "teacher": "t5_1_1_xxl", "metric": "f1", "value": value, "seed": seed,
            "spent_total_usd": spent, "spent_usd": {}, **extra}


def cells_of(rows):
    cells = report.summarise(rows)
    report.attach_intervals(cells)
    return cells


def drawn(fig):
    """The figure laid out by an Agg canvas (a closed figure has none), and its renderer."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


def x_ticks(fig):
    ax = fig.axes[0]
    lo, hi = ax.get_xlim()
    return [(loc, label.get_text()) for loc, label in zip(ax.get_xticks(), ax.get_xticklabels()) if lo <= loc <= hi]


@pytest.mark.parametrize("spent", [(17.94, 18.00), (0.78, 2.86, 4.94, 9.88, 19.76)],
                         ids=["costs 6 cents apart", "ticks every $2.5"])
def test_cost_tick_labels_are_exact_and_distinct(tmp_path, spent):
    # start 0 labels: the x axis is the spent $ itself; the demo's walk-through drew "$18" seven times
    # for the first, "$52 $55 $58 ..." for ticks at 52.5, 55, 57.5 for the second
    rows = [row("annotate", 30.0 + i, s, budget=20 + i, start=0) for i, s in enumerate(spent)]
    fig = report.plot_cost_vs_metric(cells_of(rows), "wlp", tmp_path / "cost.png")
    drawn(fig)
    ticks = x_ticks(fig)
    labels = [label for _, label in ticks]
    assert len(ticks) >= 4 and len(set(labels)) == len(labels)
    for loc, label in ticks:
        assert label.startswith("$") and float(label[1:].replace(",", "")) == pytest.approx(loc, abs=1e-9)


def test_budget_bars_carry_the_tables_95_interval_and_the_legend_says_so(tmp_path):
    rows = [row("annotate", 50.0, 360.0), row("annotate", 52.0, 360.0, seed=1),
            row("distill", 70.0, 355.0), row("distill", 74.0, 357.0, seed=1)]
    cells = cells_of(rows)
    fig = report.plot_budget_bars(cells, report.read_paper_results(), "wlp", tmp_path / "bars.png")
    bars = [c for c in fig.axes[0].containers if getattr(c, "errorbar", None) is not None]
    spans = sorted(tuple(seg[:, 1]) for b in bars for seg in b.errorbar.lines[2][0].get_segments())
    assert spans == sorted(c.interval for c in cells) == [(50.0, 52.0), (70.0, 74.0)]   # the table's [lo, hi]
    legend = fig.legends[0]
    assert INTERVAL_KEY in [t.get_text() for t in legend.get_texts()]
    box = legend.get_window_extent(drawn(fig))
    assert 0 <= box.x0 and box.x1 <= fig.bbox.width                  # 5 entries, one 6.4-inch panel


def test_cost_plot_labels_its_error_bars_as_95_intervals(tmp_path):
    rows = [row("annotate", 50.0, 360.0), row("annotate", 52.0, 360.0, seed=1)]
    fig = report.plot_cost_vs_metric(cells_of(rows), "wlp", tmp_path / "cost.png")
    assert INTERVAL_KEY in [t.get_text() for t in fig.axes[0].get_legend().get_texts()]


@pytest.fixture(scope="module")
def learned_nothing(tmp_path_factory):
    """The wlp_tiny plumbing check: F1 0.0 in both cells, distill spending $0.02, priced `mfu`."""
    rows = [row("annotate", 0.0, 99.84), row("distill", 0.0, 0.02)]
    path = tmp_path_factory.mktemp("plots") / "wlp_cost_vs_metric.png"
    return report.plot_cost_vs_metric(cells_of(rows), "wlp", path, report.read_paper_results())


def test_cells_that_scored_0_are_never_the_pareto_frontier(learned_nothing):
    labels = [t.get_text() for t in learned_nothing.axes[0].get_legend().get_texts()]
    assert "Ann. (this run)" in labels and not any("Pareto" in label for label in labels)
    assert report.pareto_frontier([(260.02, 0.0), (300.0, None), (359.84, 40.0)]) == [(359.84, 40.0)]


def test_the_cost_axis_label_stays_inside_the_image(learned_nothing):
    renderer = drawn(learned_nothing)
    label = learned_nothing.axes[0].xaxis.label
    box, width = label.get_window_extent(renderer), learned_nothing.bbox.width
    assert "mfu (ASSUMED)" in label.get_text() and 0 <= box.x0 and box.x1 <= width


def test_the_header_counts_what_the_intervals_resampled(tmp_path):
    out = tmp_path / "cell"
    out.mkdir()
    refs = ["SUPPORTS", "REFUTES"] * 10
    (out / "predictions.jsonl").write_text("".join(json.dumps({"prediction": r, "source": "", "target": r}) + "\n"
                                                   for r in refs))
    rows = [dict(row("annotate", 100.0, 50.0, start=50, budget=50), task="fever", metric="accuracy", output=str(out)),
            row("annotate", 50.0, 360.0), row("annotate", 52.0, 360.0, seed=1),     # 2 seeds, no predictions
            row("distill", 70.0, 355.0)]                                              # 1 seed, no predictions
    md = report.render_markdown(cells_of(rows), report.read_paper_results(), [])
    assert ("[a 95% bootstrap interval] of the mean (500 resamples). Of the 3 cell(s) with a result, 1 resampled "
            "the test examples of its seeds' predictions.jsonl (they keep references); 1 resampled its seeds only "
            "(no per-example predictions); 1 has no interval (one seed and no per-example predictions). "
            "Seeds per cell: 1 to 2.") in md
