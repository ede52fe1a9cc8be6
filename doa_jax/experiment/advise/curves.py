"""Learning curves fitted to the pilots, with a parametric bootstrap.

Curves. Annotation: metric vs labels n, `v_A(n) = a - b * n**-c` (b >= 0, 0.01 <= c <= 3). The
reason for this form: learning curves of fine-tuned models fall as a power law in the training
set size towards an irreducible error (Hestness et al. 2017; Kaplan et al. 2020), so the metric
rises, ever more slowly, to a ceiling `a`; with b >= 0 more data never predicts a loss.
Distillation at the start labels L: `v_D(U) = a_D - b_D * U**-c`, the same student learning from
the U inputs the teacher labels (the gold labels train the teacher, not the student), with the
annotation curve's exponent c, towards the teacher's ceiling a_D. Sharing c is what lets two
distill pilots (the paper's Pareto plot gives U = 10K and 100K) fit it. Both fits are exact least
squares: linear in (a, b) for each c, with c on a fine grid. Together the curves have five
parameters; the fit needs one pilot more (six), and each curve as many pilots as its parameters.

Uncertainty. A parametric bootstrap over the pilots: the noise sigma is pooled from both fits'
residuals, each replicate draws sigma from its posterior (sigma^2 * dof / chi2_dof), adds that
noise to the fitted values at the pilots' own points, and refits both curves. Parametric rather
than resampling pilots, because with a handful of pilots most resamples could not be fitted.
Intervals are for the outcome of one run (curve spread plus run noise).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from doa_jax.experiment.advise.pilots import Pilot

ANNOTATE_PARAMS, DISTILL_PARAMS = 3, 2    # (a, b, c); (a_D, b_D) with c shared
ALL_PARAMS = ANNOTATE_PARAMS + DISTILL_PARAMS
C_GRID = np.geomspace(0.01, 3.0, 240)     # the exponent's bounds and grid


def _best_line(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Least squares of y = a - b x with b >= 0, batched: x (..., N), y (..., N) -> a, b, sse (...)."""
    xm, ym = x.mean(-1, keepdims=True), y.mean(-1, keepdims=True)
    sxx = ((x - xm) ** 2).sum(-1)
    slope = np.where(sxx > 0, ((x - xm) * (y - ym)).sum(-1) / np.where(sxx > 0, sxx, 1.0), 0.0)
    slope = np.minimum(slope, 0.0)                     # b = -slope >= 0: more data never hurts
    a = ym[..., 0] - slope * xm[..., 0]
    sse = ((y - (a[..., None] + slope[..., None] * x)) ** 2).sum(-1)
    return a, -slope, sse


