"""Multi-host: 2 processes x 4 CPU devices on 127.0.0.1 (jax.distributed, gloo collectives) train,
checkpoint, are stopped by a SIGTERM that reaches one host (both save the same step), lose a host
to SIGKILL (the other says which and exits at once), resume, and end with the parameters of a
1-process 8-device run; each host reads only its half of every global batch. `doa run` and `doa sweep` as one 2-process job write each
shared file once and score as one process does."""
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from doa_jax.checkpoints.steps import TrainCheckpoints
from train_helpers import final_params, logged_steps

CHILD = pathlib.Path(__file__).resolve().parent / "multihost_child.py"
REPO = CHILD.parents[1]
pytestmark = pytest.mark.slow


def _env() -> dict:
    """The children inherit the session's compilation cache (tests/conftest.py)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(model_dir, mode, env, num_processes) -> list[subprocess.Popen]:
    port = _free_port()
    return [subprocess.Popen([sys.executable, str(CHILD), str(i), str(num_processes), str(port), str(model_dir), mode],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for i in range(num_processes)]


def _finish(procs, timeout=400) -> None:
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n---\n".join(o[-3000:] for o in outs)


def _rows(model_dir, process) -> dict[int, list[int]]:
    """step -> example indices host `process` read (the rerun's reads replace the killed run's)."""
    out = {}
    for line in (pathlib.Path(model_dir) / f"rows_{process}.jsonl").read_text().splitlines():
        row = json.loads(line)
        out[row["step"]] = row["index"]
    return out


def _wait_for(procs, ready, timeout=400) -> None:
    deadline = time.time() + timeout
    while not ready():
        assert all(p.poll() is None for p in procs) and time.time() < deadline, procs[0].stdout.read()[-3000:]
        time.sleep(0.05)


def test_two_hosts_stopped_by_sigterm_on_one_host_then_one_host_killed_resume_and_match_one_host(tmp_path):
    env = _env()
    _finish(_start(tmp_path / "one_host", "normal", env, 1))
    want = final_params(tmp_path / "one_host")
    model_dir, host = tmp_path / "two_hosts", socket.gethostname()

    # SIGTERM reaches process 1 only: both hosts save the same step and exit 143.
    procs = _start(model_dir, "slow", env, 2)
    _wait_for(procs, lambda: any(s >= 3 for s in logged_steps(model_dir)))
    os.kill(procs[1].pid, signal.SIGTERM)
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [143, 143], "\n---\n".join(o[-3000:] for o in outs)
    stopped = max(logged_steps(model_dir))
    assert TrainCheckpoints(model_dir / "checkpoints").latest_step() == stopped < 12
    assert f"SIGTERM reached process 1 (pid {procs[1].pid} on {host}): every process saves the same step" in outs[0]
    assert f"SIGTERM: saved step {stopped} in {model_dir / 'checkpoints'}; exiting with code 143" in outs[0]

    # The rerun resumes on both; then process 0 (it runs JAX's coordination service) is killed: process 1
    # says which host went away and exits at once (75), not after a timeout.
    procs = _start(model_dir, "slow", env, 2)
    _wait_for(procs, lambda: any(s >= stopped + 2 for s in logged_steps(model_dir)))
    os.kill(procs[0].pid, signal.SIGKILL)
    killed = time.time()
    out = procs[1].communicate(timeout=120)[0]
    procs[0].wait(timeout=60)
    assert procs[1].returncode == 75 and time.time() - killed < 30, out[-3000:]
    assert (f"multihost_child: error: process 0 (pid {procs[0].pid} on {host}) went away (its connection to "
            f"process 1 closed); this process stops too") in out
    assert f"resumed the full train state from {model_dir / 'checkpoints'} at step {stopped}" in procs[0].stdout.read()

    _finish(_start(model_dir, "normal", env, 2))
    got = final_params(model_dir)
    assert got.keys() == want.keys()
    worst = max(float(np.max(np.abs(got[k] - want[k]))) for k in want)
    # gloo's cross-process all-reduce adds in another order than one process does (measured 7.6e-7).
    assert worst <= 1e-5, f"max |diff| {worst}"
    assert logged_steps(model_dir) == list(range(1, 13))

    rows = [_rows(model_dir, p) for p in (0, 1)]
    one = _rows(tmp_path / "one_host", 0)
    assert sorted(rows[0]) == sorted(rows[1]) == list(range(1, 13))
    for step in range(1, 13):
        assert rows[0][step] == one[step][:8] and rows[1][step] == one[step][8:], step


def test_batch_rows_on_two_hosts_go_to_the_devices_that_hold_them(tmp_path):
    # Evaluation: 64 rows, data=8 over two hosts' 4 devices each: each device decodes its own 8 rows (before,
    # all 64).
    procs = _start(tmp_path, "rows", _env(), 2)
    _finish(procs)
    placed = [json.loads((tmp_path / f"placed_{i}.json").read_text()) for i in range(2)]
    rows = sorted(r for p in placed for r in p["placed"].values())
    assert [len(r) for r in rows] == [8] * 8 and sorted(x for r in rows for x in r) == list(range(0, 192, 3))
    assert all(p["gathered"] == list(range(0, 192, 3)) for p in placed)
    # A host's own rows on its devices (the online teacher's logits) join the job's batch as host rows do.
    want = list(range(0, 96, 3)) + list(range(100, 196, 3))
    assert all(p["global_from_devices"] == p["global_from_host"] == want for p in placed)


def test_hosts_reading_a_teacher_store_agree_on_what_is_wrong_with_it(tmp_path):
    # Every host reads the whole store; each says how many hosts found a chunk missing or failing its checksums,
    # so that all of them rebuild, or all of them stop, together (phases.teacher_outputs).
    from doa_jax.distill.store import TeacherStore

    def write(directory, key):
        enc = np.arange(10)[:, None].astype(np.int32)
        tokens = np.tile(np.array([[5, 1]], np.int32), (10, 1))
        predict = lambda e: {"tokens": tokens[: len(e)], "lengths": np.full(len(e), 2, np.int32),  # noqa: E731
                             "sequence_logprob": np.zeros(len(e), np.float32),
                             "topk_values": np.zeros((len(e), 2, 2), np.float32),
                             "topk_ids": np.zeros((len(e), 2, 2), np.int32)}
        TeacherStore(directory, key).build([f"s{i}" for i in range(10)], enc, predict, str, chunk_size=3)
        return directory / key

    write(tmp_path, "healthy")
    npz = write(tmp_path, "corrupt") / "chunk_00002.npz"
    npz.write_bytes(npz.read_bytes()[:50])
    (write(tmp_path, "missing") / "chunk_00001.COMPLETED").unlink()
    write(tmp_path / "unshared_0", "k")                               # host 0's cache is whole ...
    (write(tmp_path / "unshared_1", "k") / "manifest.json").unlink()  # ... host 1's lacks what host 0 wrote
    (tmp_path / "unshared").mkdir()
    _finish(_start(tmp_path, "loadstore", _env(), 2))
    found = [json.loads((tmp_path / f"loaded_{i}.json").read_text()) for i in range(2)]
    for host in found:
        assert host["healthy"] == {"rows": 10, "missing": 0, "corrupt": 0, "problem": None}
        assert (host["corrupt"]["missing"], host["corrupt"]["corrupt"]) == (0, 2)
        assert "chunk_00002.npz does not match its checksum" in host["corrupt"]["problem"]
        assert (host["missing"]["missing"], host["missing"]["corrupt"]) == (2, 0)
        assert "chunk 1 was never finished" in host["missing"]["problem"]
        assert (host["unshared"]["missing"], host["unshared"]["corrupt"]) == (1, 0)
    assert found[0]["unshared"]["rows"] == 10 and found[0]["unshared"]["problem"] is None
    assert found[1]["unshared"]["rows"] is None and "missing or incomplete" in found[1]["unshared"]["problem"]


def test_two_hosts_share_one_gcs_model_dir_one_checkpoint_per_step_one_row(tmp_path):
    from doa_jax import storage
    from doa_jax.experiment import results
    from gcs_helpers import BUCKET, gcs_emulator, ls

    with gcs_emulator():
        env = _env()
        model_dir = f"gs://{BUCKET}/two_hosts"
        _finish(_start(model_dir, "gcs", env, 2))
        files = ls(model_dir)
        assert TrainCheckpoints(f"{model_dir}/checkpoints").all_steps() == [2, 4]
        # One committed step each, no leftovers. The model axis lies within a host, so process 1 holds
        # replicas of process 0's shards; arrays this small are written once, by process 0
        # (checkpoints.steps.MIN_REPLICA_SLICE_BYTES), not split between the hosts' replicas.
        for step in (2, 4):
            assert files.count(f"checkpoints/{step}/_CHECKPOINT_METADATA") == 1
            assert any(f.startswith(f"checkpoints/{step}/params/ocdbt.process_0/") for f in files)
            assert not any(f.startswith(f"checkpoints/{step}/params/ocdbt.process_1/") for f in files)
        assert not any(".orbax-checkpoint-tmp" in f for f in files)
        metrics = [f for f in files if f.startswith("metrics.jsonl.rows/")]
        assert len(metrics) == 4 and len({f.split("-", 1)[1].rsplit("-", 1)[0] for f in metrics}) == 1
        rows = results.read_rows(f"{model_dir}/results.jsonl")
        assert [r["cell_key"] for r in rows] == ["multihost"] and rows[0]["student_steps"] == 4
        assert [json.loads(line)["step"] for line in storage.read_appended(f"{model_dir}/metrics.jsonl")
                .decode().splitlines()] == [1, 2, 3, 4]


CHILD_CELL = CHILD.with_name("multihost_cell_child.py")
# The cheapest distill cell of the demo task: 1+1-layer models, one epoch per phase, teacher outputs
# stored (chunks in the teacher store); the demo's vocabulary is built in OUTPUT_DIR/cache, which the
# two processes share (process 0 builds it, then the other loads it).
CELL_SETTINGS = [
    "--gin.TEACHER_EPOCHS=1", "--gin.STUDENT_EPOCHS=1", "--gin.DISTILL_EPOCHS=1", "--gin.MAX_EVAL_EXAMPLES=16",
    "--gin.CellConfig.demo_sizes={'labeled': 64, 'unlabeled': 32, 'test': 16}", "--gin.SOFT_TARGETS='stored'",
    *(f"--gin.{m}/T5Size.num_{s}_layers=1" for m in ("teacher", "student") for s in ("encoder", "decoder"))]
RUN = ["run", "--gin_file", "runs/experiment.gin", "--gin_file", "runs/demo_models.gin",
       "--gin_file", "experiments/demo_distill.gin"]
SWEEP = ["sweep", "--gin_file", "sweeps/demo.gin", "--gin.GRID_START_LABELS=[50]", "--gin.GRID_BUDGETS_USD=[5]",
         "--gin.GRID_SEEDS=[0]", "--gin.GRID_STRATEGIES=['annotate', 'distill']"]


def test_doa_run_and_doa_sweep_on_two_hosts_write_each_shared_file_once_and_match_one_host(tmp_path, capsys,
                                                                                          monkeypatch):
    from doa_jax import cli
    from doa_jax.experiment import phases, results

    monkeypatch.setattr(phases, "STORE_CHUNK_SIZE", 8)     # several store chunks, shared between the hosts

    settings = lambda out: [*CELL_SETTINGS, f"--gin.OUTPUT_DIR='{out}'"]
    out = tmp_path / "two_hosts"
    port = _free_port()
    commands = json.dumps([[*RUN, *settings(out)], [*SWEEP, *settings(out)]])
    procs = [subprocess.Popen([sys.executable, str(CHILD_CELL), str(i), "2", str(port), commands], cwd=REPO,
                              env=dict(_env(), DOA_TEST_STORE_CHUNK_SIZE="8"), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for i in (0, 1)]
    one = tmp_path / "one_host"              # meanwhile, the same cell in this 8-device process
    assert cli.main([*RUN, *settings(one)]) == 0
    capsys.readouterr()
    logs = [p.communicate(timeout=400)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n---\n".join(log[-3000:] for log in logs)

    rows = results.read_rows(out / "results.jsonl")          # one row per cell: process 1 wrote none
    assert sorted(r["strategy"] for r in rows) == ["annotate", "distill"]
    distill = next(r for r in rows if r["strategy"] == "distill")
    want = results.read_rows(one / "results.jsonl")[0]
    assert distill["cell_key"] == want["cell_key"]
    assert distill["metrics"] == want["metrics"] and distill["spent_usd"] == want["spent_usd"]
    key = want["cell_key"]
    # the student's decodes on the two hosts' mesh are the one host's, token for token
    decodes = [(d / "cells" / key / "predictions.jsonl").read_text() for d in (out, one)]
    assert decodes[0] == decodes[1]
    ledger = [json.loads(line)["key"] for line in (out / "cells" / key / "ledger.jsonl").read_text().splitlines()]
    assert sorted(k.split(":")[0] for k in ledger) == ["evaluation", "student_training", "teacher_finetune",
                                                       "teacher_inference"]
    assert len(list((out / "cache" / "teachers").iterdir())) == 1
    [store] = (out / "cache" / "stores").iterdir()
    chunks = json.loads((store / "manifest.json").read_text())["num_chunks"]
    assert chunks >= 2 and sorted(p.name for p in store.iterdir()) == sorted(
        [f"chunk_{i:05d}{suffix}" for i in range(chunks) for suffix in (".COMPLETED", ".jsonl", ".npz")]
        + ["manifest.json", "record.json"])
    assert json.loads((store / "record.json").read_text())["computed_chunks"] == chunks
    for process, log in enumerate(logs):   # each host computed its share (chunk c on host c mod 2), on its chips
        assert "sweep: 2 cells in" in log and "1 already finished, 1 to run" in log
        assert "the teacher's inference runs on each host's own 4 devices (mesh data=4, model=1)" in log
        done = {int(m) for m in re.findall(r"teacher chunk (\d+)/", log)}
        assert done == set(range(process + 1, chunks + 1, 2))
    assert (out / "report.md").exists() and (out / "sweep.json").exists()


def test_an_online_teacher_on_two_hosts_runs_on_each_hosts_devices_and_matches_one_host(tmp_path, capsys):
    # SOFT_TARGETS='online': every host runs the teacher's forward on its own rows of each student batch,
    # with a replica of the teacher on its own 4 devices; the student's step is one program over both.
    from doa_jax import cli
    from doa_jax.experiment import results

    settings = lambda out: [*CELL_SETTINGS, f"--gin.OUTPUT_DIR='{out}'", "--gin.SOFT_TARGETS='online'",  # noqa: E731
                            "--gin.KD_WEIGHT=1.0"]    # the demo's models distil sequence-level (0.0): no forward
    out, one = tmp_path / "two_hosts", tmp_path / "one_host"
    port = _free_port()
    commands = json.dumps([[*RUN, *settings(out)]])
    procs = [subprocess.Popen([sys.executable, str(CHILD_CELL), str(i), "2", str(port), commands], cwd=REPO,
                              env=dict(_env(), DOA_TEST_COUNT_DEVICE_ROWS="1"), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for i in (0, 1)]
    assert cli.main([*RUN, *settings(one)]) == 0
    capsys.readouterr()
    logs = [p.communicate(timeout=400)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n---\n".join(log[-3000:] for log in logs)
    [got], [want] = results.read_rows(out / "results.jsonl"), results.read_rows(one / "results.jsonl")
    assert got["cell_key"] == want["cell_key"]
    assert got["metrics"] == want["metrics"] and got["spent_usd"] == want["spent_usd"]
    for log in logs:
        assert "the teacher's inference runs on each host's own 4 devices (mesh data=4, model=1)" in log
        assert "online soft targets: the teacher's forward runs on every student batch" in log
        # each host's teacher logits, on its own devices, went into the job's batches device to device
        joined = re.search(r"device-held rows joined the job's batch: device to device (\d+), through the host (\d+)",
                           log)
        assert joined and int(joined[1]) > 0 and int(joined[2]) == 0, log[-3000:]


def test_a_chunk_found_not_whole_on_two_hosts_is_recomputed_by_its_host_alone_and_charged(tmp_path):
    # Two cells share one store of 4 chunks (chunk c on host c mod 2). Between them chunk 1's file is cut: both
    # hosts read the store, agree it is not whole, and host 1 alone recomputes chunk 1; the store's record
    # counts that chunk once, as the second cell's attempt.
    from doa_jax.experiment import results

    out = tmp_path / "out"
    cell = [*RUN, *CELL_SETTINGS, f"--gin.OUTPUT_DIR='{out}'"]
    commands = json.dumps([cell, [*cell, "--gin.EXTRA_BUDGET_USD=6"]])
    port = _free_port()
    env = dict(_env(), DOA_TEST_STORE_CHUNK_SIZE="8", DOA_TEST_DAMAGE_CHUNK="1",
               DOA_TEST_DAMAGE_STORES=str(out / "cache" / "stores"))
    procs = [subprocess.Popen([sys.executable, str(CHILD_CELL), str(i), "2", str(port), commands], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in (0, 1)]
    logs = [p.communicate(timeout=400)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n---\n".join(log[-3000:] for log in logs)
    rows = results.read_rows(out / "results.jsonl")
    assert sorted(r["extra_budget_usd"] for r in rows) == [5, 6] and all(r["status"] == "ok" for r in rows)
    [store] = (out / "cache" / "stores").iterdir()
    assert json.loads((store / "manifest.json").read_text())["num_chunks"] == 4
    record = json.loads((store / "record.json").read_text())
    assert record["computed_chunks"] == 1 and record["unmeasured_chunks"] == 0
    # earlier attempts' work: chunks 0, 2 and 3 as their markers say (chip-seconds over the ledger's chips),
    # not chunk 1's lost first computation
    second = next(r for r in rows if r["extra_budget_usd"] == 6)
    ledger = (out / "cells" / second["cell_key"] / "ledger.jsonl").read_text().splitlines()
    [entry, lost] = [e for e in map(json.loads, ledger) if e["phase"] == "teacher_inference"]
    assert lost["key"].startswith("lost:teacher_inference:") and lost["seconds"] > 0 and lost["usd"] == 0.0
    markers = {i: json.loads((store / f"chunk_{i:05d}.COMPLETED").read_text()) for i in range(4)}
    assert record["earlier_attempts_seconds"] == pytest.approx(
        sum(markers[i]["seconds"] * markers[i]["chips"] for i in (0, 2, 3)) / entry["chips"])
    assert entry["seconds"] == record["seconds"] > record["earlier_attempts_seconds"]
    for process, log in enumerate(logs):   # the first cell computes each host's chunks; the second only chunk 1
        done = [int(m) for m in re.findall(r"teacher chunk (\d+)/", log)]
        assert done == ([1, 3] if process == 0 else [2, 4, 2]), log[-3000:]
        assert ("recomputing chunk 1" in log) == (process == 1)
    assert all("2 host(s) found a chunk that is not whole; its host recomputes it" in log for log in logs)


def test_a_host_failing_its_share_of_the_teacher_store_is_named_on_every_host(tmp_path):
    port = _free_port()
    commands = json.dumps([[*RUN, *CELL_SETTINGS, f"--gin.OUTPUT_DIR='{tmp_path / 'out'}'"]])
    procs = [subprocess.Popen([sys.executable, str(CHILD_CELL), str(i), "2", str(port), commands], cwd=REPO,
                              env=dict(_env(), DOA_TEST_STORE_FAILS_ON="1"), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in (0, 1)]
    logs = [p.communicate(timeout=400)[0] for p in procs]
    assert procs[0].returncode == 1, logs[0][-3000:]
    assert "doa run: error: process 1 failed: OSError: no space left on device (test)" in logs[0]
    assert procs[1].returncode != 0 and "no space left on device (test)" in logs[1]
