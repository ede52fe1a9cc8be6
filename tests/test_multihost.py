"""Multi-host: 2 processes x 4 CPU devices on 127.0.0.1 (jax.distributed, gloo collectives) train,
checkpoint, are killed, resume, and end with the parameters of a 1-process 8-device run; each host
reads only its half of every global batch."""
import json
import os
import pathlib
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
    env.pop("XLA_FLAGS", None)
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


def test_two_hosts_killed_and_resumed_match_one_host_with_eight_devices(tmp_path):
    env = _env()
    _finish(_start(tmp_path / "one_host", "normal", env, 1))
    want = final_params(tmp_path / "one_host")

    model_dir = tmp_path / "two_hosts"
    procs = _start(model_dir, "slow", env, 2)
    deadline = time.time() + 400
    while not (any(s >= 6 for s in logged_steps(model_dir))
               and (model_dir / "checkpoints" / "4" / "_CHECKPOINT_METADATA").exists()):
        assert all(p.poll() is None for p in procs) and time.time() < deadline, procs[0].stdout.read()[-3000:]
        time.sleep(0.05)
    for p in procs:
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=60)
    assert TrainCheckpoints(model_dir / "checkpoints").latest_step() in (4, 8)
    assert max(logged_steps(model_dir)) < 12

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
        for step in (2, 4):      # one committed step each, written by both hosts' shards, no leftovers
            assert files.count(f"checkpoints/{step}/_CHECKPOINT_METADATA") == 1
            assert any(f.startswith(f"checkpoints/{step}/params/ocdbt.process_1/") for f in files)
        assert not any(".orbax-checkpoint-tmp" in f for f in files)
        metrics = [f for f in files if f.startswith("metrics.jsonl.rows/")]
        assert len(metrics) == 4 and len({f.split("-", 1)[1].rsplit("-", 1)[0] for f in metrics}) == 1
        rows = results.read_rows(f"{model_dir}/results.jsonl")
        assert [r["cell_key"] for r in rows] == ["multihost"] and rows[0]["student_steps"] == 4
        assert [json.loads(line)["step"] for line in storage.read_appended(f"{model_dir}/metrics.jsonl")
                .decode().splitlines()] == [1, 2, 3, 4]