def fit_annotate(n: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(a, b, c) of v = a - b n^-c for each row of y (R, N): the best c on the grid, then (a, b)."""
    x = n[None, None, :] ** -C_GRID[:, None, None]                  # (G, 1, N)
    a, b, sse = _best_line(x, y[None, :, :])                        # (G, R)
    g = sse.argmin(0)
    r = np.arange(y.shape[0])
    return np.stack([a[g, r], b[g, r], C_GRID[g]], axis=-1)


def fit_distill(examples: np.ndarray, y: np.ndarray, c: np.ndarray) -> np.ndarray:
    """(a_D, b_D) of v = a_D - b_D U^-c for each row of y (R, N), with c (R,) from the annotation fit."""
    a, b, _ = _best_line(examples[None, :] ** -c[:, None], y)
    return np.stack([a, b], axis=-1)


def annotate_value(params: np.ndarray, n: float) -> np.ndarray:
    return params[..., 0] - params[..., 1] * np.asarray(n, dtype=float) ** -params[..., 2]


def distill_value(dparams: np.ndarray, aparams: np.ndarray, examples: float) -> np.ndarray:
    return dparams[..., 0] - dparams[..., 1] * np.asarray(examples, dtype=float) ** -aparams[..., 2]


@dataclasses.dataclass
class Fit:
    """Point fits and bootstrap replicates of both curves at the start labels."""

    start_labels: int
    annotate_points: tuple[np.ndarray, np.ndarray]      # labels, values
    distill_points: tuple[np.ndarray, np.ndarray]       # unlabeled, values
    annotate: np.ndarray                                # (3,) a, b, c
    distill: np.ndarray                                 # (2,) a_D, b_D
    boot_annotate: np.ndarray                           # (R, 3)
    boot_distill: np.ndarray                            # (R, 2)
    boot_sigma: np.ndarray                              # (R,) run noise per replicate
    sigma: float
    dof: int
    notes: list[str]

    def annotate_at(self, n: float) -> np.ndarray:
        return annotate_value(self.boot_annotate, n)

    def distill_at(self, u: float) -> np.ndarray:
        return distill_value(self.boot_distill, self.boot_annotate, u)


def _split_pilots(pilots: Sequence[Pilot], start_labels: int) -> tuple[np.ndarray, ...]:
    ann = [p for p in pilots if p.strategy == "annotate"]
    dist = [p for p in pilots if p.strategy == "distill" and p.labels == start_labels]
    if len({p.labels for p in ann}) < ANNOTATE_PARAMS:
        raise ValueError(f"too few annotate pilots to fit the annotation curve: it has {ANNOTATE_PARAMS} parameters, "
                         f"so it needs pilots at {ANNOTATE_PARAMS} or more label counts; got "
                         f"{len({p.labels for p in ann})}")
    if len({p.unlabeled for p in dist}) < DISTILL_PARAMS:
        raise ValueError(f"too few distill pilots at {start_labels} start labels to fit the distillation curve: it "
                         f"has {DISTILL_PARAMS} parameters, so it needs pilots at {DISTILL_PARAMS} or more unlabeled "
                         f"counts; got {len({p.unlabeled for p in dist})}")
    if len(ann) + len(dist) < ALL_PARAMS + 1:
        raise ValueError(f"too few pilots: the two curves have {ALL_PARAMS} parameters, so the fit needs at least "
                         f"{ALL_PARAMS + 1} pilots (annotate, and distill at {start_labels} start labels); got "
                         f"{len(ann) + len(dist)}")
    arr = lambda ps, f: np.array([getattr(p, f) for p in ps], dtype=float)   # noqa: E731
    return arr(ann, "labels"), arr(ann, "value"), arr(dist, "unlabeled"), arr(dist, "value")


def fit_curves(pilots: Sequence[Pilot], start_labels: int, *, n_boot: int = 2000, seed: int = 0) -> Fit:
    """Both curves fitted to the pilots, with a parametric bootstrap of `n_boot` replicates."""
    n_a, y_a, u_d, y_d = _split_pilots(pilots, start_labels)
    ex_d = u_d
    ann = fit_annotate(n_a, y_a[None])[0]
    dist = fit_distill(ex_d, y_d[None], ann[None, 2])[0]
    fit_a = ann[0] - ann[1] * n_a ** -ann[2]
    fit_d = dist[0] - dist[1] * ex_d ** -ann[2]
    dof = len(y_a) - ANNOTATE_PARAMS + len(y_d) - DISTILL_PARAMS
    sigma = math.sqrt((((y_a - fit_a) ** 2).sum() + ((y_d - fit_d) ** 2).sum()) / dof)
    rng = np.random.default_rng(seed)
    boot_sigma = sigma * np.sqrt(dof / rng.chisquare(dof, size=n_boot))
    boot_a = fit_annotate(n_a, fit_a[None] + boot_sigma[:, None] * rng.standard_normal((n_boot, len(y_a))))
    y_db = fit_d[None] + boot_sigma[:, None] * rng.standard_normal((n_boot, len(y_d)))
    boot_d = fit_distill(ex_d, y_db, boot_a[:, 2])
    notes = []
    if ann[2] <= C_GRID[0]:
        notes.append(f"the pilots show no saturation yet (c at its lower bound {C_GRID[0]:g}): the curves grow "
                     f"log-linearly over them, so predictions past the pilots are optimistic")
    ignored = sorted({p.labels for p in pilots if p.strategy == "distill" and p.labels != start_labels})
    if ignored:
        notes.append(f"distill pilots at other start labels ({', '.join(map(str, ignored))}) are left out: "
                     f"their teacher is not the one {start_labels} labels fine-tune")
    return Fit(start_labels, (n_a, y_a), (u_d, y_d), ann, dist, boot_a, boot_d, boot_sigma, sigma, dof, notes)

