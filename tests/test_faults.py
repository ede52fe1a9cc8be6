"""A distill cell (`doa run`, tiny models, teacher outputs in the teacher store) that meets a fault of
its store or disk, against the same cell run once without one:
- a flaky object store (the GCS emulator failing with 429/503, connection resets before and after it
  acted, stalls) in the checkpoint, teacher-store, ledger, results and report writes and reads: the
  faults are retried with backoff and the cell ends with the reference's row, predictions and ledger;
- a permanent fault (403 on the results row, a bucket gone): `doa run` stops with one line naming the
  object, what was written before stays, and the rerun once the fault is gone does not redo it;
- a full disk (ENOSPC) in a teacher-store chunk, a student checkpoint and the results row: one line
  each time, no temporary file left, the checkpoint before and the rows written before intact, and
  the rerun after space is freed resumes and ends as the reference.
The storage layer alone (fast): transient faults retried with backoff, others one line naming the
path; a failed write leaves the old file and no temporary one; a killed writer's is removed later.
(Kills: tests/test_chaos.py and tests/test_resume.py; locks: tests/test_locks.py.)"""
import builtins
import contextlib
import errno
import io
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import pytest

from doa_jax import cli, storage
from doa_jax.checkpoints.steps import TrainCheckpoints
from doa_jax.experiment import results

CELL = ["run", "--gin_file", "runs/experiment.gin", "--gin_file", "runs/demo_models.gin",
        "--gin_file", "experiments/demo_distill.gin", "--gin.TEACHER_EPOCHS=1", "--gin.STUDENT_EPOCHS=1",
        "--gin.DISTILL_EPOCHS=1", "--gin.MAX_EVAL_EXAMPLES=16", "--gin.SOFT_TARGETS='stored'",
        "--gin.CellConfig.demo_sizes={'labeled': 64, 'unlabeled': 96, 'test': 16}",
        "--gin.cell/TrainConfig.checkpoint_every=1", "--gin.cell/TrainConfig.keep_checkpoints=2",
        *(f"--gin.{m}/T5Size.num_{s}_layers=1" for m in ("teacher", "student") for s in ("encoder", "decoder"))]
MEASURED = ("wall_seconds", "measured_usd", "output")     # the clock's, and the run's own folder


def _run(out, capsys, *extra) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli.main([*CELL, f"--gin.OUTPUT_DIR='{out}'", *extra])
    got = capsys.readouterr()
    return code, got.out, got.err


def _cell(out) -> dict:
    """The cell's row (without what the clock measures), predictions and charged ledger entries."""
    [row] = results.read_rows(f"{out}/results.jsonl")
    key = row["cell_key"]
    ledger = [json.loads(line) for line in storage.read_appended(f"{out}/cells/{key}/ledger.jsonl").decode().splitlines()]
    return {"row": {k: v for k, v in row.items() if k not in MEASURED},
            "predictions": storage.read_bytes(f"{out}/cells/{key}/predictions.jsonl"),
            "charged": _charged(ledger)}


def _charged(ledger: list[dict]) -> list[tuple]:
    """(phase, $ charged, FLOPs) of each entry but the compute kills undid (keys are left out: a
    teacher's hashes the demo vocabulary's file, which records the folder it was built in)."""
    return sorted((e["phase"], e["usd"], e["flops"]) for e in ledger if not e["key"].startswith("lost:"))


# ----------------------------------------------------------------------------- the storage layer alone

