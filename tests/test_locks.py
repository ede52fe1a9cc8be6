"""Locks with leases (doa_jax.experiment.locking) on a local folder, on fsspec's `memory://` store
and on the GCS emulator (which enforces create-if-absent, tests/gcs_emulator_main.py): a live lock is
refused naming its holder, host and age; one whose holder died on this host, or whose lease ran
out (its host is gone), is taken over with a warning; `take_over` takes a live one and its holder
is told; the holder renews its lease while it works; `doa sweep --take_over_lock` takes a
folder's lock."""
import fcntl
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from doa_jax import storage
from doa_jax.experiment import locking, sweep

HOST = socket.gethostname()


@pytest.fixture(scope="module")
def gcs_bucket():
    from gcs_helpers import BUCKET, gcs_emulator

    with gcs_emulator():
        yield f"gs://{BUCKET}"


@pytest.fixture(params=["local", "memory", "gs"])
def lock_path(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / ".lock")
    if request.param == "memory":
        return f"memory://locks/{tmp_path.name}/.lock"
    return f"{request.getfixturevalue('gcs_bucket')}/locks/{tmp_path.name}/.lock"


def _dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)


def _record(pid: int, host: str, renewed_ago: float, lease_s: float = 120.0) -> bytes:
    now = time.time()
    return json.dumps({"pid": pid, "host": host, "id": "abcdef123456", "started": now - 3600,
                       "renewed": now - renewed_ago, "lease_s": lease_s}).encode()


def _leave(path: str, record: bytes):
    """A lock record left at `path` as its holder wrote it; a local file is also held with flock
    (an open file of this process stands for the holder) and returned, to be closed."""
    if storage.is_url(path):
        storage.write_atomic(path, record)
        return None
    f = open(path, "a+")
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    f.write(record.decode())
    f.flush()
    return f


def _holder(path: str) -> dict:
    return json.loads(storage.read_bytes(path))


def test_a_live_lock_is_refused_naming_its_holder_host_and_age(lock_path):
    with locking.hold(lock_path, "a sweep in OUT"):
        with pytest.raises(locking.Busy) as refused:
            with locking.hold(lock_path, "a sweep in OUT"):
                pass
    assert str(refused.value).startswith(f"a sweep in OUT is being run by pid {os.getpid()} on {HOST}, holding it "
                                         f"for 0 s, lease renewed 0 s ago (lock {lock_path}); ")
    assert str(refused.value).endswith("rerun with --take_over_lock")
    assert not storage.is_url(lock_path) or not storage.exists(lock_path)       # released: the object is gone


def test_a_lock_left_by_a_holder_that_died_on_this_host_is_taken_over_with_a_warning(lock_path, capsys):
    storage.write_atomic(lock_path, _record(_dead_pid(), HOST, renewed_ago=1.0))     # no flock: its process died
    with locking.hold(lock_path, "cell k"):
        assert _holder(lock_path)["pid"] == os.getpid()
    warning = capsys.readouterr().err
    assert warning.startswith(f"warning: taking over the lock {lock_path} of cell k from pid ")
    assert warning.count("\n") == 1 and (" ended without releasing it" in warning or "its process is gone" in warning)


def test_a_lock_of_a_host_that_no_longer_exists_is_taken_over_once_its_lease_ran_out(lock_path, capsys):
    left = _leave(lock_path, _record(4242, "spot-worker-7", renewed_ago=400.0))
    try:
        with locking.hold(lock_path, "cell k"):
            assert _holder(lock_path)["host"] == HOST
    finally:
        if left:
            left.close()
    warning = capsys.readouterr().err
    assert warning == (f"warning: taking over the lock {lock_path} of cell k from pid 4242 on spot-worker-7, holding it "
                       f"for 60 min, lease renewed 6 min ago: its lease ran out (120 s; no renewal for 6 min)\n")


def test_a_live_lease_of_another_host_is_refused_and_take_over_takes_it(lock_path, capsys):
    left = _leave(lock_path, _record(4242, "tpu-worker-1", renewed_ago=5.0))
    try:
        with pytest.raises(locking.Busy, match=r"is being run by pid 4242 on tpu-worker-1, holding it for 60 min, "
                                               r"lease renewed 5 s ago"):
            with locking.hold(lock_path, "cell k"):
                pass
        with locking.hold(lock_path, "cell k", take_over=True):
            assert _holder(lock_path)["pid"] == os.getpid()
    finally:
        if left:
            left.close()
    assert "from pid 4242 on tpu-worker-1, holding it for 60 min, lease renewed 5 s ago: asked to (--take_over_lock)" \
        in capsys.readouterr().err


def test_the_holder_renews_its_lease_and_is_told_when_its_lock_is_taken(lock_path, capsys):
    with locking.hold(lock_path, "cell k", lease_s=0.6):
        first = _holder(lock_path)["renewed"]
        time.sleep(0.5)                                       # two renewals (every lease/3 s)
        assert _holder(lock_path)["renewed"] > first
        with locking.hold(lock_path, "cell k", take_over=True):
            time.sleep(0.5)                                   # the first holder's next renewal finds it gone
            assert f"warning: the lock {lock_path} was taken over by another process: this one no longer holds it" \
                in capsys.readouterr().err
    assert not storage.is_url(lock_path) or not storage.exists(lock_path)


def test_a_sweep_whose_folder_lock_a_gone_host_left_live_runs_with_take_over_lock(tmp_path):
    points, cells = sweep.load_sweep(["sweeps/demo.gin"], [f"OUTPUT_DIR = '{tmp_path}'", "GRID_SEEDS = [0]",
                                                           "GRID_BUDGETS_USD = [5]"])
    ran = []

    def runner(cell):
        ran.append(cell.key())
        return {"cell_key": cell.key(), "task": "demo", "strategy": cell.strategy, "start_labels": cell.start_labels,
                "extra_budget_usd": cell.extra_budget_usd, "seed": cell.seed, "metric": "f1", "value": 1.0,
                "status": "ok", "spent_total_usd": 0.5, "wall_seconds": 0.1}

    left = _leave(str(tmp_path / ".sweep.lock"), _record(4242, "tpu-worker-1", renewed_ago=5.0))
    try:
        with pytest.raises(locking.Busy, match="pid 4242 on tpu-worker-1"):
            sweep.run_sweep(points, cells, runner=runner, write_report=False, log=lambda s: None)
        assert ran == []
        sweep.run_sweep(points, cells, runner=runner, write_report=False, log=lambda s: None, take_over_lock=True)
    finally:
        left.close()
    assert len(ran) == 2


def test_doa_run_and_doa_sweep_take_the_take_over_lock_flag():
    from doa_jax import cli

    parser = cli.build_parser()
    for command in ("run", "sweep"):
        assert parser.parse_args([command, "--gin_file", "x.gin", "--take_over_lock"]).take_over_lock
        assert not parser.parse_args([command, "--gin_file", "x.gin"]).take_over_lock
