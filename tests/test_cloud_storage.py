"""Outputs on object stores (doa_jax.storage), against a local GCS emulator (gcsfs and TensorStore
pointed at it, see tests/gcs_helpers.py): the trainer's checkpoints, metrics and resume; `doa run`
cells of both arms killed and resumed; a sweep's files, results rows and ledgers; vocabularies and
task data read from gs://; what `doa convert`, `doa vocab build`, `doa data download` and `doa bench`
write; a bad bucket or missing credentials stopping each command before any compute (locks:
tests/test_locks.py; faults of the store: tests/test_faults.py; `scripts/tpu_vm.sh`: tests/test_tpu_vm.py).
"""
import json
import os
import pathlib
import subprocess
import sys
import time

import fsspec
import numpy as np
import pytest

from doa_jax import cli, storage
from doa_jax.checkpoints.tree import flatten
from doa_jax.experiment import costs, results, sweep
from doa_jax.progress import MetricsLog
import data_helpers
from gcs_helpers import BUCKET, gcs_emulator, ls

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gcs():
    with gcs_emulator() as env:
        yield env


# ----------------------------------------------------------------------------- memory://

def test_rows_appended_to_an_object_store_are_one_object_each_read_back_in_order():
    path = "memory://appends/results.jsonl"
    for key in ("a", "b", "c"):
        results.append_row(path, {"cell_key": key, "task": "t", "strategy": "annotate", "extra_budget_usd": 1.0,
                                  "metric": "f1", "value": 50.0})
    assert [r["cell_key"] for r in results.read_rows(path)] == ["a", "b", "c"]
    assert len(fsspec.filesystem("memory").ls("/appends/results.jsonl.rows")) == 3


# ----------------------------------------------------------------------------- the GCS emulator

def test_ledger_entries_survive_a_reopen_on_gcs(gcs):
    path = f"gs://{BUCKET}/ledger/cells/k/ledger.jsonl"
    ledger = costs.Ledger(path, measured_on=costs.get_accelerator("a100"))
    ledger.add_labels("labels", 10, 0.5)
    ledger.add_labels("labels", 10, 0.5)        # the same key again: charged once
    reopened = costs.Ledger(path, measured_on=costs.get_accelerator("a100"))
    assert list(reopened.entries) == ["labels"] and reopened.total() == pytest.approx(5.0)
    assert len(ls(path + ".rows")) == 1


def test_a_calibration_file_is_written_to_and_read_from_gcs(gcs):
    from doa_jax.experiment import calibration, cost_profiles

    record = {"format": cost_profiles.CALIBRATION_FORMAT, "date": "2026-11-29", "jax_version": "0",
              "device_kind": "cpu", "device_count": 1, "accelerator": "cpu", "task": "demo",
              "teacher": {"size": "t5_1_1_tiny", "params": 1}, "student": {"size": "t5_1_1_tiny", "params": 1},
              "lengths": {"inputs": 40, "targets": 48}, "batch_size": 8,
              "programs": {"teacher_train": {"examples_per_s": 8.0, "startup_s": 3.0}}}
    path = calibration.write_calibration(record, f"gs://{BUCKET}/calibrations/cpu.json")
    assert str(path).startswith("gs://") and ls(f"gs://{BUCKET}/calibrations") == ["cpu.json"]
    assert cost_profiles.read_calibration(f"gs://{BUCKET}/calibrations/cpu.json") == record


def test_a_ledger_off_process_zero_reads_the_entries_and_writes_none(gcs):
    path = f"gs://{BUCKET}/ledger_hosts/ledger.jsonl"
    costs.Ledger(path, measured_on=costs.get_accelerator("a100")).add_labels("labels", 10, 0.5)
    reader = costs.Ledger(path, measured_on=costs.get_accelerator("a100"), writable=False)
    reader.add_labels("more_labels", 4, 0.5)
    assert reader.total() == pytest.approx(7.0)          # its own entry counts in its budget...
    assert len(ls(path + ".rows")) == 1                  # ...but only process 0's entry is written