def test_transient_faults_are_retried_with_backoff_and_others_raise_one_line_naming_the_path(monkeypatch, capsys):
    from doa_jax import faults

    waits = []
    monkeypatch.setattr(faults.time, "sleep", waits.append)
    answers = iter([ConnectionResetError(104, "Connection reset by peer"), TimeoutError("timed out"), b"ok"])

    def flaky():
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert storage.retrying("read", "gs://b/x", flaky) == b"ok"
    assert len(waits) == 2 and 0.5 <= waits[0] <= 1.0 and 1.0 <= waits[1] <= 2.0       # backoff, jittered
    assert capsys.readouterr().err == ("storage: read gs://b/x failed (ConnectionResetError: [Errno 104] Connection "
                                       "reset by peer); retrying with backoff for up to 300 s\n")

    def forbidden():
        raise OSError("Forbidden: https://storage.googleapis.com/upload/storage/v1/b/b/o\nno storage.objects.create")

    with pytest.raises(storage.StorageError) as refused:
        storage.retrying("write", "gs://b/x", forbidden)
    assert str(refused.value) == "cannot write gs://b/x: HTTP 403 Forbidden (no storage.objects.create)"
    def unavailable():
        raise _Http503("Service Unavailable, 503")

    monkeypatch.setenv("DOA_STORAGE_RETRY_S", "0")           # no time left to retry
    with pytest.raises(storage.StorageError) as gave_up:
        storage.retrying("read", "gs://b/x", unavailable)
    assert str(gave_up.value) == ("cannot read gs://b/x: _Http503: Service Unavailable, 503 (still failing after 0 s "
                                  "of retries)")


class _Http503(Exception):
    """gcsfs's HttpError for a 503: its status in `code`."""
    code = 503


def test_a_failed_write_leaves_the_old_file_and_no_temporary_one_and_a_killed_writers_is_removed(tmp_path, monkeypatch):
    target = tmp_path / "record.json"
    target.write_text("old")
    with disk_full(monkeypatch, "record.json"):
        with pytest.raises(storage.StorageError, match=rf"cannot write {target}: no space left on device \(ENOSPC\)"):
            storage.write_atomic(target, "new")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["record.json"]
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    (tmp_path / "sub").mkdir()
    left = tmp_path / "sub" / f"chunk_00001.npz.{host}-{dead.stdout.strip()}.doa-tmp"     # a writer killed mid-write
    live = tmp_path / f"results.jsonl.{host}-{os.getpid()}.doa-tmp"                       # one at work now
    other = tmp_path / f"x.json.tpu-worker-3-{dead.stdout.strip()}.doa-tmp"               # another host's
    for p in (left, live, other):
        p.write_text("half")
    assert storage.clean_orphans(tmp_path) == [left]
    assert live.exists() and other.exists() and not left.exists()


NO_CREDENTIALS = ("GOOGLE_APPLICATION_CREDENTIALS", "STORAGE_EMULATOR_HOST", "GCE_METADATA_HOST", "CLOUDSDK_CONFIG")


@pytest.mark.skipif(storage._on_google_cloud(), reason="a Google Cloud VM has its service account's credentials")
@pytest.mark.parametrize("argv", [["report", "gs://doa-no-bucket/run"],
                                  ["plan", "--task", "wlp", "--start-labels", "10", "--budget", "1",
                                   "--calibration", "gs://doa-no-bucket/cal.json"]])
def test_a_gs_path_without_credentials_fails_in_seconds_with_one_line(tmp_path, argv):
    env = {k: v for k, v in os.environ.items() if k not in NO_CREDENTIALS}
    env.update(HOME=str(tmp_path), PYTHONPATH=str(pathlib.Path(__file__).resolve().parents[1]))
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "doa_jax", *argv], env=env, capture_output=True, text=True,
                          timeout=60)
    elapsed = time.monotonic() - start
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"doa {argv[0]}: error: no Google Cloud credentials for gs://doa-no-bucket/")
    assert "gcloud auth application-default login" in proc.stderr
    assert elapsed < 20     # it took 51-55 s and a 55-line gcsfs traceback (the metadata server probed, retried)


def test_credentials_from_a_key_file_or_gcloud_login_pass_the_check(tmp_path, monkeypatch):
    for k in NO_CREDENTIALS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(storage, "_on_google_cloud", lambda: False)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path))
    with pytest.raises(ValueError, match=r"^no Google Cloud credentials for gs://b/x: set GOOGLE_APPLICATION_CRED"):
        storage.check_credentials("gs://b/x")
    storage.check_credentials("memory://b/x")                  # only gs:// needs Google's credentials
    (tmp_path / "application_default_credentials.json").write_text("{}")
    storage.check_credentials("gs://b/x")                      # `gcloud auth application-default login`
    (tmp_path / "application_default_credentials.json").unlink()
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "key.json"))
    storage.check_credentials("gs://b/x")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("reference")
    assert cli.main([*CELL, f"--gin.OUTPUT_DIR='{out}'"]) == 0
    return _cell(out)


