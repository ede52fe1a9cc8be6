"""`CellRun`: what every phase of one cell works with, built once per cell.

The cell's config (vocab sizes resolved), its task setup (card, pools, vocabulary, lengths), the
pricer of its cost profile, its ledger, the budget cap over that ledger, and its folders. `cell.py`
builds one and hands it to each phase in `phases.py`; no phase rebuilds any of it.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, ContextManager, Optional

import jax
from jax.sharding import Mesh

from doa_jax import partitioning, storage
from doa_jax.experiment import costs
from doa_jax.experiment.config import CellConfig
from doa_jax.experiment.pricing import Pricer
from doa_jax.experiment.task_setup import TaskSetup, cache_dir


class BudgetExhausted(RuntimeError):
    """A phase that must finish to be useful (the teacher) ran out of budget."""


class Budget:
    """Says whether the next training step still fits the cap, from what the ledger has charged."""

    def __init__(self, ledger: costs.Ledger, cap_usd: float):
        self.ledger, self.cap = ledger, cap_usd

    def spent(self) -> float:
        return self.ledger.total(costs.CHARGED_PHASES)

    def step_allowed(self, step_usd: float) -> Callable[[int], bool]:
        """A trainer hook: step `s` (0-based) of this phase may run if steps 0..s fit the cap."""
        before = self.spent()
        return lambda step: before + (step + 1) * step_usd <= self.cap + 1e-9


@dataclasses.dataclass
class CellRun:
    cfg: CellConfig                 # vocab sizes resolved: `cfg.key()` is the cell's identity
    setup: TaskSetup
    pricer: Pricer
    ledger: costs.Ledger
    budget: Budget
    dir: storage.AnyPath            # OUTPUT_DIR/cells/<key>: ledger, student, predictions
    cache: storage.AnyPath          # shared teachers, stores and students
    _meshes: dict = dataclasses.field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, cfg: CellConfig, setup: TaskSetup) -> "CellRun":
        """The cell's run state; its ledger is repaired by process 0 before the others read it."""
        cell_dir = storage.path(cfg.output_dir) / "cells" / cfg.key()
        pricer = Pricer.for_cell(cfg, setup.card, setup.lengths)
        measured_on, chips = costs.job_accelerator(cfg.pricing.measured_on)
        ledger = partitioning.chief_first(lambda: costs.Ledger(
            cell_dir / "ledger.jsonl", measured_on=measured_on, chips=chips, profile=pricer.profile,
            writable=partitioning.is_chief()))
        return cls(cfg, setup, pricer, ledger, Budget(ledger, cfg.extra_budget_usd), cell_dir, cache_dir(cfg))

    def say(self, text: str) -> None:
        say(self.cfg, text)

    def mesh(self, role: str) -> tuple[Mesh, partitioning.Rules]:
        """The mesh and logical-axis rules of the `role`'s layout ('teacher' or 'student')."""
        if role not in self._meshes:
            self._meshes[role] = self.cfg.layout(role).mesh.build()
        return self._meshes[role]

    def inference_mesh(self, role: str) -> Optional[tuple[Mesh, partitioning.Rules]]:
        """Where the `role`'s inference runs: its mesh on one process. On several, the teacher's
        layout cut to this process's own devices (`MeshConfig.within`): each host runs the teacher
        alone on a replica sharded over its chips (process 0 the store, every process the online
        forward of its own rows; no collective the others would have to join); the student's
        evaluation is a collective program over the job's mesh, under no mesh context (None): its
        params, spread over every host, carry their sharding."""
        if jax.process_count() == 1:
            return self.mesh(role)
        if role != "teacher":
            return None
        if "teacher on this host" not in self._meshes:
            local = jax.local_devices()
            self._meshes["teacher on this host"] = self.cfg.layout(role).mesh.within(len(local)).build(local)
        return self._meshes["teacher on this host"]

    def inference_context(self, role: str) -> Callable[[], ContextManager]:
        """The `role`'s inference mesh and rules (`inference_mesh`), as a context to run its programs under."""
        where = self.inference_mesh(role)
        if where is None:
            return contextlib.nullcontext
        return lambda: partitioning.mesh_context(*where)


def say(cfg: CellConfig, text: str) -> None:
    """A progress line of the cell, unless it runs quietly."""
    if cfg.verbose:
        print(f"[{cfg.describe()}] {text}", flush=True)
