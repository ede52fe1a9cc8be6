"""Task cards: one TOML file per task (`tasks/<name>.toml`) says everything the toolkit needs about it.

A card names the task's data files (per split, under a data directory) and the paper's download URLs,
the input prefix, the feature lengths (with the coverage they were chosen for), the label set of a
classification task, the metric, the annotation cost per label, and how to carve the four splits
(labeled pool `train`, unlabeled pool `unlabeled`, `validation`, `test`) out of a file when the
task has no separate file for a split. Adding a task is adding a card; nothing here branches on a
task's name.

Where the data lives: `data_dir` argument > `$DOA_DATA_DIR/<subdir>` > `<repo>/../shared/data/doa/
<subdir>` (when present) > `~/.cache/doa_jax/data/<subdir>` (where `doa data download` writes).
Imports no TensorFlow.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import tomllib
from typing import Any, Mapping

from doa_jax import metrics, storage

REPO = pathlib.Path(__file__).resolve().parents[2]
CARDS_DIR = REPO / "tasks"
SHARED_DATA = (REPO / ".." / "shared" / "data" / "doa").resolve()
CACHE_DATA = pathlib.Path(os.path.expanduser("~/.cache/doa_jax/data"))

SPLITS = ("train", "unlabeled", "validation", "test")  # train = the labeled pool
EMPTY_TARGET_POLICIES = ("error", "skip", "keep")


# A task name becomes part of paths (plots, data folders, output files): letters, digits, `_`, `-`.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


class CardError(ValueError):
    """A card that is missing a field or has a bad value; the message names the card file and field."""


@dataclasses.dataclass(frozen=True)
class Card:
    """One task, as its card describes it (see the module docstring and `tasks/README` in README.md)."""

    name: str
    path: pathlib.Path
    description: str
    input_prefix: str
    feature_lengths: Mapping[str, int]
    coverage: Mapping[str, Any]
    metric: str
    primary_metric: str
    annotation_cost_usd: float
    labels: tuple[str, ...]
    entity_types: tuple[str, ...]
    files: Mapping[str, str]
    urls: Mapping[str, str]
    subdir: str
    empty_targets: str
    carve_from: str | None
    pool_fractions: Mapping[str, float]
    pool_seed: int
    paper_invalid_label: str | None = None   # the label the released code gives out-of-label outputs (id 0)

    @property
    def is_classification(self) -> bool:
        return bool(self.labels)

    def score(self, predictions, references, *, sources=None, protocol: str = "efficient", **options) -> dict:
        """This task's metric on predictions vs references, in percent (see `doa_jax.metrics`);
        `protocol='paper'` scores as the released code does."""
        return metrics.compute(self.metric, predictions, references, labels=self.labels,
                               entity_types=self.entity_types, sources=sources, protocol=protocol,
                               invalid_label=self.paper_invalid_label, **options)

    def example_statistics(self, predictions, references, *, protocol: str = "efficient"):
        """Per-example statistics of this task's metric (`metrics.compute_statistics`): resamples of
        the examples scored by summing rows; None when the metric has none."""
        return metrics.compute_statistics(self.metric, predictions, references, labels=self.labels,
                                          entity_types=self.entity_types, protocol=protocol,
                                          invalid_label=self.paper_invalid_label)

    def data_dir(self, data_dir: str | os.PathLike | None = None) -> pathlib.Path:
        """The folder holding this task's files (see the module docstring for the search order)."""
        if data_dir is not None:
            return storage.path(data_dir)      # a local folder or a URL (gs://)
        root = os.environ.get("DOA_DATA_DIR")
        if root:
            return storage.path(root) / self.subdir
        if (SHARED_DATA / self.subdir).exists():
            return SHARED_DATA / self.subdir
        return CACHE_DATA / self.subdir

    def file_path(self, key: str, data_dir: str | os.PathLike | None = None) -> pathlib.Path:
        """Path of the file `files[key]`; a `.json` name also finds a `.jsonl` copy and vice versa."""
        if key not in self.files:
            raise CardError(f"{self.path}: [data] files has no {key!r} (it has {sorted(self.files)})")
        folder = self.data_dir(data_dir)
        path = folder / self.files[key]
        if path.exists():
            return path
        alt = path.with_suffix(".jsonl" if path.suffix == ".json" else ".json")
        if alt.exists():
            return alt
        raise FileNotFoundError(
            f"task {self.name}: data file {path} not found (split file {key!r} of {self.path.name}); "
            f"run `doa data download {self.name}`, or point DOA_DATA_DIR at a folder holding "
            f"{self.subdir}/{self.files[key]}"
        )


