#!/usr/bin/env bash
# Cloud TPU VMs for doa-jax: create (or name) a TPU VM, install the project on every worker, start a
# `doa` command, follow worker 0's log, stop it, delete the VM. Only prints and runs gcloud commands.
#
#   scripts/tpu_vm.sh [--dry-run] create              # the VM (SPOT=1: a spot VM)
#   scripts/tpu_vm.sh [--dry-run] install             # copy this checkout to every worker, pip install it
#   scripts/tpu_vm.sh [--dry-run] start train ARGS... # `doa train --multihost ARGS` on every worker
#   scripts/tpu_vm.sh [--dry-run] start run ARGS...   # `doa run --multihost ARGS` on every worker
#   scripts/tpu_vm.sh [--dry-run] start sweep ARGS... # `doa sweep --multihost ARGS` on every worker
#   scripts/tpu_vm.sh [--dry-run] logs                # follow worker 0's log (Ctrl-C stops following only)
#   scripts/tpu_vm.sh [--dry-run] stop                # SIGTERM: the step finishes, is saved, doa exits
#   scripts/tpu_vm.sh [--dry-run] delete              # delete the VM
#
# Settings (environment): TPU_NAME (required), ZONE (required), PROJECT (gcloud's default if unset),
# ACCELERATOR (v4-8), VERSION (tpu-ubuntu2204-base), SPOT (1: a spot VM, reclaimable at any time),
# REMOTE_DIR (doa-jax, under the workers' home). Output paths given to doa should be gs:// URLs:
# every worker sees the same bucket, and rerunning the same `start` after a preemption resumes.
# --dry-run prints the exact commands, one a line, and runs none.
set -euo pipefail

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; shift; fi
CMD="${1:-}"
[[ -n "$CMD" ]] && shift
ACCELERATOR="${ACCELERATOR:-v4-8}"
VERSION="${VERSION:-tpu-ubuntu2204-base}"
REMOTE_DIR="${REMOTE_DIR:-doa-jax}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

die() { echo "tpu_vm.sh: error: $*" >&2; exit 2; }
[[ -n "${TPU_NAME:-}" ]] || die "set TPU_NAME (the TPU VM's name)"
[[ -n "${ZONE:-}" ]] || die "set ZONE (e.g. us-central2-b)"

WHERE=(--zone="$ZONE")
[[ -n "${PROJECT:-}" ]] && WHERE+=(--project="$PROJECT")

run() {   # prints the command (shell-quoted), then runs it unless --dry-run
  local quoted
  quoted="$(printf '%q ' "$@")"
  echo "+ ${quoted% }"
  if [[ "$DRY_RUN" == 0 ]]; then "$@"; fi
}

ssh_on() {   # ssh_on WORKER COMMAND: one shell command on worker(s) WORKER (a number or 'all')
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${WHERE[@]}" --worker="$1" --command="$2"
}

case "$CMD" in
  create)
    spot=()
    [[ "${SPOT:-0}" == 1 ]] && spot=(--spot)
    run gcloud compute tpus tpu-vm create "$TPU_NAME" "${WHERE[@]}" --accelerator-type="$ACCELERATOR" \
      --version="$VERSION" "${spot[@]}"
    ;;
  install)
    archive="/tmp/doa-jax-$$.tar.gz"
    # The checkout's files as git sees them (tracked, and new ones not ignored): no run outputs,
    # caches or virtualenvs (runs/, demo_out/, .venv/ ... are git-ignored).
    run bash -c "cd $(printf '%q' "$REPO") && git ls-files -z --cached --others --exclude-standard | \
tar -czf $archive --null --ignore-failed-read -T -"
    run gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME:doa-jax.tar.gz" "${WHERE[@]}" --worker=all
    ssh_on all "mkdir -p $REMOTE_DIR && tar -xzf doa-jax.tar.gz -C $REMOTE_DIR && cd $REMOTE_DIR && \
python3 -m pip install -q -c constraints.txt -e '.[gcs]' && python3 -m pip install -q 'jax[tpu]'"
    ;;
  start)
    sub="${1:-}"
    [[ "$sub" =~ ^(train|run|sweep)$ ]] || die "start needs train, run or sweep, then doa's arguments"
    shift
    args="$(printf '%q ' "$@")"
    # every worker joins one multi-host JAX job; process 0 writes the shared files
    ssh_on all "cd $REMOTE_DIR && (nohup python3 -m doa_jax $sub --multihost ${args% } > ~/doa.log 2>&1 & \
echo \$! > ~/doa.pid)"
    ;;
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
    die "unknown command '${CMD}'; use create, install, start, logs, stop or delete"
    ;;
esac