def test_metrics_rows_after_a_resumed_step_are_dropped_on_gcs(gcs):
    log = MetricsLog(f"gs://{BUCKET}/train/metrics.jsonl")
    for step in (1, 2, 3, 4):
        log.write({"step": step, "loss": 1.0 / step, "step_time_s": 0.5})
    assert log.drop_after(2) == pytest.approx(1.0)      # steps 3 and 4 ran 0.5 s each and are lost
    rows = [json.loads(line) for line in storage.read_appended(log.path).decode().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]


def test_tensorboard_events_written_to_gcs_are_the_bytes_written_locally(gcs, tmp_path, monkeypatch):
    from doa_jax import progress

    monkeypatch.setattr(progress.time, "time", lambda: 1700000000.0)    # same wall time in both files
    files = []
    for logdir in (tmp_path, f"gs://{BUCKET}/events"):
        writer = progress.EventWriter(logdir)
        writer.scalars(5, {"train/loss": 1.5})
        writer.close()
        files.append(writer.path.read_bytes())
    assert files[1] == files[0] and len(files[0]) > 50


class RowWriter:
    """Appends a row per cell through results.append_row (as run_cell does), without training."""

    def __init__(self):
        self.calls = []

    def __call__(self, cell):
        self.calls.append(cell.key())
        row = {"cell_key": cell.key(), "task": "demo", "strategy": cell.strategy, "start_labels": cell.start_labels,
               "extra_budget_usd": cell.extra_budget_usd, "seed": cell.seed, "metric": "f1", "value": 10.0,
               "status": "ok", "spent_total_usd": 0.5, "wall_seconds": 0.1}
        results.append_row(f"{cell.output_dir}/results.jsonl", row)
        return row


def test_a_sweep_on_gcs_writes_its_files_and_report_there_and_a_rerun_runs_no_finished_cell(gcs):
    out = f"gs://{BUCKET}/sweep"
    points, cells = sweep.load_sweep(["sweeps/demo.gin"], [f"OUTPUT_DIR = '{out}'", "GRID_SEEDS = [0]"])
    first = RowWriter()
    sweep.run_sweep(points, cells, runner=first, write_report=True, log=lambda s: None, config_gin="# grid\n")
    again = RowWriter()
    done = sweep.run_sweep(points, cells, runner=again, write_report=False, log=lambda s: None, config_gin="# grid\n")
    assert len(first.calls) == 6 and again.calls == [] and done.skipped == 6
    files = ls(out)
    assert {"config.gin", "sweep.json", "report.md"} <= set(files) and ".sweep.lock" not in files
    assert sum(f.startswith("plots/") and f.endswith(".png") for f in files) == 2    # the report's figures
    assert sum(f.startswith("results.jsonl.rows/") for f in files) == 6
    assert not pathlib.Path("gs:").exists()       # nothing went to a local folder named like the URL


