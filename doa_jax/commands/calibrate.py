"""`doa calibrate`: measure this machine's throughput on the real programs of a run, for `--cost-profile calibrated`."""
from __future__ import annotations

import argparse

from doa_jax.commands.aot import int_pair
from doa_jax.model.config import DECODE_CROSS_KV


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return value


def register(sub) -> None:
    p = sub.add_parser("calibrate", help="time teacher/student programs here and write a calibration file",
                       description=__doc__)
    p.add_argument("--accelerator", required=True,
                   help="rate card this machine is priced as (e.g. a100, h100, tpu_v5e, cpu)")
    p.add_argument("--teacher", required=True, help="teacher size (e.g. xxl; tiny for a CPU check)")
    p.add_argument("--student", required=True, help="student size (e.g. small; tiny for a CPU check)")
    p.add_argument("--task", required=True, help="task card name or path, or 'demo': its lengths are timed")
    p.add_argument("--out", default="calibration.json", help="calibration file to write (default calibration.json)")
    p.add_argument("--batch-size", type=_positive, default=32, help="the run's batch size (default 32)")
    p.add_argument("--topk", type=_positive, default=8, help="stored soft targets per position (default 8)")
    p.add_argument("--optimizer", default="adamw", help="the run's optimizer (default adamw, the paper's)")
    p.add_argument("--inputs-length", type=_positive, default=None, help="default: the card's")
    p.add_argument("--targets-length", type=_positive, default=None, help="default: the card's")
    p.add_argument("--vocab-size", type=_positive, default=None,
                   help="model embedding rows (default: the size's; the demo task: the demo's)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="the run's activation dtype (ACTIVATION_DTYPE; default: the size's, bfloat16)")
    p.add_argument("--cross-kv", choices=DECODE_CROSS_KV, default="cache",
                   help="how the run's decodes get cross-attention K/V (TEACHER_/STUDENT_DECODE_CROSS_KV; "
                        "default cache)")
    p.add_argument("--reps", type=_positive, default=3, help="timed calls per program (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls after the compiling one (default 1)")
    p.add_argument("--run-steps", type=_positive, default=20,
                   help="steps of each timed training run (default 20)")
    p.add_argument("--teacher-mesh", type=int_pair, default=(-1, 1), metavar="DATA,MODEL",
                   help="the teacher's mesh axes, as the cells' TEACHER_MESH_DATA/TEACHER_MESH_MODEL lay it out "
                        "(default -1,1: every device on data; XXL needs the model axis on most slices)")
    p.set_defaults(func=run)


def run(args) -> int:
    from doa_jax.experiment import calibration
    from doa_jax.experiment import costs
    from doa_jax.experiment import cost_profiles

    costs.get_accelerator(args.accelerator)       # an unknown rate card fails before any compute
    cost_profiles.size_name(args.teacher), cost_profiles.size_name(args.student)
    settings = calibration.Settings(accelerator=args.accelerator, teacher=args.teacher, student=args.student,
                                    task=args.task, batch_size=args.batch_size, topk=args.topk,
                                    optimizer=args.optimizer, reps=args.reps, warmup=args.warmup, run_steps=args.run_steps,
                                    inputs_length=args.inputs_length, targets_length=args.targets_length,
                                    vocab_size=args.vocab_size, dtype=args.dtype, teacher_mesh=args.teacher_mesh,
                                    cross_kv=args.cross_kv)
    from doa_jax.platforms import compilation_cache_off

    with compilation_cache_off():   # a calibration times cold compiles, not reads of doa's compilation cache
        record = calibration.calibrate(settings)
    path = calibration.write_calibration(record, args.out)
    print(f"calibrated {record['device_count']} x {record['device_kind']} (priced as {record['accelerator']}) on "
          f"{record['task']} at {record['lengths']['inputs']}/{record['lengths']['targets']} tokens, batch "
          f"{record['batch_size']}; {record['timing']}")
    for program, row in record["programs"].items():
        once = sum(row.get(f, 0.0) for f in cost_profiles.ONCE_PER_RUN)
        fixed = f"   + {once:.2f} s a run (compile, set-up)" if once else ""
        mfu = "MFU n/a" if row["mfu"] is None else f"MFU {row['mfu']:.2%}"
        print(f"  {program:<24} {row['examples_per_s']:>12.1f} examples/s   {mfu}{fixed}")
    if any(row["mfu"] is None for row in record["programs"].values()):
        print(f"  MFU n/a: {record['mfu_note']}")
    print(f"wrote {path}; price with `doa plan --calibration {path} ...`")
    return 0