def _get(table: Mapping[str, Any], key: str, kind, where: str, default=dataclasses.MISSING):
    if key not in table:
        if default is dataclasses.MISSING:
            raise CardError(f"{where}: missing field {key!r}")
        return default
    value = table[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise CardError(f"{where}: field {key!r} must be {kind.__name__}, got {value!r}")
    return value


def _check_relative(value: str, where: str) -> str:
    """`value` as a path that stays inside its folder (relative, no `..`), else a CardError."""
    p = pathlib.PurePosixPath(value.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or (value[1:2] == ":"):
        raise CardError(f"{where}: {value!r} must be a relative path inside the data folder (no '..', "
                        f"not absolute)")
    return value


def parse_card(raw: Mapping[str, Any], path: pathlib.Path) -> Card:
    """Validates a parsed TOML table; errors name the card file and field."""
    where = str(path)
    name = _get(raw, "name", str, where)
    if not NAME_PATTERN.fullmatch(name):
        raise CardError(f"{where}: name {name!r} is not a safe task name (1-64 letters, digits, '_' or '-', "
                        f"starting with a letter or digit); it becomes part of file paths")
    lengths = _get(raw, "lengths", dict, where)
    feature_lengths = {}
    for feat in ("inputs", "targets"):
        n = _get(lengths, feat, int, f"{where} [lengths]")
        if n <= 0:
            raise CardError(f"{where} [lengths]: {feat} must be positive, got {n}")
        feature_lengths[feat] = n
    coverage = dict(lengths.get("coverage", {}))
    metric = _get(raw, "metric", str, where)
    if metric not in metrics.METRICS:
        raise CardError(f"{where}: metric {metric!r} is not one of {sorted(metrics.METRICS)}")
    cost = _get(raw, "annotation_cost_usd", float, where)
    if cost <= 0:
        raise CardError(f"{where}: annotation_cost_usd must be positive, got {cost}")
    labels = tuple(_get(raw, "labels", list, where, []))
    entity_types = tuple(_get(raw, "entity_types", list, where, []))
    for field, values in (("labels", labels), ("entity_types", entity_types)):
        if not all(isinstance(v, str) and v.strip() for v in values):
            raise CardError(f"{where}: {field} must be non-empty strings, got {list(values)!r}")
    if metrics.METRICS[metric].needs == "labels" and not labels:
        raise CardError(f"{where}: metric {metric!r} needs a `labels` list")
    if metrics.METRICS[metric].needs == "entity_types" and not entity_types:
        raise CardError(f"{where}: metric {metric!r} needs an `entity_types` list")

    data = _parse_data(raw, where, name)
    pools = _parse_pools(raw, where, data["files"])
    return Card(
        name=name,
        path=path,
        description=_get(raw, "description", str, where, ""),
        input_prefix=_get(raw, "input_prefix", str, where),
        feature_lengths=feature_lengths,
        coverage=coverage,
        metric=metric,
        primary_metric=_get(raw, "primary_metric", str, where),
        annotation_cost_usd=cost,
        labels=labels,
        entity_types=entity_types,
        **data,
        **pools,
        paper_invalid_label=_paper_invalid_label(raw, labels, where),
    )


def _parse_data(raw: Mapping[str, Any], where: str, name: str) -> dict[str, Any]:
    """The card's [data] table: files per key, their URLs, the folder and the empty-target policy."""
    data = _get(raw, "data", dict, where)
    dwhere = f"{where} [data]"
    files = dict(_get(data, "files", dict, dwhere))
    urls = dict(_get(data, "urls", dict, dwhere, {}))
    for table_name, table in (("files", files), ("urls", urls)):
        for k, v in table.items():
            if not isinstance(v, str) or not v:
                raise CardError(f"{dwhere}: {table_name}.{k} must be a non-empty string")
    for k, v in files.items():
        _check_relative(v, f"{dwhere}: files.{k}")
    unknown_urls = set(urls) - set(files)
    if unknown_urls:
        raise CardError(f"{dwhere}: urls {sorted(unknown_urls)} have no entry in files")
    empty_targets = _get(data, "empty_targets", str, dwhere, "error")
    if empty_targets not in EMPTY_TARGET_POLICIES:
        raise CardError(f"{dwhere}: empty_targets must be one of {EMPTY_TARGET_POLICIES}, got {empty_targets!r}")
    return dict(files=files, urls=urls, empty_targets=empty_targets,
                subdir=_check_relative(_get(data, "subdir", str, dwhere, name), f"{dwhere}: subdir"))


def _parse_pools(raw: Mapping[str, Any], where: str, files: Mapping[str, str]) -> dict[str, Any]:
    """The card's [pools] table: which splits are carved from which file, in what fractions."""
    pools = _get(raw, "pools", dict, where, {})
    pwhere = f"{where} [pools]"
    fractions = {k: float(v) for k, v in _get(pools, "fractions", dict, pwhere, {}).items()}
    carve_from = _get(pools, "carve_from", str, pwhere, None)
    bad = set(fractions) - set(SPLITS)
    if bad:
        raise CardError(f"{pwhere}: fractions for unknown splits {sorted(bad)} (splits: {SPLITS})")
    if fractions:
        if carve_from is None or carve_from not in files:
            raise CardError(f"{pwhere}: carve_from must name a key of [data] files, got {carve_from!r}")
        if any(f <= 0 for f in fractions.values()) or abs(sum(fractions.values()) - 1.0) > 1e-9:
            raise CardError(f"{pwhere}: fractions must be positive and sum to 1, got {fractions}")
    for split in SPLITS:
        from_file = split in files and split != carve_from
        carved = split in fractions
        if from_file == carved:
            raise CardError(
                f"{where}: split {split!r} must come from exactly one of [data] files or [pools] fractions"
                f" ({'both' if carved else 'neither'} given)"
            )
    return dict(carve_from=carve_from if fractions else None, pool_fractions=fractions,
                pool_seed=_get(pools, "seed", int, pwhere, 0))


def _paper_invalid_label(raw: Mapping[str, Any], labels: tuple[str, ...], where: str) -> str | None:
    """`paper_invalid_label`, which must be one of the card's labels (a classification card only)."""
    value = _get(raw, "paper_invalid_label", str, where, None)
    if value is not None and value not in labels:
        raise CardError(f"{where}: paper_invalid_label {value!r} is not one of labels {list(labels)}")
    return value


def load_card(name_or_path: str | os.PathLike, cards_dir: str | os.PathLike | None = None) -> Card:
    """A card by task name (looked up in `tasks/`) or by path to a `.toml` file."""
    if isinstance(name_or_path, Card):
        return name_or_path
    p = pathlib.Path(name_or_path)
    if p.suffix != ".toml":
        p = pathlib.Path(cards_dir or CARDS_DIR) / f"{name_or_path}.toml"
        if not p.exists():
            raise FileNotFoundError(
                f"no task card {p} (known tasks: {', '.join(card_names(cards_dir)) or 'none'})"
            )
    if not p.exists():
        raise FileNotFoundError(f"task card {p} not found")
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise CardError(f"{p}: not valid TOML ({e})") from None
    return parse_card(raw, p)


def card_names(cards_dir: str | os.PathLike | None = None) -> list[str]:
    """Names of the cards in `tasks/` (sorted)."""
    d = pathlib.Path(cards_dir or CARDS_DIR)
    return sorted(p.stem for p in d.glob("*.toml"))