def test_doa_run_on_a_missing_bucket_fails_before_any_compute_naming_the_path(gcs, capsys):
    argv = ["run", "--gin_file", "runs/experiment.gin", "--gin_file", "runs/demo_models.gin",
            "--gin_file", "experiments/demo_distill.gin", "--gin.OUTPUT_DIR=gs://no-such-bucket/run"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("doa run: error: cannot write the OUTPUT_DIR gs://no-such-bucket/run: ")
    assert err.count("\n") == 1 and "operative gin config" not in err


def test_doa_run_without_its_credentials_file_fails_naming_the_path_and_the_file(tmp_path):
    pytest.importorskip("gcsfs")
    env = {k: v for k, v in os.environ.items() if k not in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL")}
    env.update(GOOGLE_APPLICATION_CREDENTIALS=str(tmp_path / "missing.json"), GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false",
               PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "doa_jax", "run", "--gin_file", "runs/experiment.gin",
                           "--gin_file", "runs/demo_models.gin", "--gin_file", "experiments/demo_distill.gin",
                           "--gin.OUTPUT_DIR=gs://my-bucket/run"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("doa run: error: cannot write the OUTPUT_DIR gs://my-bucket/run: ")
    assert f"GOOGLE_APPLICATION_CREDENTIALS={tmp_path / 'missing.json'}" in proc.stderr


def test_a_vocabulary_and_task_data_are_read_from_gcs(gcs, tmp_path):
    from doa_jax.data import demo, jsonl, vocab as vocab_lib

    local = demo.build_vocab(tmp_path)
    url = f"gs://{BUCKET}/assets/demo_vocab.model"
    storage.write_atomic(url, local.path.read_bytes())
    remote = vocab_lib.load_vocab(url)
    assert remote.encode("protocol: add 5 ml water") == local.encode("protocol: add 5 ml water")
    data = f"gs://{BUCKET}/assets/train.jsonl"
    storage.write_atomic(data, '{"source": "a b", "target": "c"}\n{"source": "d", "target": "e f"}\n')
    assert jsonl.load_examples(data).examples == [{"source": "a b", "target": "c"}, {"source": "d", "target": "e f"}]


# The legacy checkpoint is ~100 small objects, which the emulator takes 10-30 s to upload here.
@pytest.mark.parametrize("kind", ["orbax", pytest.param("legacy", marks=pytest.mark.slow)])
def test_a_t5x_checkpoint_in_a_bucket_loads_as_it_does_from_disk(gcs, t5x_fixtures, kind):
    from doa_jax.checkpoints import detect_format, load_checkpoint, stored_vocab_size

    local = t5x_fixtures / kind / "checkpoint_0"
    url = f"gs://{BUCKET}/t5x_{kind}/checkpoint_0"
    fs, key = fsspec.core.url_to_fs(url)
    fs.pipe({f"{key}/{p.relative_to(local)}": p.read_bytes() for p in local.rglob("*")    # params only
             if p.is_file() and not p.relative_to(local).parts[0].startswith("state.")})
    assert detect_format(url) == f"t5x_{kind}"
    assert stored_vocab_size(url) == stored_vocab_size(local)     # read from the arrays' metadata
    want_config, want = load_checkpoint(local)
    got_config, got = load_checkpoint(url)
    assert got_config == want_config
    flat_want, flat_got = flatten(want), flatten(got)
    assert flat_got.keys() == flat_want.keys()
    assert all(np.array_equal(flat_got[k], flat_want[k]) for k in flat_want)


@pytest.mark.parametrize("max_shard_bytes", [2**30, 20_000])    # one safetensors file; sharded with an index
def test_an_hf_checkpoint_in_a_bucket_loads_as_it_does_from_disk(gcs, tmp_path, max_shard_bytes):
    from doa_jax.checkpoints import load_checkpoint, stored_vocab_size
    from doa_jax.checkpoints.hf import save_hf
    from doa_jax.checkpoints.tree import expected_shapes, unflatten
    from train_helpers import tiny_config

    config = tiny_config()
    rng = np.random.default_rng(0)
    params = unflatten({p: rng.standard_normal(shape, np.float32) for p, shape in expected_shapes(config).items()})
    files = save_hf(tmp_path / "hf", config, params, max_shard_bytes=max_shard_bytes)
    url = f"gs://{BUCKET}/hf_{max_shard_bytes}"
    fs, key = fsspec.core.url_to_fs(url)
    fs.pipe({f"{key}/{p.name}": p.read_bytes() for p in (tmp_path / "hf").iterdir()})
    want_config, want = load_checkpoint(tmp_path / "hf")
    got_config, got = load_checkpoint(url)
    assert got_config == want_config and (len(files) > 3) == (max_shard_bytes == 20_000)
    assert stored_vocab_size(url) == config.vocab_size
    assert all(np.array_equal(a, b) for a, b in zip(flatten(got).values(), flatten(want).values()))


# ----------------------------------------------------------------------------- convert, vocab, data, bench outputs

TOY_ROWS = "".join(json.dumps({"source": f"add {i} ml of buffer {i % 3}", "target": f"step {i}"}) + "\n"
                   for i in range(40))


@pytest.fixture
def toy_card(tmp_path, monkeypatch):
    """A task card `toy` whose one file is in tmp_path/data and served at its https URL (no network)."""
    import io
    import urllib.request

    from doa_jax.data import cards

    (tmp_path / "toy.toml").write_text(data_helpers.toy_card())
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "toy_all.jsonl").write_text(TOY_ROWS)
    monkeypatch.setattr(cards, "CARDS_DIR", tmp_path)
    pages = {"https://example.org/toy_all.jsonl": TOY_ROWS.encode()}
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: io.BytesIO(pages[url]))
    return tmp_path / "data"


def test_doa_convert_writes_a_checkpoint_to_gcs_that_loads_back(gcs):
    from doa_jax.api import init_params, size_config
    from doa_jax.checkpoints import load_checkpoint

    url = f"gs://{BUCKET}/converted/tiny"
    assert cli.main(["convert", "tiny", url, "--to", "hf", "--seed", "3"]) == 0
    config, params = load_checkpoint(url)
    want = flatten(init_params(size_config("tiny"), 3))
    assert config == size_config("tiny") and flatten(params).keys() == want.keys()
    assert all(np.array_equal(np.asarray(flatten(params)[k]), np.asarray(want[k])) for k in want)
    assert not pathlib.Path("gs:").exists()


def test_doa_vocab_build_writes_the_model_a_local_build_writes_to_gcs(gcs, toy_card, tmp_path, capsys):
    from doa_jax.data import vocab as vocab_lib

    url = f"gs://{BUCKET}/vocab/toy.model"
    args = ["vocab", "build", "--tasks", "toy", "--data-dir", str(toy_card), "--vocab-size", "60"]
    assert cli.main([*args, "--out", url]) == 0
    assert cli.main([*args, "--out", str(tmp_path / "toy.model")]) == 0
    assert ls(f"gs://{BUCKET}/vocab") == ["toy.model", "toy.vocab"]
    # the same pieces and scores (the .model also records the folder it was trained in)
    assert storage.path(f"gs://{BUCKET}/vocab/toy.vocab").read_bytes() == (tmp_path / "toy.vocab").read_bytes()
    remote, local = vocab_lib.load_vocab(url), vocab_lib.load_vocab(tmp_path / "toy.model")
    assert remote.vocab_size == local.vocab_size == 160
    assert all(remote.encode(line) == local.encode(line) for line in TOY_ROWS.splitlines())


def test_doa_data_download_puts_the_checked_file_in_a_bucket(gcs, toy_card, capsys):
    from doa_jax.data import jsonl

    folder = f"gs://{BUCKET}/data/toy"
    assert cli.main(["data", "download", "toy", "--data-dir", folder]) == 0
    assert f"toy: {folder}/toy_all.jsonl (40 examples)" in capsys.readouterr().out
    assert ls(folder) == ["toy_all.jsonl"]
    assert len(jsonl.load_examples(f"{folder}/toy_all.jsonl").examples) == 40


def test_doa_bench_rows_go_to_gcs_and_show_reads_them_back(gcs, capsys):
    url = f"gs://{BUCKET}/bench/rows.json"
    assert cli.main(["bench", "--parts", "decode", "--sizes", "tiny", "--decode-batch", "2", "--in-len", "4",
                     "--new-tokens", "2", "--reps", "1", "--no-scan", "--in-process", "--out", url]) == 0
    rows = json.loads(storage.path(url).read_text())
    assert [(r["part"], r["size"]) for r in rows] == [("decode", "tiny")] and rows[0]["examples_per_s"] > 0
    capsys.readouterr()
    assert cli.main(["bench", "--show", url]) == 0
    assert "tiny" in capsys.readouterr().out


@pytest.mark.parametrize("argv, what", [
    (["convert", "tiny", "gs://no-such-bucket/ckpt/tiny", "--to", "hf"], "DST folder gs://no-such-bucket/ckpt"),
    (["vocab", "build", "--tasks", "toy", "--out", "gs://no-such-bucket/v/toy.model"],
     "--out folder gs://no-such-bucket/v"),
    (["data", "download", "toy", "--data-dir", "gs://no-such-bucket/data"], "data folder gs://no-such-bucket/data"),
    (["bench", "--sizes", "tiny", "--in-process", "--out", "gs://no-such-bucket/b/rows.json"],
     "--out folder gs://no-such-bucket/b"),
])
def test_an_output_in_a_missing_bucket_fails_before_any_work_naming_the_path(gcs, toy_card, capsys, argv, what):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"doa {argv[0]}: error: cannot write the {what}: ") and err.count("\n") == 1


