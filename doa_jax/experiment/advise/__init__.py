"""Which split to buy before spending: learning curves from pilots, priced options, a recommendation.

The paper answers "distill or annotate?" after running every cell. This package answers it before
spending, from a few cheap pilot results (or earlier results, or the paper's own points):

    pilots.py          the measured points: a pilots file, a run's finished cells, the paper's Pareto points
    curves.py          learning curves fitted to the pilots (annotation, distillation), with a bootstrap
    pricing.py         what a run costs: the FLOP planner under a cost profile, or the paper's own dollars
    options.py         what the budget buys under each strategy (the planner's search, `planner.BudgetSearch`)
    recommendation.py  the best option, its interval, the runner-up and P(best); `advise` runs it all
    plots.py           the advice as a figure
"""
from doa_jax.experiment.advise.curves import (ALL_PARAMS, ANNOTATE_PARAMS, C_GRID, DISTILL_PARAMS, Fit,
                                              annotate_value, distill_value, fit_annotate, fit_curves, fit_distill)
from doa_jax.experiment.advise.options import Option, plan_options
from doa_jax.experiment.advise.pilots import (FITTED, OPTIONAL_FIELDS, PARETO_CSV, PILOT_FIELDS, Pilot, check_pilots,
                                              paper_pilots, pilot_from_json, pilots_from_rows, read_pareto,
                                              read_pilots)
from doa_jax.experiment.advise.plots import figure, plot
from doa_jax.experiment.advise.pricing import LinearPrices, Pricing, paper_pricing, pricing_for
from doa_jax.experiment.advise.recommendation import METRIC_RANGE, Advice, advise, recommend

__all__ = ["ALL_PARAMS", "ANNOTATE_PARAMS", "Advice", "C_GRID", "DISTILL_PARAMS", "FITTED", "Fit", "LinearPrices",
           "METRIC_RANGE", "OPTIONAL_FIELDS", "Option", "PARETO_CSV", "PILOT_FIELDS", "Pilot", "Pricing",
           "advise", "annotate_value", "check_pilots", "distill_value", "figure", "fit_annotate", "fit_curves",
           "fit_distill", "paper_pilots", "paper_pricing", "pilot_from_json", "pilots_from_rows", "plan_options",
           "plot", "pricing_for", "read_pareto", "read_pilots", "recommend"]
