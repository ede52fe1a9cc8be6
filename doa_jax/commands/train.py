"""`doa train --gin_file F [--gin_file G] --gin.MACRO=value`: gin-configured, partitioned fine-tuning.

Gin files are parsed in order (a model size first, then the run file, then experiment files):
    doa train --gin_file models/t5_1_1_small.gin --gin_file runs/finetune.gin \\
      --gin.MODEL_DIR=/tmp/fever_small --gin.TASK=fever --gin.VOCABULARY=/path/spiece.model \\
      --gin.BATCH_SIZE=32 --gin.EPOCHS=20 --gin.TRAIN_STEPS=None \\
      --gin.INITIAL_CHECKPOINT_PATH=/ckpt/t5-v1_1-small --gin.TASK_FEATURE_LENGTHS=None
Rerunning the same command after a preemption resumes from MODEL_DIR's last checkpoint.
SIGTERM or Ctrl-C: the current step finishes, a checkpoint of it is saved, and the command exits
with code 143 (SIGTERM) or 130 (SIGINT); see README "Preemption". Divergence exits with code 2.
Multi-host GPU: add --coordinator_address host:port --num_processes N --process_id I on every
host (Cloud TPU VMs: --multihost).
"""
from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="fine-tune a T5 from gin files (partitioned, resumable)",
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    from doa_jax.gin_flags import add_gin_flags

    add_gin_flags(p)
    add_multihost_flags(p)
    p.set_defaults(func=run)


def add_multihost_flags(p: argparse.ArgumentParser) -> None:
    """The multi-host flags of `doa train`, `doa run` and `doa sweep` (see `start_multihost`)."""
    p.add_argument("--coordinator_address", help="multi-host: 'host:port' of process 0")
    p.add_argument("--num_processes", "--process_count", type=int, help="multi-host: number of processes")
    p.add_argument("--process_id", "--process_index", type=int, help="multi-host: this process's index")
    p.add_argument("--multihost", action="store_true",
                   help="multi-host with auto-detected peers (Cloud TPU VM pods, SLURM)")
    p.add_argument("--host_timeout", "--host-timeout", type=int, default=60, metavar="SECONDS",
                   help="multi-host: a host silent this long is declared gone and every host stops (default 60; "
                        "a host killed outright is noticed at once)")


def start_multihost(args: argparse.Namespace) -> None:
    """Joins the multi-host job the flags describe (a no-op without them); must come before any
    other JAX call."""
    from doa_jax import partitioning

    partitioning.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id,
                                        auto=args.multihost, host_timeout_s=args.host_timeout,
                                        label=f"doa {args.command}")


def run(args: argparse.Namespace) -> int:
    """Ctrl-C before or after training (outside the trainer's own handling) exits 130, no traceback."""
    import signal
    import sys

    try:
        return _run(args)
    except KeyboardInterrupt:
        print("doa train: interrupted (SIGINT)", file=sys.stderr, flush=True)
        return 128 + signal.SIGINT


def fit_vocab_size(model_config, train_data, train_config):
    """The model config with its vocab size fixed before any compute: by the checkpoint the run
    starts from (its own, when resuming; else INITIAL_CHECKPOINT_PATH), else by MODEL_VOCAB_SIZE,
    else by the training data's vocabulary (its ids padded to 128)."""
    import pathlib

    from doa_jax import checkpoints
    from doa_jax.checkpoints.steps import has_checkpoint

    num_ids, what = train_data.vocab_ids()
    own = pathlib.Path(train_config.model_dir) / "checkpoints"
    start = own if train_config.resume and has_checkpoint(own) else train_config.initial_checkpoint
    return checkpoints.resolve_vocab_size(model_config, num_ids, what, start)


def _build_source(train_data, batch_size: int, shard):
    """The training batches, saying what is being built and how long it took (a task's TF/SeqIO
    pipeline reads, tokenizes and counts one epoch first, silently, for minutes on a large task)."""
    import time

    what = (f"task {train_data.task} split {train_data.split}" if hasattr(train_data, "task")
            else type(train_data).__name__)
    print(f"input pipeline: building {what} (reading, tokenizing, counting one epoch) ...", flush=True)
    start = time.perf_counter()
    source = train_data.source(batch_size, train=True, shard_index=shard.index, num_shards=shard.num_shards)
    print(f"input pipeline: ready in {time.perf_counter() - start:.1f} s ({source.steps_per_epoch} batches of "
          f"{batch_size} per epoch)", flush=True)
    return source


def _run(args: argparse.Namespace) -> int:
    from doa_jax import configurables, gin_utils, partitioning
    from doa_jax.cli import UserError

    start_multihost(args)   # jax.distributed must start before any other JAX call
    configurables.register()
    gin_utils.parse_flags(args, known_macros=("EVAL_DATA", "DECODE_EVAL"))
    try:
        model_config = gin_utils.macro("MODEL_CONFIG")
    except ValueError:
        raise UserError("MODEL_CONFIG is not set: add a model-size gin file before the run file, "
                        "e.g. --gin_file models/t5_1_1_small.gin") from None
    train_config = gin_utils.macro("TRAIN_CONFIG")
    train_data = gin_utils.macro("TRAIN_DATA")
    eval_data = gin_utils.macro("EVAL_DATA", None)
    decode_eval = bool(gin_utils.macro("DECODE_EVAL", False))
    model_config = fit_vocab_size(model_config, train_data, train_config)

    import jax

    from doa_jax import storage
    from doa_jax.trainer import Trainer

    storage.check_writable(train_config.model_dir, "MODEL_DIR")   # a bad bucket fails before any compute
    trainer = Trainer(model_config, train_config)   # builds the mesh: bad mesh sizes fail here
    partitioning.check_batch_size(train_config.batch_size, trainer.mesh, jax.process_count(),
                                  train_config.num_microbatches)
    if partitioning.is_chief():
        path = gin_utils.write_operative_config(train_config.model_dir)
        print(f"operative gin config: {path}", flush=True)
    shard = partitioning.host_shard_info()
    train_source = _build_source(train_data, train_config.batch_size, shard)
    eval_source = None if eval_data is None else eval_data.source(
        train_config.batch_size, train=False, shard_index=shard.index, num_shards=shard.num_shards)
    decode_metrics = eval_data.decode_metrics() if (eval_data is not None and decode_eval) else None
    result = trainer.fit(train_source, eval_source, decode_metrics=decode_metrics)
    if result.diverged:
        raise UserError(result.diverged)
    best = "" if result.best_metric is None else (
        f"; best {train_config.eval_metric} {result.best_metric:.4g} at step {result.best_step}")
    print(f"done: step {result.step}{' (early stop)' if result.stopped_early else ''}{best}; "
          f"checkpoints in {train_config.model_dir}/checkpoints", flush=True)
    return 0