# ----------------------------------------------------------------------------- a flaky object store

# Transient faults, each a few times, in every class of the cell's writes and reads (object names
# as the emulator sees them; TensorStore's checkpoint arrays and Orbax's metadata alike).
WRITES = [{"match": r"insert \S+/checkpoints/", "fault": "503", "times": 3},
          {"match": r"insert \S+/checkpoints/", "fault": "reset_after", "times": 2, "after": 5},
          {"match": r"insert \S+/stores/\S+/chunk_", "fault": "reset", "times": 2},
          {"match": r"insert \S+/stores/\S+/chunk_", "fault": "slow:1", "times": 1, "after": 2},
          {"match": r"insert \S+/ledger\.jsonl\.rows/", "fault": "reset_after", "times": 1},
          {"match": r"insert \S+/ledger\.jsonl\.rows/", "fault": "429", "times": 1, "after": 1}]
# ... and on the rerun, which reads what the first run wrote, then writes the row and the report.
READS = [{"match": r"GET (get|download) \S+/teachers/\S+/checkpoints/", "fault": "429", "times": 2},
         {"match": r"GET (get|download) \S+/stores/", "fault": "503", "times": 2},
         {"match": r"GET ls \S+", "fault": "reset", "times": 1},
         {"match": r"insert \S+/results\.jsonl\.rows/", "fault": "503", "times": 1},
         {"match": r"insert \S+/report\.md", "fault": "429", "times": 1},
         {"match": r"insert \S+/plots/", "fault": "reset_after", "times": 1}]


@pytest.fixture(scope="module")
def flaky(tmp_path_factory):
    from gcs_helpers import BUCKET, FaultPlan, gcs_emulator

    plan = FaultPlan(tmp_path_factory.mktemp("faults") / "plan.json")
    with gcs_emulator(faults=plan):
        yield plan, f"gs://{BUCKET}"


def _fired(plan, rules) -> list[str]:
    """The rules that injected no fault."""
    import re

    injected = plan.injected()
    return [r["match"] + " " + r["fault"] for r in rules
            if not any(f == r["fault"] and re.search(r["match"], t) for f, t in injected)]


@pytest.mark.slow
def test_a_cell_on_a_flaky_store_ends_as_on_a_steady_one_and_a_403_stops_it_in_one_line(flaky, reference, capsys):
    plan, bucket = flaky
    out = f"{bucket}/flaky"
    plan.set(*WRITES, {"match": r"insert \S+/flaky/results\.jsonl\.rows/", "fault": "403"})
    code, _, err = _run(out, capsys)
    assert code == 1, err[-3000:]
    assert err.startswith(f"doa run: error: cannot append to {out}/results.jsonl: HTTP 403 Forbidden (Forbidden: "
                          "the caller does not have storage.objects access")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert _fired(plan, WRITES) == []
    assert results.read_rows(f"{out}/results.jsonl") == []
    [key] = [p.name for p in storage.path(f"{out}/cells").iterdir()]
    assert TrainCheckpoints(f"{out}/cells/{key}/student/checkpoints").all_steps() == [2, 3]   # what was written stays

    plan.set(*READS)
    code, stdout, err = _run(out, capsys)
    assert code == 0, err[-3000:]
    assert "reusing the fine-tuned teacher" in stdout and "the same plan was trained by cell" in stdout
    assert cli.main(["report", out]) == 0
    assert _fired(plan, READS) == []
    plan.set()
    assert _cell(out) == reference
    assert storage.exists(f"{out}/report.md") and len(list(storage.path(f"{out}/plots").iterdir())) == 2
    from gcs_helpers import ls

    assert not [f for f in ls(out) if "orbax-checkpoint-tmp" in f or f.endswith(".lock")]


