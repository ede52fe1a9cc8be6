#!/usr/bin/env bash
# Cloud TPU VMs for doa-jax: create (or name) a TPU VM, install the project on every worker, fetch the
# data, start a `doa` (or T5X) command, follow worker 0's log, stop it, delete the VM, and resume after
# a spot preemption. Only prints and runs gcloud commands.
#
#   scripts/tpu_vm.sh [--dry-run] create              # the VM (SPOT=1: a spot VM)
#   scripts/tpu_vm.sh [--dry-run] install             # Python 3.11 venv on every worker, this checkout pip-installed
#   scripts/tpu_vm.sh [--dry-run] data TASK           # `doa data download TASK` on every worker (into $DOA_DATA_DIR)
#   scripts/tpu_vm.sh [--dry-run] start train ARGS... # `doa train --multihost ARGS` on every worker
#   scripts/tpu_vm.sh [--dry-run] start run ARGS...   # `doa run --multihost ARGS` on every worker
#   scripts/tpu_vm.sh [--dry-run] start sweep ARGS... # `doa sweep --multihost ARGS` on every worker
#   scripts/tpu_vm.sh [--dry-run] install-t5x         # T5X (pinned commit) into the same venv, on every worker
#   scripts/tpu_vm.sh [--dry-run] start t5x-train ARGS... # `python -m t5x.train ARGS` on every worker
#   scripts/tpu_vm.sh [--dry-run] start t5x-infer ARGS... # `python -m t5x.infer ARGS` on every worker
#   scripts/tpu_vm.sh [--dry-run] logs                # follow worker 0's log (Ctrl-C stops following only)
#   scripts/tpu_vm.sh [--dry-run] stop                # SIGTERM: the step finishes, is saved, doa exits
#   scripts/tpu_vm.sh [--dry-run] delete              # delete the VM
#   scripts/tpu_vm.sh [--dry-run] resume [SUB ARGS...] # after a preemption: delete, create, install, data
#                                                     # (DATA_TASK), then the same `start SUB ARGS` (default:
#                                                     # the last `start` run from this machine for TPU_NAME)
#
# Settings (environment): TPU_NAME (required), ZONE (required), PROJECT (gcloud's default if unset),
# ACCELERATOR (v4-8), VERSION (tpu-ubuntu2204-base), SPOT (1: a spot VM, reclaimable at any time),
# REMOTE_DIR (doa-jax, under the workers' home), VENV (doa-venv, under the workers' home),
# PYTHON_VERSION (3.11, the project's minimum), UV_VERSION (0.13.8), DATA_TASK (the task `resume`
# fetches, e.g. wlp; unset: none), FORWARD_ENV (more variable names to forward; every DOA_* variable
# set here is forwarded anyway, as are JAX_COMPILATION_CACHE_DIR, XLA_FLAGS, LIBTPU_INIT_ARGS and
# TF_CPP_MIN_LOG_LEVEL when set).
#
# Python: the image's python3 is 3.10 and the project needs >= 3.11. `install` puts `uv` (one
# pinned static binary) in ~/.local with the image's pip, and uv downloads its own CPython build
# (python-build-standalone) into ~/.local/share/uv and makes the venv from it: nothing is installed
# with apt and the system Python is not touched (deadsnakes would need sudo, an apt PPA, and adds
# a second interpreter to /usr). One resolve installs the checkout with constraints.txt and the
# `jax[tpu]`/libtpu versions constraints.txt pins, so JAX is the tested version.
#
# Output paths given to doa should be gs:// URLs: every worker sees the same bucket, and rerunning
# the same `start` after a preemption resumes. --dry-run prints the exact commands, one a line, and
# runs none (nothing is written, not even the record `resume` reads).
set -euo pipefail

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; shift; fi
CMD="${1:-}"
[[ -n "$CMD" ]] && shift
ACCELERATOR="${ACCELERATOR:-v4-8}"
VERSION="${VERSION:-tpu-ubuntu2204-base}"
REMOTE_DIR="${REMOTE_DIR:-doa-jax}"
VENV="${VENV:-doa-venv}"
PYTHON_VERSION="${PYTHON_VERSION:-3.11}"
UV_VERSION="${UV_VERSION:-0.13.8}"
# T5X and airio (T5X imports it) are not on PyPI: installed from their repositories at these commits
# (the T5X commit is the one the project's T5X notes read, 2026-04-21; airio's HEAD of 2026-04-09).
T5X_COMMIT=cc342d419ec3e3e9c4bf1df33c82330cafdc1e16
AIRIO_COMMIT=69897df7d9a427b947a9f7bb4164c7782b43e601
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE_DIR="${XDG_STATE_HOME:-$HOME/.local/state}/doa_jax/tpu_vm"