# ----------------------------------------------------------------------------- training on the emulator

@pytest.mark.slow   # ~38 s here, nearly all of it compiling the tiny model
def test_the_trainer_writes_checkpoints_and_metrics_to_gcs_and_resumes_from_them(gcs):
    from doa_jax.checkpoints.steps import TrainCheckpoints
    from doa_jax.trainer import Trainer
    from train_helpers import run_config, tiny_config, train_source

    model_dir = f"gs://{BUCKET}/trainer"
    Trainer(tiny_config(), run_config(model_dir, train_steps=2)).fit(train_source(16))
    result = Trainer(tiny_config(), run_config(model_dir, train_steps=3)).fit(train_source(16))
    assert result.step == 3
    assert TrainCheckpoints(f"{model_dir}/checkpoints").all_steps() == [2, 3]
    rows = [json.loads(line) for line in storage.read_appended(f"{model_dir}/metrics.jsonl").decode().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]      # the second run resumed at step 2
    assert not pathlib.Path("gs:").exists()


DEMO_CELL = ["--gin_file", "runs/experiment.gin", "--gin_file", "runs/demo_models.gin",
             "--gin_file", "experiments/demo_distill.gin", "--gin.TEACHER_EPOCHS=2", "--gin.STUDENT_EPOCHS=2",
             "--gin.DISTILL_EPOCHS=1", "--gin.MAX_EVAL_EXAMPLES=16",
             "--gin.CellConfig.demo_sizes={'labeled': 256, 'unlabeled': 64, 'test': 16}",
             "--gin.SOFT_TARGETS='stored'",          # the teacher's outputs go to a store (chunks on gs://)
             *(f"--gin.{m}/T5Size.num_{s}_layers=1" for m in ("teacher", "student") for s in ("encoder", "decoder"))]


