"""Every gin file under gin/ parses; run files declare and name their REQUIRED macros; T5X flags;
and the files for the real T5X use only names T5X defines."""
import functools
import pathlib
import re
import sys
import types

import gin
import pytest

from doa_jax import gin_utils
from doa_jax.experiment import sweep
from doa_jax.losses import LossConfig
from doa_jax.model import T5Config
from doa_jax.optimizers import OptimizerConfig
from doa_jax.partitioning import MeshConfig
from doa_jax.data.batches import CopyTaskData, TaskData
from doa_jax.trainer import TrainConfig

GIN = gin_utils.GIN_DIR
ALL_GIN_FILES = sorted(str(p.relative_to(GIN)) for p in GIN.rglob("*.gin"))

# ---------------------------------------------------------------------------------------------
# Names of the real T5X that gin/t5x/*.gin may use, transcribed from google-research/t5x
# (https://github.com/google-research/t5x, read at commit cc342d419ec3, 2026-04-21, the commit the
# ../shared T5X fixtures were made with): the module, the configurable, the file that defines it,
# and its parameters (the signature; dataclass fields in order, all of them).
T5X_CONFIGURABLES = {
    "t5x.partitioning": {
        "PjitPartitioner": ("t5x/partitioning.py", "num_partitions=None, model_parallel_submesh=None, "
                            "params_on_devices=True, backend=None, ici_mesh_shape=None, dcn_mesh_shape=None, "
                            "logical_axis_rules=None"),
        "standard_logical_axis_rules": ("t5x/partitioning.py", "activation_partitioning_dims=1, "
                                        "parameter_partitioning_dims=1, additional_rules=None"),
    },
    "t5x.utils": {
        "DatasetConfig": ("t5x/utils.py", "mixture_or_task_name, task_feature_lengths, split, batch_size, "
                          "shuffle, seed, use_cached=False, pack=False, use_custom_packing_ops=False, "
                          "module=None, use_memory_cache=True, trim_output_features=True, "
                          "runtime_preprocessors=None, num_prefetch_threads=None, num_workers=0"),
        "SaveCheckpointConfig": ("t5x/utils.py", "dtype='float32', period=None, checkpoint_steps=None, keep=None, "
                                 "keep_dataset_checkpoints=None, save_dataset=False, checkpointer_cls=None, "
                                 "state_transformation_fns=(), checkpoint_manager_cls=None"),
        "RestoreCheckpointConfig": ("t5x/utils.py", "path, mode='latest', assignment_map=None, strict=True, "
                                    "fallback_to_scratch=False, dtype=None, restore_dataset=False, "
                                    "checkpointer_cls=None, state_transformation_fns=(), "
                                    "checkpoint_manager_cls=None"),
        "CheckpointConfig": ("t5x/utils.py", "save=None, restore=None"),
        "create_learning_rate_scheduler": ("t5x/utils.py", "factors='constant * linear_warmup * rsqrt_decay', "
                                           "base_learning_rate=0.5, warmup_steps=1000, decay_factor=0.5, "
                                           "steps_per_decay=20000, steps_per_cycle=100000, step_offset=0, "
                                           "min_learning_rate=1e-8"),
    },
    "t5x.optimizers": {"chain": ("t5x/optimizers.py", "transformations")},
    "t5x.losses": {"convert_special_loss_normalizing_factor_to_enum": ("t5x/losses.py", "x")},
    "t5x.models": {"EncoderDecoderModel.predict_batch_with_aux": (
        "t5x/models.py", "self, params, batch, rng=None, decoder_params=None, return_all_decodes=False, "
                         "num_decodes=1, prompt_with_targets=False")},
    # `python -m t5x.infer` runs t5x/infer.py as __main__ (`import __main__ as infer_script`).
    "__main__": {
        "infer": ("t5x/infer.py", "*, mode, model, dataset_cfg, restore_checkpoint_cfg, partitioner, output_dir, "
                  "checkpoint_period, shard_id=0, num_shards=1, merge_chunked_results=True, write_fn=None, "
                  "checkpoint_ds_iter=True, train_state_initializer_cls=None, fallback_init_rng=None, "
                  "merge_fn=None, summarize_config_fn=None, verify_matching_vocabs_fn=None, "
                  "output_vocab_feature_name='targets', file_extension='jsonl', keep_aux_as_numpy=False, "
                  "use_orbax=False"),
        "write_inferences_to_file": ("t5x/infer.py", "path, inferences, task_ds, mode, vocabulary=None, "
                                     "json_encoder_cls=None, include_all_inputs=False, "
                                     "input_fields_to_include=None, output_ids=False"),
    },
}
# Macros each T5X gin file defines (xxl.gin etc. include base.gin). infer.gin has no split macro:
# its split is the binding `utils.DatasetConfig.split` (default 'test').
_BASE_MACROS = ("Z_LOSS", "LABEL_SMOOTHING", "LOSS_NORMALIZING_FACTOR", "DROPOUT_RATE", "VOCABULARY",
                "OPTIMIZER", "MODEL")
