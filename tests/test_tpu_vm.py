"""`scripts/tpu_vm.sh`: what it runs on a stock TPU VM, checked from its printed commands (`--dry-run`) and
by running the commands it sends to the workers under a fake `gcloud` (the worker's shell is this
one, its venv python a recorder): Python >= 3.11 from uv beside the image's 3.10, JAX and libtpu at
constraints.txt's pins in one constrained resolve, the run's environment on every worker, the data
step, T5X from a pinned commit with `$DOA` defined, and `resume` after a spot preemption."""
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
import time
import tomllib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "tpu_vm.sh"
FORWARDED = ("JAX_COMPILATION_CACHE_DIR", "XLA_FLAGS", "LIBTPU_INIT_ARGS", "TF_CPP_MIN_LOG_LEVEL")
BASE_ENV = {k: v for k, v in os.environ.items() if not k.startswith("DOA_") and k not in FORWARDED}


def _pin(name):
    return re.search(rf"^{name}==(\S+)$", (REPO / "constraints.txt").read_text(), re.M).group(1)


def _tpu_vm(*args, env=None, dry=True):
    env = dict(BASE_ENV, TPU_NAME="doa-pod", ZONE="us-central2-b", SPOT="1", **(env or {}))
    return subprocess.run(["bash", str(SCRIPT), *(["--dry-run"] if dry else []), *args], env=env,
                          capture_output=True, text=True, timeout=30)


def _remote(line):
    """The shell command a printed `gcloud ... ssh ... --command=CMD` line runs on the workers."""
    argv = shlex.split(line[2:])
    return next(a.split("=", 1)[1] for a in argv if a.startswith("--command="))


@pytest.fixture
def worker(tmp_path):
    """A fake gcloud that runs ssh commands here (HOME = a worker's home; ~/doa-venv/bin/python records
    its argv and environment), and the environment to run the script with it."""
    home, bin_dir = tmp_path / "home", tmp_path / "bin"
    (home / "doa-jax").mkdir(parents=True)
    (home / "doa-venv" / "bin").mkdir(parents=True)
    bin_dir.mkdir()
    recorder = home / "doa-venv" / "bin" / "python"
    recorder.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                        f"open(os.path.expanduser('~/seen.json'), 'w').write(json.dumps("
                        f"{{'argv': sys.argv[1:], 'env': dict(os.environ), 'cwd': os.getcwd()}}))\n")
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(f"#!{sys.executable}\nimport json, os, subprocess, sys\n"
                      f"open(os.environ['GCLOUD_LOG'], 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
                      f"cmd = [a.split('=', 1)[1] for a in sys.argv if a.startswith('--command=')]\n"
                      f"if cmd: subprocess.run(['bash', '-c', cmd[0]], cwd=os.environ['HOME'], check=True)\n")
    for f in (recorder, gcloud):
        f.chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(home), "GCLOUD_LOG": str(tmp_path / "calls"),
           "XDG_STATE_HOME": str(tmp_path / "state")}
    return home, env


def _seen(home):
    path = home / "seen.json"
    for _ in range(100):   # the command runs under nohup, in the background
        if path.exists() and path.stat().st_size:
            return json.loads(path.read_text())
        time.sleep(0.05)
    raise AssertionError("the worker's python never ran")


def test_install_provisions_python_3_11_beside_the_system_one_and_pins_jax_and_libtpu_to_the_constraints():
    out = _tpu_vm("install")
    assert out.returncode == 0, out.stderr
    remote = _remote(out.stdout.splitlines()[-1])
    steps = remote.split(" && ")
    minimum = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    venv = next(s for s in steps if " venv " in s)
    version = re.search(r"--python (\d+)\.(\d+)", venv).groups()
    assert minimum == ">=3.11" and tuple(map(int, version)) >= (3, 11)
    assert "--python-preference only-managed" in venv     # uv's own CPython, not the image's 3.10
    assert "python3 -m pip install --user -q uv==" in remote and not re.search(r"\b(sudo|apt|apt-get)\b", remote)
    installs = [s for s in steps if "pip install" in s and "uv==" not in s]
    assert len(installs) == 1    # one constrained resolve; no jax installed after it
    assert installs[0].endswith(f"-c constraints.txt -e '.[gcs]' 'jax[tpu]=={_pin('jax')}' "
                                f"'libtpu=={_pin('libtpu')}'")
    assert _pin("jax") == "0.10.2" and _pin("libtpu") == "0.0.42.1"


def test_start_forwards_the_runs_environment_to_every_worker(worker):
    home, env = worker
    out = _tpu_vm("start", "run", "--gin_file", "runs/x.gin", "--gin.OUTPUT_DIR=gs://b/run", dry=False,
                  env={**env, "DOA_DATA_DIR": "gs://b/my data", "DOA_VOCAB": "/v/spiece.model",
                       "XLA_FLAGS": "--xla_dump_to=/tmp/x"})
    assert out.returncode == 0, out.stderr
    assert "--worker=all" in out.stdout
    seen = _seen(home)
    assert seen["argv"] == ["-m", "doa_jax", "run", "--multihost", "--gin_file", "runs/x.gin",
                            "--gin.OUTPUT_DIR=gs://b/run"]
    assert seen["env"]["DOA_DATA_DIR"] == "gs://b/my data" and seen["env"]["DOA_VOCAB"] == "/v/spiece.model"
    assert seen["env"]["XLA_FLAGS"] == "--xla_dump_to=/tmp/x" and "LIBTPU_INIT_ARGS" not in seen["env"]
    assert seen["cwd"] == str(home / "doa-jax")


