"""Which split to buy before spending: learning curves from pilots, priced options, a recommendation.

The paper answers "distill or annotate?" after running every cell. This module answers it before
spending, from a few cheap pilot results (or earlier results, or the paper's own points):

1. Curves. Annotation: metric vs labels n, `v_A(n) = a - b * n**-c` (b >= 0, 0.01 <= c <= 3). The
   reason for this form: learning curves of fine-tuned models fall as a power law in the training
   set size towards an irreducible error (Hestness et al. 2017; Kaplan et al. 2020), so the metric
   rises, ever more slowly, to a ceiling `a`; with b >= 0 more data never predicts a loss.
   Distillation at the start labels L: `v_D(U) = a_D - b_D * U**-c`, the same student learning from
   the U inputs the teacher labels (the gold labels train the teacher, not the student), with the
   annotation curve's exponent c, towards the teacher's ceiling a_D. Sharing c is what lets two
   distill pilots (the paper's Pareto plot gives U = 10K and 100K) fit it. Both fits are exact least
   squares: linear in (a, b) for each c, with c on a fine grid. Together the curves have five
   parameters; the fit needs one pilot more (six), and each curve as many pilots as its parameters.
2. Uncertainty. A parametric bootstrap over the pilots: the noise sigma is pooled from both fits'
   residuals, each replicate draws sigma from its posterior (sigma^2 * dof / chi2_dof), adds that
   noise to the fitted values at the pilots' own points, and refits both curves. Parametric rather
   than resampling pilots, because with a handful of pilots most resamples could not be fitted.
   Intervals are for the outcome of one run (curve spread plus run noise).
3. Options. Each strategy is priced by a callback `price(strategy, labels, unlabeled) -> usd`, the
   total dollars of a run that trains on `labels` labels (all paid for) and `unlabeled` inputs, as
   in the paper's Pareto plot ("total $"). The extra budget B buys, on top of the start labels L:
   annotate: the most labels N; distill: the most inputs U; mixed at share s: labels with (1-s) B,
   inputs with the rest. Mixed is predicted as `v_D(U) + v_A(L+N) - v_A(L)` (the bought labels'
   gain adds to distillation's), an assumption no pilot tests.
4. Recommendation: the option with the highest expected metric; its interval; the best option of
   another strategy (the runner-up); P(recommended beats it) over the bootstrap replicates; and
   "cannot tell apart" below a threshold.
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import textwrap
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np

from doa_jax import storage
from doa_jax.experiment import cost_profiles, planner, report, strategies
from doa_jax.model.config import T5Config

PARETO_CSV = cost_profiles.PAPER_PARETO
FITTED = ("annotate", "distill")          # strategies whose pilots the curves are fitted to
ANNOTATE_PARAMS, DISTILL_PARAMS = 3, 2    # (a, b, c); (a_D, b_D) with c shared
ALL_PARAMS = ANNOTATE_PARAMS + DISTILL_PARAMS
C_GRID = np.geomspace(0.01, 3.0, 240)     # the exponent's bounds and grid
PROFILES = ("paper", "mfu", "calibrated")
METRIC_RANGE = (0.0, 100.0)               # doa-jax's metrics are scores in [0, 100]
PILOT_FIELDS = {"strategy": str, "labels": int, "unlabeled": int, "value": float}
OPTIONAL_FIELDS = {"task": str, "metric": str, "seed": int, "cost_usd": float}

Price = Callable[[str, int, int], float]


@dataclasses.dataclass(frozen=True)
class Pilot:
    """One measured point: a strategy trained on `labels` labels and `unlabeled` inputs scored `value`."""

    strategy: str
    labels: int
    unlabeled: int
    value: float
    task: Optional[str] = None
    metric: Optional[str] = None
    seed: Optional[int] = None
    cost_usd: Optional[float] = None
    source: str = ""


@dataclasses.dataclass(frozen=True)
class Pricing:
    """What runs cost: `price(strategy, labels, unlabeled)` total dollars, and one label's price."""

    price: Price
    usd_per_label: float
    profile: str
    note: str

    def extra(self, strategy: str, start_labels: int, labels: int, unlabeled: int) -> float:
        """Dollars beyond the start labels already bought."""
        return self.price(strategy, labels, unlabeled) - start_labels * self.usd_per_label


# ---------------------------------------------------------------- pilots