T5X_GIN_FILES = {
    "t5x/configs/runs/finetune.gin": (
        "MODEL_DIR", "MIXTURE_OR_TASK_NAME", "TASK_FEATURE_LENGTHS", "MIXTURE_OR_TASK_MODULE", "TRAIN_STEPS",
        "INITIAL_CHECKPOINT_PATH", "DROPOUT_RATE", "USE_CACHED_TASKS", "BATCH_SIZE", "EVAL_STEPS", "EVAL_PERIOD",
        "EVALUATOR_USE_MEMORY_CACHE", "EVALUATOR_NUM_EXAMPLES", "JSON_WRITE_N_RESULTS", "USE_HARDWARE_RNG",
        "RANDOM_SEED", "TRAIN_STEPS_RELATIVE"),
    "t5x/configs/runs/infer.gin": (
        "MIXTURE_OR_TASK_NAME", "TASK_FEATURE_LENGTHS", "CHECKPOINT_PATH", "INFER_OUTPUT_DIR",
        "MIXTURE_OR_TASK_MODULE"),
    **{f"t5x/examples/t5/t5_1_1/{size}.gin": _BASE_MACROS for size in ("small", "base", "large", "xl", "xxl")},
}
# This project's own modules that the T5X files import (for their SeqIO tasks).
PROJECT_IMPORTS = {"doa_jax.data.seqio_tasks"}


@functools.lru_cache(maxsize=None)   # one set per session: gin registers each function once
def _fake_t5x_modules() -> dict[str, types.ModuleType]:
    """Stand-in modules whose only attributes are the transcribed names, with their signatures."""
    modules = {"t5x": types.ModuleType("t5x")}
    for name, entries in T5X_CONFIGURABLES.items():
        mod = modules.setdefault(name, types.ModuleType(name))
        for attr, (_, signature) in entries.items():
            if "." in attr:
                cls, method = attr.split(".")
                exec(f"class {cls}:\n    def {method}({signature}):\n        pass", mod.__dict__)
            else:
                exec(f"def {attr}({signature}):\n    pass", mod.__dict__)
        if name.startswith("t5x."):
            setattr(modules["t5x"], name.split(".", 1)[1], mod)
    return modules


def _t5x_stand_in_includes(root: pathlib.Path) -> None:
    """Include files named like T5X's, defining (only) the macros the real ones define."""
    for rel, macros in T5X_GIN_FILES.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"{m} = None\n" for m in macros))


def _parse_t5x_file(rel: str, tmp_path, monkeypatch) -> str:
    for name, module in _fake_t5x_modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    _t5x_stand_in_includes(tmp_path)
    text = (GIN / rel).read_text()
    gin.clear_config()
    for path in (tmp_path, GIN):
        if str(path) not in gin.config._LOCATION_PREFIXES:
            gin.add_config_file_search_path(str(path))
    try:
        gin.parse_config_file(str(GIN / rel))
    finally:
        gin.clear_config()
        gin.config._LOCATION_PREFIXES.remove(str(tmp_path))
    return text


# ---------------------------------------------------------------------------------------------
RUN_BINDINGS = ["MODEL_DIR = '/tmp/doa_gin_test'", "TASK = 'fever'", "TASK_FEATURE_LENGTHS = None",
                "VOCABULARY = '/tmp/spiece.model'", "BATCH_SIZE = 32", "TRAIN_STEPS = None", "EPOCHS = 20",
                "INITIAL_CHECKPOINT_PATH = None"]


