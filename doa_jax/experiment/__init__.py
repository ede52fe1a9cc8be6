"""The paper's experiment: one budget cell (`run_cell`), and the money, sweeps and reports around it.

    config.py      CellConfig, composed of the trainer's TrainConfig, Epochs, DistillConfig, PricingConfig
    strategies.py  the strategy table (annotate, distill, mixed): what each buys and runs
    phases.py      task setup, budget, teacher fine-tune, teacher store, student training, evaluation
    cell.py        run_cell: the phases in order, one results row
    results.py     the results row schema and the one reader/appender of results.jsonl
    planner.py     what a budget buys, before any compute; costs.py rate cards and the ledger
    sweep.py       grids of cells; report.py tables and plots beside the paper's numbers
"""
from doa_jax.experiment.cell import run_cell
from doa_jax.experiment.config import CellConfig, DistillConfig, Epochs, PricingConfig

__all__ = ["CellConfig", "DistillConfig", "Epochs", "PricingConfig", "run_cell"]