def _field(raw: dict, name: str, kind: type, where: str) -> Any:
    value = raw[name]
    if kind is str:
        if not isinstance(value, str) or not value:
            raise ValueError(f"{where}: field '{name}' must be a non-empty string, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where}: field '{name}' must be a finite number, got {value!r}")
    if kind is int:
        if value != int(value) or value < 0:
            raise ValueError(f"{where}: field '{name}' must be a whole number >= 0, got {value!r}")
        return int(value)
    return float(value)


def pilot_from_json(raw: Any, where: str) -> Pilot:
    """One pilot from a parsed JSON object, every field checked; errors name `where` and the field."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: a pilot must be a JSON object, got {type(raw).__name__}")
    missing = [k for k in PILOT_FIELDS if k not in raw]
    if missing:
        raise ValueError(f"{where}: field '{missing[0]}' is missing (a pilot needs {', '.join(PILOT_FIELDS)})")
    unknown = sorted(set(raw) - set(PILOT_FIELDS) - set(OPTIONAL_FIELDS))
    if unknown:
        raise ValueError(f"{where}: field '{unknown[0]}' is not a pilot field "
                         f"(known: {', '.join(list(PILOT_FIELDS) + list(OPTIONAL_FIELDS))})")
    fields = {k: _field(raw, k, kind, where) for k, kind in PILOT_FIELDS.items()}
    fields.update({k: _field(raw, k, kind, where) for k, kind in OPTIONAL_FIELDS.items()
                   if raw.get(k) is not None})
    if fields["strategy"] not in FITTED:
        raise ValueError(f"{where}: field 'strategy' must be one of {', '.join(FITTED)} (the curves fitted), "
                         f"got {fields['strategy']!r}")
    if fields["strategy"] == "annotate" and fields["unlabeled"] != 0:
        raise ValueError(f"{where}: field 'unlabeled' must be 0 for an annotate pilot, got {fields['unlabeled']}")
    if fields["strategy"] == "distill" and fields["unlabeled"] == 0:
        raise ValueError(f"{where}: field 'unlabeled' must be >= 1 for a distill pilot (U = 0 is annotation)")
    if fields["labels"] == 0:
        raise ValueError(f"{where}: field 'labels' must be >= 1 (nothing trains on no labels)")
    return Pilot(**fields, source=where)


def read_pilots(path: str | os.PathLike) -> list[Pilot]:
    """Pilots from a JSON-lines file (local or a URL), validated line by line (errors name file:line:field)."""
    try:
        text = storage.read_bytes(path).decode("utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"pilots file {path} does not exist") from None
    pilots = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not JSON ({e.msg})") from None
        pilots.append(pilot_from_json(raw, f"{path}:{lineno}"))
    if not pilots:
        raise ValueError(f"{path}: no pilots in the file")
    return pilots


def pilots_from_rows(rows: Iterable[dict], source: str) -> tuple[list[Pilot], list[str]]:
    """Pilots from results.jsonl rows (finished annotate and distill cells), and notes on rows left out."""
    pilots, skipped = [], {}
    for i, r in enumerate(rows, 1):
        why = ("not finished" if r.get("status") != "ok" or r.get("value") is None
               else "mixed cells are not fitted" if r.get("strategy") not in FITTED else "")
        if why:
            skipped[why] = skipped.get(why, 0) + 1
            continue
        unlabeled = 0 if r["strategy"] == "annotate" else int(r.get("unlabeled_used") or 0)
        pilots.append(Pilot(r["strategy"], int(r["labels_used"]), unlabeled, float(r["value"]), task=r.get("task"),
                            metric=r.get("metric"), seed=r.get("seed"),
                            cost_usd=_compute_spent(r), source=f"{source} row {i}"))
    return pilots, [f"{n} row(s) of {source} left out: {why}" for why, n in skipped.items()]


def _compute_spent(row: dict) -> Optional[float]:
    spent = row.get("spent_usd") or {}
    return sum(v for k, v in spent.items() if k != "labels") if spent else None


def check_pilots(pilots: Sequence[Pilot], task_names: Iterable[str], metric: Optional[str]) -> str:
    """The one metric all pilots share; a pilot of another task or metric is an error naming it."""
    names = set(task_names)
    for p in pilots:
        if p.task is not None and p.task not in names:
            raise ValueError(f"{p.source}: field 'task' is {p.task!r}, but the advice is for "
                             f"{' / '.join(sorted(names))}: pilots of another task do not predict this one")
    metrics = {p.metric for p in pilots if p.metric is not None}
    if metric is None and len(metrics) > 1:
        raise ValueError(f"pilots mix metrics ({', '.join(sorted(metrics))}): one curve needs one metric")
    metric = metric or (metrics.pop() if metrics else None)
    for p in pilots:
        if p.metric is not None and p.metric != metric:
            raise ValueError(f"{p.source}: field 'metric' is {p.metric!r}, but the task's metric is {metric!r}")
    return metric or "value"


# ---------------------------------------------------------------- curves

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


# ---------------------------------------------------------------- options

@dataclasses.dataclass
class Option:
    """What the extra budget buys under one strategy (and share), and what it is predicted to score."""

    strategy: str
    compute_share: float
    labels_bought: int
    unlabeled: int
    cost_usd: float
    feasible: bool
    reason: str = ""
    samples: Optional[np.ndarray] = None     # (R,) curve value per replicate
    expected: Optional[float] = None
    interval: Optional[tuple[float, float]] = None

    @property
    def name(self) -> str:
        return f"mixed {self.compute_share:.0%} compute" if self.strategy == "mixed" else self.strategy

    def as_json(self) -> dict:
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "samples"}
        d["interval"] = list(self.interval) if self.interval else None
        return d


def _largest(fits: Callable[[int], bool], upper: Optional[int]) -> int:
    """The largest n >= 0 with fits(n) (monotone), searching up to `upper` (or doubling when None)."""
    if not fits(0):
        return -1
    hi = 1
    while (upper is None or hi < upper) and fits(hi) and hi < 10 ** 12:
        hi *= 2
    hi = hi if upper is None else min(hi, upper)
    lo = 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def _buy_unlabeled(pricing: Pricing, strategy: str, labels: int, start: int, budget: float,
                   pool: Optional[int]) -> tuple[int, float]:
    u = _largest(lambda k: pricing.extra(strategy, start, labels, k) <= budget, pool)
    return u, pricing.extra(strategy, start, labels, max(u, 0))


def plan_options(pricing: Pricing, start_labels: int, budget: float, *, shares: Sequence[float] = (0.25, 0.5, 0.75),
                 strategies_: Sequence[str] = strategies.NAMES, label_pool: Optional[int] = None,
                 unlabeled_pool: Optional[int] = None) -> list[Option]:
    """Each strategy's purchase with `budget` extra dollars (pools cap labels and inputs when given)."""
    for s in strategies_:
        strategies.get(s)
    more_labels = None if label_pool is None else max(label_pool - start_labels, 0)
    options = []
    if "annotate" in strategies_:
        n = _largest(lambda k: pricing.extra("annotate", start_labels, start_labels + k, 0) <= budget, more_labels)
        cost = pricing.extra("annotate", start_labels, start_labels + max(n, 0), 0)
        reason = "" if n > 0 else (f"${budget:g} buys no label (one costs ${pricing.usd_per_label:.3g})"
                                   if more_labels != 0 else "the labeled pool has no more labels")
        options.append(Option("annotate", 0.0, max(n, 0), 0, cost, n > 0, reason))
    if "distill" in strategies_:
        u, cost = _buy_unlabeled(pricing, "distill", start_labels, start_labels, budget, unlabeled_pool)
        options.append(Option("distill", 1.0, 0, max(u, 0), cost, u > 0, "" if u > 0 else
                               f"${budget:g} does not cover the teacher's fine-tuning on {start_labels} labels "
                               f"and one unlabeled input (${pricing.extra('distill', start_labels, start_labels, 1):.4g})"))
    for share in (shares if "mixed" in strategies_ else ()):
        n = int(budget * (1 - share) // pricing.usd_per_label)
        n = n if more_labels is None else min(n, more_labels)
        rest = budget - n * pricing.usd_per_label
        u, cost = _buy_unlabeled(pricing, "mixed", start_labels + n, start_labels, budget, unlabeled_pool)
        ok = n > 0 and u > 0
        options.append(Option("mixed", float(share), n, max(u, 0), cost, ok, "" if ok else
                              f"{share:.0%} of ${budget:g} on compute buys {max(n, 0)} labels and "
                              f"{max(u, 0)} inputs (${rest:.4g} left for compute)"))
    return options


# ---------------------------------------------------------------- recommendation

@dataclasses.dataclass
class Advice:
    task: str
    metric: str
    start_labels: int
    budget_usd: float
    cost_profile: str
    level: float
    threshold: float
    recommended: Option
    runner_up: Optional[Option]
    p_best: float
    options: list[Option]
    fit: Fit
    notes: list[str]

    @property
    def cannot_tell_apart(self) -> bool:
        return self.runner_up is not None and self.p_best < self.threshold

    def verdict(self) -> str:
        r, u = self.recommended, self.runner_up
        head = (f"{r.name}: expected {self.metric} {r.expected:.1f} ({self.level:.0%} interval "
                f"{r.interval[0]:.1f}-{r.interval[1]:.1f})")
        if u is None:
            return head + "; no other strategy is feasible"
        tail = f"runner-up {u.name} {u.expected:.1f}; P({r.name} beats it) = {self.p_best:.2f}"
        if self.cannot_tell_apart:
            return (f"cannot tell apart: {r.name} and {u.name} (P = {self.p_best:.2f} < {self.threshold:.2f}); "
                    f"more pilots, or seeds, would separate them. Leaning: " + head + "; " + tail)
        return head + "; " + tail

    def as_json(self) -> dict:
        r = self.recommended
        return {
            "task": self.task, "metric": self.metric, "start_labels": self.start_labels, "budget_usd": self.budget_usd,
            "cost_profile": self.cost_profile, "recommended": r.strategy, "compute_share": r.compute_share,
            "expected": r.expected, "interval": list(r.interval), "level": self.level,
            "p_best": self.p_best, "cannot_tell_apart": self.cannot_tell_apart, "threshold": self.threshold,
            "runner_up": self.runner_up.as_json() if self.runner_up else None, "verdict": self.verdict(),
            "options": [o.as_json() for o in self.options],
            "fit": {"annotate": dict(zip("abc", map(float, self.fit.annotate))),
                    "distill": {"a": float(self.fit.distill[0]), "b": float(self.fit.distill[1]),
                                "c": float(self.fit.annotate[2])},
                    "sigma": self.fit.sigma, "dof": self.fit.dof,
                    "pilots": {"annotate": len(self.fit.annotate_points[0]),
                               "distill": len(self.fit.distill_points[0])}},
            "notes": self.notes,
        }


def _predict(fit: Fit, o: Option, start_labels: int) -> np.ndarray:
    """The option's metric per replicate, floored at 0: doa-jax's metrics are scores in [0, 100], and a
    power law extrapolated far below its pilots would otherwise fall without bound."""
    if o.strategy == "annotate":
        return np.maximum(fit.annotate_at(start_labels + o.labels_bought), 0.0)
    gain = 0.0
    if o.strategy == "mixed":
        gain = fit.annotate_at(start_labels + o.labels_bought) - fit.annotate_at(start_labels)
    return np.maximum(fit.distill_at(o.unlabeled) + gain, 0.0)


def _extrapolation_notes(fit: Fit, options: Sequence[Option], start_labels: int) -> list[str]:
    notes = []
    top_n, top_u = fit.annotate_points[0].max(), fit.distill_points[0].max()
    low_u = fit.distill_points[0].min()
    for o in options:
        n = start_labels + o.labels_bought
        if o.strategy != "annotate" and o.unlabeled < low_u / 2:
            notes.append(f"{o.name}: {o.unlabeled} inputs is below half the smallest distill pilot ({low_u:.0f}): "
                         f"an extrapolation")
        if o.strategy == "annotate" and n > 2 * top_n:
            notes.append(f"annotate: {n} labels is {n / top_n:.1f}x the largest annotate pilot ({top_n:.0f}): "
                         f"an extrapolation")
        if o.strategy == "distill" and o.unlabeled > 2 * top_u:
            notes.append(f"distill: {o.unlabeled} inputs is {o.unlabeled / top_u:.1f}x the largest distill pilot "
                         f"({top_u:.0f}): an extrapolation")
    return notes


def recommend(fit: Fit, options: list[Option], *, task: str, metric: str, budget: float, cost_profile: str,
              level: float = 0.8, threshold: float = 0.8, seed: int = 0) -> Advice:
    """The feasible option with the highest expected metric, its interval, the runner-up and P(best)."""
    feasible = [o for o in options if o.feasible]
    if not feasible:
        raise ValueError(f"a budget of ${budget:g} buys nothing: " + "; ".join(f"{o.name}: {o.reason}" for o in options))
    rng = np.random.default_rng(seed + 1)
    noise = fit.boot_sigma * rng.standard_normal(fit.boot_sigma.shape)
    q = (1 - level) / 2
    for o in feasible:
        o.samples = _predict(fit, o, fit.start_labels)
        o.expected = float(o.samples.mean())
        run = np.clip(o.samples + noise, *METRIC_RANGE)     # a run scores within the metric's range
        o.interval = (float(np.quantile(run, q)), float(np.quantile(run, 1 - q)))
    best_per = {}
    for o in feasible:
        if o.strategy not in best_per or o.expected > best_per[o.strategy].expected:
            best_per[o.strategy] = o
    ranked = sorted(best_per.values(), key=lambda o: -o.expected)
    rec, runner = ranked[0], (ranked[1] if len(ranked) > 1 else None)
    p_best = 1.0
    if runner is not None:
        others = np.max([o.samples for o in ranked[1:]], axis=0)
        p_best = float((rec.samples > others).mean())
    notes = list(fit.notes) + _extrapolation_notes(fit, feasible, fit.start_labels)
    notes += [f"{o.name} is not feasible: {o.reason}" for o in options if not o.feasible]
    if any(o.strategy == "mixed" for o in feasible):
        notes.append("mixed is predicted as distillation plus the bought labels' gain on the annotation curve, "
                     "an assumption no pilot tests")
    return Advice(task, metric, fit.start_labels, budget, cost_profile, level, threshold, rec, runner, p_best,
                  options, fit, notes)


def advise(pilots: Sequence[Pilot], pricing: Pricing, *, task: str, metric: str, start_labels: int, budget: float,
           strategies_: Sequence[str] = strategies.NAMES, shares: Sequence[float] = (0.25, 0.5, 0.75),
           label_pool: Optional[int] = None, unlabeled_pool: Optional[int] = None, n_boot: int = 2000,
           level: float = 0.8, threshold: float = 0.8, seed: int = 0) -> Advice:
    """Fit, price and recommend, in that order (a budget that buys nothing fails before fitting)."""
    if not (isinstance(budget, (int, float)) and math.isfinite(budget) and budget >= 0):
        raise ValueError(f"budget must be a non-negative number of dollars, got {budget!r}")
    options = plan_options(pricing, start_labels, budget, shares=shares, strategies_=strategies_,
                           label_pool=label_pool, unlabeled_pool=unlabeled_pool)
    if not any(o.feasible for o in options):
        raise ValueError(f"a budget of ${budget:g} buys nothing: " + "; ".join(f"{o.name}: {o.reason}" for o in options))
    fit = fit_curves(pilots, start_labels, n_boot=n_boot, seed=seed)
    return recommend(fit, options, task=task, metric=metric, budget=budget, cost_profile=pricing.profile,
                     level=level, threshold=threshold, seed=seed)


# ---------------------------------------------------------------- pricing

def read_pareto(path: str | os.PathLike = PARETO_CSV) -> list[dict]:
    """The paper's Pareto points (section 7.2 of the reference): one dict per (task, labels, unlabeled)."""
    return cost_profiles.paper_pareto_points(path)


def paper_pilots(task: str, path: str | os.PathLike = PARETO_CSV) -> list[Pilot]:
    """The paper's Pareto points of `task` as pilots: U = 0 points are annotate, the others distill."""
    rows = [r for r in read_pareto(path) if r["task"] == task]
    return [Pilot("annotate" if r["unlabeled"] == 0 else "distill", r["labels"], r["unlabeled"], r["value"],
                  task=task, metric=r["metric"], cost_usd=r["compute_usd"], source=f"{path} {task} L={r['labels']} "
                  f"U={r['unlabeled']}") for r in rows]


def paper_pricing(task: str, path: str | os.PathLike = PARETO_CSV) -> Pricing:
    """The paper's own dollars for `task`: labels at its $/label, and compute $ = alpha L + beta U.

    alpha (teacher fine-tuning per label) and beta (pseudo-labelling plus 50 distillation epochs per
    input) are least squares, without intercept, over the task's U > 0 points of the paper's Pareto
    plot (compute $ = total $ - labels $, section 7.2). Annotation is priced at its labels only, as
    the paper's U = 0 points are (total $ = L x $/label).
    """
    rows = [r for r in read_pareto(path) if r["task"] == task]
    if not rows:
        tasks = sorted({r["task"] for r in read_pareto(path)})
        raise ValueError(f"cost profile 'paper' has the paper's costs for {', '.join(tasks)} only, not {task!r}")
    per_label = sum(r["labels_usd"] for r in rows) / sum(r["labels"] for r in rows)
    dist = [r for r in rows if r["unlabeled"] > 0]
    design = np.array([[r["labels"], r["unlabeled"]] for r in dist], dtype=float)
    (alpha, beta), *_ = np.linalg.lstsq(design, np.array([r["compute_usd"] for r in dist]), rcond=None)

    def price(strategy: str, labels: int, unlabeled: int) -> float:
        compute = alpha * labels + beta * unlabeled if strategies.get(strategy).uses_teacher else 0.0
        return labels * per_label + compute

    return Pricing(price, per_label, "paper", f"the paper's $ (section 7.2 fit): ${per_label:.3f}/label, compute "
                   f"${alpha * 1000:.2f} per 1K labels + ${beta * 1000:.2f} per 1K unlabeled inputs")


def planner_pricing(plan, usd_per_label: float, note: str) -> Pricing:
    """Prices from the FLOP planner (`planner.Planner`), phase by phase as a cell charges them."""
    def price(strategy: str, labels: int, unlabeled: int) -> float:
        s = strategies.get(strategy)
        if not s.uses_teacher:
            return labels * usd_per_label + plan.student_finetune_usd(labels)
        gold = labels if s.mixes_gold else 0
        return (labels * usd_per_label + plan.teacher_finetune_usd(labels) + plan.teacher_inference_usd(unlabeled)
                + plan.distill_usd(unlabeled + gold))

    return Pricing(price, usd_per_label, "mfu", note)


def pricing_for(card, profile_name: Optional[str], calibration_path: Optional[str], *, teacher: T5Config,
                student: T5Config, accelerator: Optional[str] = None, mfu: Optional[float] = None,
                **recipe: Any) -> Pricing:
    """The pricing callback for `card` under a cost profile, through the planner (`build_planner`):
    `paper` (the paper's accounting, fitted to its costs), `calibrated` (a `doa calibrate` file) or
    `mfu` (an assumed MFU, said so). None: `calibrated` when a calibration is given, else `paper`.
    `recipe` (epochs, batch size, soft targets: `build_planner`'s settings) prices the runs the
    advice is about as they will run; unset, the profile's recipe (the paper's runs) applies."""
    name = profile_name or cost_profiles.default_profile_name(calibration_path)
    profile = cost_profiles.load_profile(name, accelerator=accelerator if name == "mfu" else None,
                                         calibration=calibration_path, mfu=mfu)
    plan, lengths = planner.build_planner(card, teacher, student, profile, **recipe)
    fit = profile.as_dict(card.name).get("fit")
    pricing = planner_pricing(plan, card.annotation_cost_usd,
                              f"cost profile {name}: {profile.source}{'; ' + fit['note'] if fit else ''}; "
                              f"lengths: {lengths['source']}")
    return dataclasses.replace(pricing, profile=name)


# ---------------------------------------------------------------- plot

def _band(samples: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    q = (1 - level) / 2
    return np.quantile(samples, q, axis=0), np.quantile(samples, 1 - q, axis=0)


def _panel(ax, xs: np.ndarray, samples: np.ndarray, point_fit: np.ndarray, pilots: tuple[np.ndarray, np.ndarray],
           color: str, fit_label: str, level: float) -> float:
    """One curve with its band and pilots, clipped to the metric's range; returns the highest y drawn."""
    lo, hi = (np.clip(b, *METRIC_RANGE) for b in _band(samples, level))
    ax.fill_between(xs, lo, hi, color=color, alpha=0.2, label=f"{level:.0%} band (curve)")
    ax.plot(xs, np.clip(point_fit, *METRIC_RANGE), color=color, label=fit_label)
    ax.scatter(*pilots, color="k", zorder=3, s=18, label="pilots")
    return float(max(hi.max(), pilots[1].max()))


def _buys(ax, advice: Advice, o: Option, x: int, unit: str) -> float:
    """What the budget buys under one strategy: where it lands, and its predicted run interval; returns
    the interval's top."""
    lv = advice.level
    ax.axvline(x, color="gray", ls="--", lw=1, label=f"${advice.budget_usd:g} buys ({x:,} {unit})")
    chosen = advice.recommended is o
    ax.errorbar([x], [o.expected], yerr=[[o.expected - o.interval[0]], [o.interval[1] - o.expected]],
                fmt="*" if chosen else "D", ms=14 if chosen else 7, color="crimson" if chosen else "gray",
                capsize=4, zorder=4,
                label=("chosen" if chosen else "predicted") + f" {o.expected:.1f} ({lv:.0%} run interval)")
    return o.interval[1]


def _infeasible_note(ax, advice: Advice, strategy: str) -> None:
    """Says on the panel that the budget cannot buy this strategy, and why."""
    o = next((o for o in advice.options if o.strategy == strategy and not o.feasible), None)
    if o is not None:
        ax.text(0.03, 0.96, textwrap.fill(f"infeasible at +${advice.budget_usd:g}: {o.reason}", 44),
                transform=ax.transAxes, ha="left", va="top", fontsize=9, color="crimson", parse_math=False,
                bbox=dict(boxstyle="round", fc="white", ec="crimson", alpha=0.9), zorder=5)


def figure(advice: Advice):
    """The advice as a figure: both fitted curves with their bands (clipped to the metric's range
    [0, 100]), the pilots, what the budget buys and the chosen point; a panel whose strategy the
    budget cannot buy says so. matplotlib is imported here (Agg backend): only this picture needs it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    fit, L, lv = advice.fit, advice.start_labels, advice.level
    by = {o.strategy: o for o in advice.options if o.feasible and o.strategy != "mixed"}
    fig, (ax_a, ax_d) = plt.subplots(1, 2, figsize=(11, 4.4), sharey=True)
    n_a, u_d = fit.annotate_points[0], fit.distill_points[0]
    n_top = max(n_a.max(), L + by["annotate"].labels_bought if "annotate" in by else 0)
    n = np.geomspace(max(n_a.min() * 0.7, 1), n_top * 1.3, 120)
    top = _panel(ax_a, n, np.stack([fit.annotate_at(v) for v in n], axis=1), annotate_value(fit.annotate, n),
                 fit.annotate_points, "tab:blue", "fit: a - b n^-c", lv)
    u_top = max(u_d.max(), by["distill"].unlabeled if "distill" in by else 0)
    ex = np.geomspace(max(u_d.min() * 0.7, 1), u_top * 1.3, 120)
    top = max(top, _panel(ax_d, ex, np.stack([fit.distill_at(v) for v in ex], axis=1),
                          distill_value(fit.distill, fit.annotate, ex), fit.distill_points, "tab:orange",
                          "fit: a_D - b_D U^-c", lv))
    for ax, strategy in ((ax_a, "annotate"), (ax_d, "distill")):
        if strategy in by:
            o = by[strategy]
            x, unit = (L + o.labels_bought, "labels") if strategy == "annotate" else (o.unlabeled, "inputs")
            top = max(top, _buys(ax, advice, o, x, unit))
        _infeasible_note(ax, advice, strategy)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7.5, loc="lower right")
    ax_a.set_ylim(METRIC_RANGE[0], min(METRIC_RANGE[1], top * 1.08))
    ax_a.set_xlabel("labels n")
    ax_a.set_ylabel(report.metric_label(advice.metric))
    ax_a.set_title("annotate: metric vs labels")
    ax_d.set_xlabel("unlabeled inputs U")
    ax_d.set_title(f"distill: metric vs unlabeled inputs (teacher on {L:,} labels)")
    r = advice.recommended
    fig.suptitle(f"{advice.task}: +${advice.budget_usd:g} over {L:,} labels ({advice.cost_profile} prices) -> "
                 f"{r.name}, {r.expected:.1f} [{r.interval[0]:.1f}, {r.interval[1]:.1f}], P(best) {advice.p_best:.2f}",
                 fontsize=10)
    fig.tight_layout()
    return fig


def plot(advice: Advice, path: str | os.PathLike) -> str:
    """Writes `figure(advice)` as a PNG through `doa_jax.storage` (a local path or a URL such as gs://)."""
    import matplotlib.pyplot as plt

    fig = figure(advice)
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    storage.write_atomic(path, png.getvalue())
    return os.fspath(path)