# Values for the macros a sweep file leaves %gin.REQUIRED (the user sets them).
SWEEP_REQUIRED = {"OUTPUT_DIR": "/tmp/doa_gin_test", "VOCABULARY": "/tmp/spiece.model", "TEACHER_CHECKPOINT": None,
                  "STUDENT_CHECKPOINT": None, "GRID_TASKS": ["wlp"], "GRID_START_LABELS": [1000],
                  "GRID_BUDGETS_USD": [100], "STUDENT_SIZE": "small", "TEACHER_SIZE": "xxl"}


def _parse_sweep_file(rel: str) -> None:
    """A sweep file (or runs/sweep.gin) parses and its grid expands into one CellConfig per point."""
    required, text = gin_utils.required_macros([rel]), (GIN / rel).read_text()
    bindings = [f"{m} = {v!r}" for m, v in SWEEP_REQUIRED.items()
                if m in required and not re.search(rf"^{m}\s*=(?!\s*%gin\.REQUIRED)", text, re.M)]
    gin_utils.parse([rel], bindings, finalize=False)
    points = gin_utils.macro("GRID").points()
    assert points and len(sweep.cells_from_gin(points)) == len(points)


CELL_BINDINGS = {"TASK": "wlp", "START_LABELS": 1000, "EXTRA_BUDGET_USD": 100, "STRATEGY": "distill",
                 "OUTPUT_DIR": "/tmp/doa_gin_test", "VOCABULARY": None}


def _parse_cell_file(rel: str) -> None:
    """A cell's run file, its demo models or an experiment file (macros only) builds a CellConfig."""
    from doa_jax.experiment import CellConfig

    files = ["runs/experiment.gin"] + ([rel] if rel != "runs/experiment.gin" else [])
    if rel.startswith("experiments/demo"):
        files.insert(1, "runs/demo_models.gin")
    text = "".join((GIN / f).read_text() for f in files[1:])
    bindings = [f"{m} = {v!r}" for m, v in CELL_BINDINGS.items() if not re.search(rf"^{m}\s*=", text, re.M)]
    gin_utils.parse(files, bindings)
    cell = gin_utils.macro("CELL")
    assert isinstance(cell, CellConfig) and isinstance(cell.teacher, T5Config)
    if rel.startswith("experiments/"):  # experiment files set only macros
        assert all(re.match(r"[A-Z_]+ = ", line) for line in (GIN / rel).read_text().splitlines()
                   if line.strip() and not line.startswith("#"))


@pytest.mark.parametrize("rel", ALL_GIN_FILES)
def test_every_gin_file_parses(rel, tmp_path, monkeypatch):
    kind = rel.split("/")[0]
    if kind == "models":
        gin_utils.parse([rel])
        assert isinstance(gin_utils.macro("MODEL_CONFIG"), T5Config)
    elif kind == "sweeps" or rel == "runs/sweep.gin":
        _parse_sweep_file(rel)
    elif kind == "experiments" or rel in ("runs/experiment.gin", "runs/demo_models.gin"):
        _parse_cell_file(rel)
    elif kind == "protocols":   # included after runs/experiment.gin; the cell names its protocol
        _parse_cell_file(rel)
        assert gin_utils.macro("CELL").protocol == rel.split("/")[1].removesuffix(".gin")
    elif kind == "runs":
        gin_utils.parse(["models/t5_1_1_tiny.gin", rel],
                        ["MODEL_DIR = '/tmp/doa_gin_test'"] if rel == "runs/smoke.gin" else RUN_BINDINGS)
        train = gin_utils.macro("TRAIN_CONFIG")
        assert isinstance(train, TrainConfig) and isinstance(train.optimizer, OptimizerConfig)
        assert isinstance(train.loss, LossConfig) and isinstance(train.mesh, MeshConfig)
        assert isinstance(gin_utils.macro("TRAIN_DATA"), (TaskData, CopyTaskData))
        assert isinstance(gin_utils.macro("EVAL_DATA"), (TaskData, CopyTaskData))
    elif kind == "t5x":
        _parse_t5x_file(rel, tmp_path, monkeypatch)
    else:
        pytest.fail(f"gin/{rel}: no parse rule for gin files under gin/{kind}/ (add one here)")


