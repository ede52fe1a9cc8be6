"""The paper's experiment: one budget cell (`run_cell`), and the money, sweeps and reports around it.

    config.py         CellConfig, composed of the trainer's TrainConfig, Epochs, DistillConfig, PricingConfig
    strategies.py     the strategy table (annotate, distill, mixed): what each buys and runs
    task_setup.py     a cell's task: card, pools, vocabulary (built once), lengths; models' vocab sizes
    cell_run.py       CellRun: config, task, pricer, ledger, budget and folders, built once per cell
    phases.py         plan, labels, teacher fine-tune, teacher store, student data, student, evaluation
    cell.py           run_cell: the phases in order, one results row
    programs.py       the cell's jitted programs, phase by phase, as `doa aot` compiles them
    results.py        the results row schema and the one reader/appender of results.jsonl
    locking.py        cell and sweep locks with leases
    costs.py          rate cards (rate_cards.toml) and the ledger
    cost_profiles.py  what prices a cell (cost_profiles.toml: paper, calibrated, mfu)
    pricing.py        a cell's Pricer: its cost profile applied to its models and lengths
    calibration.py    `doa calibrate`: measured throughput on this machine's accelerators
    planner.py        what a budget buys, before any compute (BudgetSearch: the one search)
    advise/           `doa advise`: pilots, fitted curves, options (the planner's), the recommendation
    sweep.py          grids of cells; report/ tables and plots beside the paper's numbers
                      (paper_results.csv, paper_pareto.csv)
"""
from doa_jax.experiment.cell import run_cell
from doa_jax.experiment.config import CellConfig, DistillConfig, Epochs, PricingConfig

__all__ = ["CellConfig", "DistillConfig", "Epochs", "PricingConfig", "run_cell"]