die() { echo "tpu_vm.sh: error: $*" >&2; exit 2; }
[[ -n "${TPU_NAME:-}" ]] || die "set TPU_NAME (the TPU VM's name)"
[[ -n "${ZONE:-}" ]] || die "set ZONE (e.g. us-central2-b)"
pinned() {   # pinned PACKAGE: its version in constraints.txt
  local v
  v="$(sed -n "s/^$1==//p" "$REPO/constraints.txt")"
  [[ -n "$v" ]] || die "constraints.txt pins no $1"
  echo "$v"
}
JAX_VERSION="$(pinned jax)"
LIBTPU_VERSION="$(pinned libtpu)"

WHERE=(--zone="$ZONE")
[[ -n "${PROJECT:-}" ]] && WHERE+=(--project="$PROJECT")
PY="~/$VENV/bin/python"

run() {   # prints the command (shell-quoted), then runs it unless --dry-run
  local quoted
  quoted="$(printf '%q ' "$@")"
  echo "+ ${quoted% }"
  if [[ "$DRY_RUN" == 0 ]]; then "$@"; fi
}

ssh_on() {   # ssh_on WORKER COMMAND: one shell command on worker(s) WORKER (a number or 'all')
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${WHERE[@]}" --worker="$1" --command="$2"
}

env_exports() {   # `export NAME=VALUE ...; ` for the run's environment (empty when none is set)
  local names=() name out=""
  while IFS= read -r name; do names+=("$name"); done < <(compgen -e | grep '^DOA_' || true)
  names+=(JAX_COMPILATION_CACHE_DIR XLA_FLAGS LIBTPU_INIT_ARGS TF_CPP_MIN_LOG_LEVEL ${FORWARD_ENV:-})
  for name in "${names[@]}"; do
    [[ -n "${!name+x}" ]] && out+=" $name=$(printf '%q' "${!name}")"
  done
  [[ -n "$out" ]] && echo "export${out}; "
  return 0
}

do_create() {
  local spot=()
  [[ "${SPOT:-0}" == 1 ]] && spot=(--spot)
  run gcloud compute tpus tpu-vm create "$TPU_NAME" "${WHERE[@]}" --accelerator-type="$ACCELERATOR" \
    --version="$VERSION" "${spot[@]}"
}

do_install() {
  local archive="/tmp/doa-jax-$$.tar.gz"
  # The checkout's files as git sees them (tracked, and new ones not ignored): no run outputs,
  # caches or virtualenvs (runs/, demo_out/, .venv/ ... are git-ignored).
  run bash -c "cd $(printf '%q' "$REPO") && git ls-files -z --cached --others --exclude-standard | \
tar -czf $archive --null --ignore-failed-read -T -"
  run gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME:doa-jax.tar.gz" "${WHERE[@]}" --worker=all
  ssh_on all "set -e; mkdir -p $REMOTE_DIR && tar -xzf doa-jax.tar.gz -C $REMOTE_DIR && \
cd $REMOTE_DIR && python3 -m pip install --user -q uv==$UV_VERSION && \
~/.local/bin/uv venv --python $PYTHON_VERSION --python-preference only-managed --seed --allow-existing ~/$VENV && \
~/.local/bin/uv pip install --python $PY -c constraints.txt -e '.[gcs]' 'jax[tpu]==$JAX_VERSION' \
'libtpu==$LIBTPU_VERSION' && $PY -c 'import sys, jax, importlib.metadata as m; \
print(\"python\", sys.version.split()[0], \"jax\", jax.__version__, \"libtpu\", m.version(\"libtpu\"))'"
}