def test_finetune_gin_builds_the_papers_settings_from_macros():
    gin_utils.parse(["models/t5_1_1_small.gin", "runs/finetune.gin"],
                    RUN_BINDINGS + ["OPTIMIZER = 'adamw'", "LEARNING_RATE = 3e-5",
                                    "LOSS_NORMALIZING_FACTOR = 'NUM_REAL_TARGET_TOKENS'"])
    train, model = gin_utils.macro("TRAIN_CONFIG"), gin_utils.macro("MODEL_CONFIG")
    assert (train.epochs, train.train_steps, train.batch_size) == (20, None, 32)
    assert (train.optimizer.name, train.optimizer.learning_rate) == ("adamw", 3e-5)
    assert train.loss == LossConfig(z_loss=1e-4, loss_normalizing_factor="NUM_REAL_TARGET_TOKENS")
    assert model.dropout_rate == 0.1          # finetune.gin's DROPOUT_RATE, after the model file
    data = gin_utils.macro("TRAIN_DATA")
    assert (data.task, data.split, data.vocab) == ("fever", "train", "/tmp/spiece.model")
    assert gin_utils.macro("EVAL_DATA").split == "validation"


def test_missing_required_macro_is_named_with_its_file_and_line():
    lines = (GIN / "runs/finetune.gin").read_text().splitlines()
    line = 1 + next(i for i, s in enumerate(lines) if s.startswith("BATCH_SIZE = %gin.REQUIRED"))
    bindings = [b for b in RUN_BINDINGS if not b.startswith("BATCH_SIZE")]
    with pytest.raises(ValueError, match=rf"gin macro not set: BATCH_SIZE \(required by gin/runs/finetune.gin:{line}\)"):
        gin_utils.parse(["models/t5_1_1_tiny.gin", "runs/finetune.gin"], bindings)


def test_an_output_folder_named_like_a_gin_folder_does_not_break_includes(tmp_path, monkeypatch):
    # `doa sweep` writes runs/<name>/ in the cwd, which is on sys.path (`python -m`, PYTHONPATH=$PWD);
    # gin then took `include 'runs/sweep.gin'` for a file of a Python package `runs` and crashed.
    (tmp_path / "runs" / "demo_sweep").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    _, cells = sweep.load_sweep(["sweeps/demo.gin"], [f"OUTPUT_DIR = '{tmp_path / 'out'}'"])
    assert len(cells) == 12


def test_t5x_style_flags_become_bindings():
    argv = ["--gin_file", "runs/finetune.gin", "--gin.MODEL_DIR=/tmp/run", "--gin.BATCH_SIZE=32",
            "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 8}", "--gin.TRAIN_CONFIG=@TrainConfig()",
            "--gin.TASK='fever'", "--gin.EPOCHS", "20"]
    assert gin_utils.rewrite_gin_args(argv) == [
        "--gin_file", "runs/finetune.gin",
        "--gin_bindings", "MODEL_DIR = '/tmp/run'", "--gin_bindings", "BATCH_SIZE = 32",
        "--gin_bindings", "TASK_FEATURE_LENGTHS = {'inputs': 64, 'targets': 8}",
        "--gin_bindings", "TRAIN_CONFIG = @TrainConfig()", "--gin_bindings", "TASK = 'fever'",
        "--gin_bindings", "EPOCHS = 20"]
    with pytest.raises(ValueError, match="not a gin macro or parameter name"):
        gin_utils.binding("A B", "1")


def test_operative_config_is_written_into_the_model_dir(tmp_path):
    gin_utils.parse(["models/t5_1_1_tiny.gin", "runs/smoke.gin"], [f"MODEL_DIR = '{tmp_path}'"])
    gin_utils.macro("TRAIN_CONFIG")
    path = gin_utils.write_operative_config(tmp_path)
    text = path.read_text()
    assert path == tmp_path / "config.gin"
    flat = " ".join(text.replace("\\\n", " ").split())    # gin wraps a long binding over two lines
    assert f"MODEL_DIR = '{tmp_path}'" in flat and "TrainConfig.batch_size = %BATCH_SIZE" in text