@pytest.mark.slow
def test_a_bucket_gone_mid_run_stops_doa_run_with_one_line_naming_the_object(flaky, capsys):
    plan, bucket = flaky
    out = f"{bucket}/gone"
    plan.set({"match": r"insert \S+/gone/config\.gin", "fault": "404"})
    code, _, err = _run(out, capsys)
    plan.set()
    assert code == 1
    assert err == (f"doa run: error: cannot write {out}/config.gin: FileNotFoundError: not found (a missing bucket or "
                   f"folder?). What was written before is intact: fix that and rerun the same command to resume\n")


# ----------------------------------------------------------------------------- a full disk

class _Filling:
    """A file on a disk that just filled: a write stores half its bytes, then fails with ENOSPC."""

    def __init__(self, f):
        self.f = f

    def write(self, data):
        self.f.write(data[: len(data) // 2])
        self.f.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@contextlib.contextmanager
def disk_full(monkeypatch, where: str):
    """Writes to files whose path contains `where` hit a full disk (Python's writes: ours, and
    Orbax's metadata and commit files)."""
    real = builtins.open

    def opened(file, mode="r", *args, **kwargs):
        f = real(file, mode, *args, **kwargs)
        writing = any(c in mode for c in "wax+")
        return _Filling(f) if writing and isinstance(file, (str, os.PathLike)) and where in os.fspath(file) else f

    with monkeypatch.context() as m:
        m.setattr(builtins, "open", opened)
        m.setattr(io, "open", opened)
        yield


@pytest.mark.slow
def test_a_full_disk_stops_the_cell_in_one_line_and_the_rerun_after_space_is_freed_resumes(
        tmp_path, reference, capsys, monkeypatch):
    out = tmp_path / "run"
    code, _, err = _run(out, capsys, "--gin.STRATEGY='annotate'")     # a row written before
    assert code == 0
    rows_before = (out / "results.jsonl").read_bytes()

    with disk_full(monkeypatch, "/stores/"):
        code, _, err = _run(out, capsys)
    assert code == 1 and err.count("\n") == 1, err[-3000:]
    assert f"error: cannot write {out}/cache/stores/" in err
    assert "no space left on device (ENOSPC). What was written before is intact" in err
    assert list(out.rglob("*.doa-tmp")) == [] and list((out / "cache" / "teachers").glob("*/record.json"))

    with disk_full(monkeypatch, "/student/checkpoints/3.orbax-checkpoint-tmp"):
        code, _, err = _run(out, capsys)
    key = reference["row"]["cell_key"]        # keys do not depend on OUTPUT_DIR
    assert code == 1 and err.count("\n") == 1, err[-3000:]
    assert err.startswith(f"doa run: error: cannot write checkpoint step 3 in {out}/cells/{key}/student/checkpoints: "
                          "no space left on device (ENOSPC); step 2 stays the latest checkpoint.")
    assert TrainCheckpoints(out / "cells" / key / "student" / "checkpoints").latest_step() == 2

    with disk_full(monkeypatch, "results.jsonl"):
        code, stdout, err = _run(out, capsys)
    assert code == 1 and err == (f"doa run: error: cannot append to {out}/results.jsonl: no space left on device "
                                 f"(ENOSPC). What was written before is intact: fix that and rerun the same command to "
                                 f"resume\n")
    assert (out / "results.jsonl").read_bytes() == rows_before          # no half row
    assert f"resumed the full train state from {out}/cells/{key}/student/checkpoints at step 2" in stdout

    code, stdout, err = _run(out, capsys)
    assert code == 0, err[-3000:]
    assert pathlib.Path(out / "results.jsonl").read_bytes().startswith(rows_before)
    got = _cell_of(out, key)
    assert got == reference


def _cell_of(out, key) -> dict:
    rows = [r for r in results.read_rows(f"{out}/results.jsonl") if r["cell_key"] == key]
    assert len(rows) == 1
    ledger = [json.loads(line) for line in (pathlib.Path(out) / "cells" / key / "ledger.jsonl").read_text().splitlines()]
    return {"row": {k: v for k, v in rows[0].items() if k not in MEASURED},
            "predictions": (pathlib.Path(out) / "cells" / key / "predictions.jsonl").read_bytes(),
            "charged": _charged(ledger)}