do_install_t5x() {
  # --no-deps: T5X names flax, optax, clu and seqio as unpinned git URLs, which would move them off
  # the constraints; its other imports are installed from PyPI under constraints.txt.
  ssh_on all "set -e; ~/.local/bin/uv pip install --python $PY --no-deps \
't5x @ git+https://github.com/google-research/t5x@$T5X_COMMIT' \
'airio @ git+https://github.com/google/airio@$AIRIO_COMMIT' && \
~/.local/bin/uv pip install --python $PY -c $REMOTE_DIR/constraints.txt clu fiddle cached-property chex jaxtyping \
grain gin-config && $PY -c 'import t5x.train, t5x.infer; print(\"t5x\", \"$T5X_COMMIT\")'"
}

do_data() {
  [[ -n "${1:-}" ]] || die "data needs a task (e.g. wlp, or all)"
  [[ -n "${DOA_DATA_DIR:-}" ]] || die "set DOA_DATA_DIR (the workers' data folder, e.g. gs://BUCKET/data or ~/doa_data)"
  ssh_on all "cd $REMOTE_DIR && $(env_exports)$PY -m doa_jax data download $(printf '%q' "$1")"
}

do_start() {
  local sub="${1:-}" program args
  case "$sub" in
    train|run|sweep) program="-m doa_jax $sub --multihost" ;;
    t5x-train|t5x-infer) program="-m t5x.${sub#t5x-} --gin_search_paths=\$DOA/gin" ;;
    *) die "start needs train, run, sweep, t5x-train or t5x-infer, then the command's arguments" ;;
  esac
  shift
  args="$(printf '%q ' "$@")"
  args="${args//\\\$DOA/\$DOA}"   # '$DOA/...' in the arguments is the checkout on the worker
  if [[ "$DRY_RUN" == 0 ]]; then   # what `resume` reruns
    mkdir -p "$STATE_DIR" && printf '%q ' "$sub" "$@" > "$STATE_DIR/$TPU_NAME.start"
  fi
  # every worker joins one multi-host JAX job; process 0 writes the shared files. $DOA is the
  # checkout on the worker (T5X's --gin_search_paths=$DOA/gin).
  ssh_on all "cd $REMOTE_DIR && export DOA=\$HOME/$REMOTE_DIR; $(env_exports)(nohup $PY $program ${args% } \
> ~/doa.log 2>&1 & echo \$! > ~/doa.pid)"
}

do_resume() {
  local saved="$STATE_DIR/$TPU_NAME.start"
  if [[ $# == 0 ]]; then
    [[ -f "$saved" ]] || die "resume needs the start command (train|run|sweep|t5x-train|t5x-infer ARGS...): none \
was recorded for $TPU_NAME in $saved"
    eval "set -- $(cat "$saved")"
  fi
  # a preempted spot VM must be deleted before one of the same name can be created
  run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${WHERE[@]}" --quiet || true
  do_create
  do_install
  [[ "$1" == t5x-* ]] && do_install_t5x
  [[ -n "${DATA_TASK:-}" ]] && do_data "$DATA_TASK"
  do_start "$@"
}

case "$CMD" in
  create) do_create ;;
  install) do_install ;;
  install-t5x) do_install_t5x ;;
  data) do_data "$@" ;;
  start) do_start "$@" ;;
  resume) do_resume "$@" ;;
  logs)
    ssh_on 0 "tail -n 100 -F ~/doa.log"
    ;;
  stop)
    ssh_on all "test -f ~/doa.pid && kill -TERM \$(cat ~/doa.pid) || true"
    ;;
  delete)
    run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${WHERE[@]}" --quiet
    ;;
  *)
    die "unknown command '${CMD}'; use create, install, install-t5x, data, start, resume, logs, stop or delete"
    ;;
esac