def _macros_in_scope(rel: str) -> set[str]:
    """Macros defined by a file's includes: T5X's (transcribed) or this project's t5x files."""
    text = (GIN / rel).read_text()
    defined = set()
    for inc in re.findall(r"""^include\s+['"]([^'"]+)['"]""", text, re.M):
        if inc in T5X_GIN_FILES:
            defined |= set(T5X_GIN_FILES[inc])
        else:
            assert (GIN / inc).is_file(), f"{rel} includes {inc}, neither a T5X file nor one of ours"
            defined |= _macros_in_scope(inc) | set(re.findall(r"^([A-Z][A-Z0-9_]*)\s*=", (GIN / inc).read_text(), re.M))
    return defined


@pytest.mark.parametrize("rel", [f for f in ALL_GIN_FILES if f.startswith("t5x/")])
def test_t5x_files_use_only_real_t5x_names(rel, tmp_path, monkeypatch):
    text = _parse_t5x_file(rel, tmp_path, monkeypatch)   # unknown configurables/params fail to parse
    includes = re.findall(r"""^include\s+['"]([^'"]+)['"]""", text, re.M)
    assert any(i in T5X_GIN_FILES for i in includes) or any((GIN / i).is_file() for i in includes), includes
    defined = _macros_in_scope(rel)
    assigned = set(re.findall(r"^([A-Z][A-Z0-9_]*)\s*=", text, re.M))
    referenced = set(re.findall(r"%([A-Z][A-Z0-9_]*)", text))
    assert assigned - defined == set(), f"{rel} sets macros T5X does not define: {assigned - defined}"
    assert referenced - defined == set(), f"{rel} uses undefined macros: {referenced - defined}"
    imports = set(re.findall(r"^import\s+([\w.]+)", text, re.M)) - {"seqio", "optax"}
    imports |= {f"t5x.{m}" for m in re.findall(r"^from t5x import (\w+)", text, re.M)}
    for name in imports:
        assert name in T5X_CONFIGURABLES or name in PROJECT_IMPORTS, name


def _bindings(text: str) -> list[tuple[str, str]]:
    """(configurable, parameter) of every binding in a gin text, block form (`a.B:` + indented
    `param = ...`) and one-line form (`a.B.param = ...`), scopes (`train/`) dropped."""
    pairs, block = [], None
    for line in text.splitlines():
        code = line.split("#", 1)[0].rstrip()
        if not code.strip():
            continue
        if m := re.match(r"^(?:\w+/)?([\w.]+):$", code):
            block = m.group(1)
        elif block and (m := re.match(r"^\s+(\w+)\s*=", code)):
            pairs.append((block, m.group(1)))
        elif m := re.match(r"^(?:\w+/)?([a-z_][\w]*(?:\.\w+)+)\.(\w+)\s*=", code):
            pairs.append((m.group(1), m.group(2)))
            block = None
        else:
            block = None
    return pairs


def _t5x_parameters() -> dict[str, set[str]]:
    """{'utils.DatasetConfig': {'split', ...}, 'infer_script.infer': {...}} as the gin files spell them."""
    alias = {"__main__": "infer_script"}
    names = {}
    for module, entries in T5X_CONFIGURABLES.items():
        prefix = alias.get(module, module.removeprefix("t5x."))
        for attr, (_, signature) in entries.items():
            params = {p.split("=")[0].strip() for p in signature.split(",")} - {"*", "self", ""}
            names[f"{prefix}.{attr}"] = params
    return names


@pytest.mark.parametrize("rel", [f for f in ALL_GIN_FILES if f.startswith("t5x/")])
def test_every_t5x_binding_names_a_parameter_t5x_defines(rel):
    text = (GIN / rel).read_text()
    known = _t5x_parameters()
    pairs = _bindings(text)
    assert pairs, f"{rel}: no bindings found"
    for configurable, param in pairs:
        if configurable.split(".")[0] in ("seqio", "optax"):
            continue  # real, importable libraries: gin checks these names when the file parses
        assert configurable in known, f"{rel}: {configurable} is not a T5X configurable in the list"
        assert param in known[configurable], f"{rel}: T5X's {configurable} has no parameter {param!r}"


def test_infer_gin_labels_the_unlabeled_split():
    """T5X's infer reads the split from `utils.DatasetConfig.split` only (infer.gin sets 'test')."""
    text = (GIN / "t5x/infer_teacher.gin").read_text()
    assert ("utils.DatasetConfig", "split") in _bindings(text)
    assert re.search(r"^utils\.DatasetConfig\.split = 'unlabeled'$", text, re.M)