@pytest.mark.slow
def test_doa_run_cells_of_both_arms_on_gcs_resume_after_a_kill(gcs, capsys):
    out = f"gs://{BUCKET}/cells"
    argv = ["run", *DEMO_CELL, f"--gin.OUTPUT_DIR={out}"]
    proc = subprocess.Popen([sys.executable, "-m", "doa_jax", *argv], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        deadline = time.time() + 300
        while not any(f.startswith("cache/teachers/") and f.endswith("/record.json") for f in ls(out)):
            assert proc.poll() is None, "the cell ended before its teacher was recorded"
            assert time.time() < deadline, "no fine-tuned teacher after 300 s"
            time.sleep(0.5)
        proc.kill()                      # after the teacher, before the cell's row
    finally:
        proc.kill()
        proc.wait()
    assert results.read_rows(f"{out}/results.jsonl") == []
    capsys.readouterr()
    assert cli.main(argv) == 0
    assert "reusing the fine-tuned teacher" in capsys.readouterr().out
    assert cli.main([*argv, "--gin.STRATEGY='annotate'"]) == 0
    rows = results.read_rows(f"{out}/results.jsonl")
    assert sorted(r["strategy"] for r in rows) == ["annotate", "distill"]
    files = ls(out)
    assert sum(f.startswith("results.jsonl.rows/") for f in files) == 2        # one row per cell
    assert any(f.startswith("cache/stores/") and f.endswith("/chunk_00000.COMPLETED") for f in files)
    for row in rows:
        assert f"cells/{row['cell_key']}/predictions.jsonl" in files
        assert any(f.startswith(f"cells/{row['cell_key']}/ledger.jsonl.rows/") for f in files)
        assert not any(f == f"cells/{row['cell_key']}/.lock" for f in files)
