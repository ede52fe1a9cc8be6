"""Preemption: a run killed with SIGKILL (mid-training, mid-checkpoint-save, between the best and
the step checkpoint), stopped with SIGTERM or Ctrl-C, or left with a damaged newest checkpoint, and
rerun with the same command, ends with the parameters of an uninterrupted run and one metrics row
per step."""
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from doa_jax.checkpoints import load_checkpoint
from doa_jax.checkpoints.steps import TrainCheckpoints
from train_helpers import final_params, logged_steps

CHILD = pathlib.Path(__file__).resolve().parent / "resume_child.py"
REPO = CHILD.parents[1]
pytestmark = pytest.mark.slow


def _env() -> dict:
    """The children inherit the session's compilation cache (tests/conftest.py)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _run(model_dir, mode, env, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CHILD), str(model_dir), mode], env=env, capture_output=True,
                          text=True, timeout=timeout)


def _start(model_dir, mode, env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(CHILD), str(model_dir), mode], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _kill_when(proc: subprocess.Popen, ready, timeout=300) -> None:
    deadline = time.time() + timeout
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"child exited early ({proc.returncode}): {proc.stdout.read()[-3000:]}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError("child never reached the kill point")
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    base = tmp_path_factory.mktemp("resume")
    env = _env()
    done = _run(base / "uninterrupted", "normal", env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return base, env, final_params(base / "uninterrupted")


def _assert_same_params(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    worst = max(float(np.max(np.abs(got[k] - want[k]))) for k in want)
    assert worst == 0.0, f"max |diff| {worst}"


def test_sigkill_mid_training_then_rerun_matches_an_uninterrupted_run(uninterrupted):
    base, env, want = uninterrupted
    model_dir = base / "killed"
    proc = _start(model_dir, "slow", env)
    # Kill once step 10 is logged: checkpoints 4 and 8 exist, steps 9-10 are lost.
    _kill_when(proc, lambda: any(s >= 10 for s in logged_steps(model_dir)))
    assert max(logged_steps(model_dir)) < 24
    latest = TrainCheckpoints(model_dir / "checkpoints").latest_step()
    assert latest in (4, 8)
    rerun = _run(model_dir, "slow", env)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert f"resumed the full train state from {model_dir / 'checkpoints'} at step {latest}" in rerun.stdout
    _assert_same_params(final_params(model_dir), want)
    assert logged_steps(model_dir) == list(range(1, 25))        # steps 9-10 are not logged twice


def test_kill_during_a_checkpoint_save_leaves_the_previous_checkpoint_usable(uninterrupted):
    base, env, want = uninterrupted
    model_dir = base / "killed_in_save"
    proc = _start(model_dir, "hang_save", env)
    _kill_when(proc, lambda: (model_dir / "saving_8").exists())
    tmp_dir = pathlib.Path((model_dir / "saving_8").read_text())
    assert tmp_dir.exists() and not (model_dir / "checkpoints" / "8").exists()   # written, not committed
    config, params = load_checkpoint(model_dir / "checkpoints")                  # the step-4 checkpoint
    assert all(np.all(np.isfinite(v)) for v in jax_leaves(params))
    rerun = _run(model_dir, "normal", env)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "at step 4" in rerun.stdout and not tmp_dir.exists()                 # leftover cleaned up
    _assert_same_params(final_params(model_dir), want)


def jax_leaves(tree):
    import jax

    return jax.tree_util.tree_leaves(tree)


def test_kill_after_the_best_checkpoint_before_the_step_checkpoint_resumes(uninterrupted):
    base, env, want = uninterrupted
    model_dir = base / "killed_after_best"
    proc = _start(model_dir, "hang_after_best", env)
    _kill_when(proc, lambda: (model_dir / "saving_8").exists())
    assert (model_dir / "best" / "8").is_dir() and not (model_dir / "checkpoints" / "8").exists()
    rerun = _run(model_dir, "eval", env)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "at step 4" in rerun.stdout and "already exists" not in rerun.stderr
    _assert_same_params(final_params(model_dir), want)        # dev evaluation does not change training


def _truncate_largest_data_file(step_dir: pathlib.Path, item: str = "params") -> pathlib.Path:
    """Halves the largest data file of an item's OCDBT database (the merged one that reads use)."""
    files = [p for p in (step_dir / item / "d").iterdir() if p.is_file()]
    victim = max(files, key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    return victim


def _committed(model_dir) -> list[int]:
    folder = pathlib.Path(model_dir) / "checkpoints"
    return sorted(int(p.name) for p in folder.glob("[0-9]*")
                  if p.name.isdigit() and (p / "_CHECKPOINT_METADATA").exists()) if folder.is_dir() else []


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before_in_one_line(uninterrupted):
    base, env, want = uninterrupted
    model_dir = base / "damaged"
    proc = _start(model_dir, "slow", env)
    _kill_when(proc, lambda: len(_committed(model_dir)) >= 2)
    *_, previous, newest = _committed(model_dir)
    # the optimizer state's database: its restore left ~100 TensorStore reads whose callbacks printed
    # a traceback each ("Event loop is closed") after the restore had failed
    _truncate_largest_data_file(model_dir / "checkpoints" / str(newest), "opt_state")
    rerun = _run(model_dir, "normal", env)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    [line] = [line for line in rerun.stderr.splitlines() if "checkpoint" in line]
    assert line.startswith(f"checkpoint {model_dir / 'checkpoints' / str(newest)} is damaged (ValueError: ")
    assert f"; set it aside in {model_dir / 'checkpoints.corrupt' / str(newest)}-" in line
    assert line.endswith("; trying the checkpoint before it")
    assert "Traceback" not in rerun.stderr and "Event loop is closed" not in rerun.stderr
    assert f"at step {previous}" in rerun.stdout
    assert [p.name.split("-")[0] for p in (model_dir / "checkpoints.corrupt").iterdir()] == [str(newest)]
    _assert_same_params(final_params(model_dir), want)


def _signal_after(model_dir, env, step: int, sig: int) -> tuple[subprocess.Popen, str]:
    """Starts a slow training run, sends `sig` once it has logged `step`, and waits for it to exit."""
    proc = _start(model_dir, "slow", env)
    deadline = time.time() + 300
    while not any(s >= step for s in logged_steps(model_dir)):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.05)
    os.kill(proc.pid, sig)
    return proc, proc.communicate(timeout=120)[0]