def test_the_data_step_downloads_the_task_on_every_worker_into_DOA_DATA_DIR(worker):
    home, env = worker
    out = _tpu_vm("data", "wlp", dry=False, env={**env, "DOA_DATA_DIR": "gs://b/data"})
    assert out.returncode == 0, out.stderr
    assert "--worker=all" in out.stdout
    seen = _seen(home)
    assert seen["argv"] == ["-m", "doa_jax", "data", "download", "wlp"] and seen["env"]["DOA_DATA_DIR"] == "gs://b/data"
    refused = _tpu_vm("data", "wlp")
    assert refused.returncode == 2 and "set DOA_DATA_DIR" in refused.stderr


def test_t5x_runs_on_every_worker_with_DOA_defined_and_the_projects_gin_files_on_its_path(worker):
    home, env = worker
    out = _tpu_vm("start", "t5x-train", "--gin_file=$DOA/gin/t5x/finetune_teacher.gin",
                  "--gin.MIXTURE_OR_TASK_NAME=\"doa_wlp_L1000\"", dry=False, env=env)
    assert out.returncode == 0, out.stderr
    seen = _seen(home)
    assert seen["env"]["DOA"] == str(home / "doa-jax")
    assert seen["argv"] == ["-m", "t5x.train", f"--gin_search_paths={home}/doa-jax/gin",
                            f"--gin_file={home}/doa-jax/gin/t5x/finetune_teacher.gin",
                            '--gin.MIXTURE_OR_TASK_NAME="doa_wlp_L1000"']


def test_t5x_is_installed_from_its_repository_at_a_pinned_commit_without_moving_the_pins():
    out = _tpu_vm("install-t5x")
    remote = _remote(out.stdout.strip())
    assert re.search(r"'t5x @ git\+https://github.com/google-research/t5x@[0-9a-f]{40}'", remote)
    assert "--no-deps" in remote and "-c doa-jax/constraints.txt" in remote


def test_resume_deletes_creates_installs_fetches_the_data_and_reruns_the_last_start(worker):
    home, env = worker
    env = {**env, "DOA_DATA_DIR": "gs://b/data"}
    started = _tpu_vm("start", "sweep", "--gin_file", "sweeps/paper_main.gin", dry=False, env=env)
    assert started.returncode == 0, started.stderr
    out = _tpu_vm("resume", env={**env, "DATA_TASK": "wlp"})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "+ gcloud compute tpus tpu-vm delete doa-pod --zone=us-central2-b --quiet"
    assert lines[1].startswith("+ gcloud compute tpus tpu-vm create doa-pod") and lines[1].endswith("--spot")
    assert "tpu-vm scp" in lines[3] and "uv pip install" in _remote(lines[4])
    assert "-m doa_jax data download wlp" in _remote(lines[5])
    assert _remote(lines[6]) == _remote(started.stdout.strip())    # the same start command
    assert len(lines) == 7


def test_resume_without_a_recorded_start_says_what_it_needs(tmp_path):
    out = _tpu_vm("resume", env={"XDG_STATE_HOME": str(tmp_path)})
    assert out.returncode == 2 and "resume needs the start command" in out.stderr and out.stdout == ""


def test_create_prints_the_spot_create_command():
    out = _tpu_vm("create")
    assert out.returncode == 0
    assert out.stdout == ("+ gcloud compute tpus tpu-vm create doa-pod --zone=us-central2-b "
                          "--accelerator-type=v4-8 --version=tpu-ubuntu2204-base --spot\n")


def test_install_archives_the_checkout_without_git_ignored_outputs(tmp_path):
    repo = tmp_path / "checkout"
    (repo / "scripts").mkdir(parents=True)
    (repo / "scripts" / "tpu_vm.sh").write_bytes(SCRIPT.read_bytes())
    (repo / "constraints.txt").write_text("jax==0.10.2\nlibtpu==0.0.42.1\n")
    (repo / ".gitignore").write_text("/runs/\n")
    (repo / "runs" / "demo_sweep").mkdir(parents=True)
    (repo / "runs" / "demo_sweep" / "results.jsonl").write_text("{}\n")
    (repo / "new_module.py").write_text("x = 1\n")   # not committed yet: still shipped
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run(["git", "add", ".gitignore", "scripts", "constraints.txt"], cwd=repo, check=True)
    out = subprocess.run(["bash", str(repo / "scripts" / "tpu_vm.sh"), "--dry-run", "install"], capture_output=True,
                         text=True, timeout=30, env=dict(BASE_ENV, TPU_NAME="doa-pod", ZONE="z"))
    archive_line = out.stdout.splitlines()[0]
    subprocess.run(archive_line[2:], shell=True, check=True, executable="/bin/bash")   # run what it printed
    archive = archive_line.split("tar\\ -czf\\ ")[1].split("\\ ")[0]
    names = subprocess.run(["tar", "-tzf", archive], capture_output=True, text=True, check=True).stdout.split()
    os.unlink(archive)
    assert sorted(names) == [".gitignore", "constraints.txt", "new_module.py", "scripts/tpu_vm.sh"]


def test_an_unknown_start_command_is_refused():
    out = _tpu_vm("start", "demo")
    assert out.returncode == 2 and "start needs train, run, sweep, t5x-train or t5x-infer" in out.stderr
    assert out.stdout == ""