def test_sigterm_finishes_the_step_saves_it_and_exits_143_then_resumes(uninterrupted):
    base, env, want = uninterrupted
    model_dir = base / "sigterm"
    proc, out = _signal_after(model_dir, env, 10, signal.SIGTERM)
    assert proc.returncode == 143, out[-3000:]
    stopped = max(logged_steps(model_dir))
    assert f"SIGTERM: saved step {stopped} in {model_dir / 'checkpoints'}; exiting with code 143" in out
    assert TrainCheckpoints(model_dir / "checkpoints").latest_step() == stopped < 24
    rerun = _run(model_dir, "normal", env)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert f"at step {stopped}" in rerun.stdout
    _assert_same_params(final_params(model_dir), want)
    assert logged_steps(model_dir) == list(range(1, 25))


def test_ctrl_c_saves_and_exits_130_without_a_traceback(uninterrupted):
    base, env, _ = uninterrupted
    model_dir = base / "sigint"
    proc, out = _signal_after(model_dir, env, 6, signal.SIGINT)
    assert proc.returncode == 130 and "Traceback" not in out, out[-3000:]
    stopped = max(logged_steps(model_dir))
    assert f"SIGINT: saved step {stopped} in" in out
    assert TrainCheckpoints(model_dir / "checkpoints").latest_step() == stopped
