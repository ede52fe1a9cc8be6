"""One process of the multi-host `doa run` / `doa sweep` test:
`python multihost_cell_child.py PROCESS_ID NUM_PROCESSES PORT OUTPUT_DIR VOCABULARY`.

NUM_PROCESSES=1 runs on 8 CPU devices; 2 runs on 4 CPU devices each, joined on 127.0.0.1:PORT
(gloo CPU collectives) by `doa run`'s own multi-host flags. The process runs `doa run` on one tiny
distill cell of the demo task (`CELL` below), then `doa sweep` over that cell and its annotate twin
(the sweep finds the distill cell done and runs the annotate one), both into OUTPUT_DIR.
"""
import os
import pathlib
import sys

PROCESS_ID, NUM_PROCESSES, PORT = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
os.environ["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={8 // NUM_PROCESSES} "
                           "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
if NUM_PROCESSES > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
# The compilation cache comes from the environment (tests/conftest.py sets JAX_COMPILATION_CACHE_DIR).

from doa_jax import cli  # noqa: E402

# The cheapest distill cell: 1+1-layer models, one epoch per phase, teacher outputs in a store.
SETTINGS = ["--gin.TEACHER_EPOCHS=1", "--gin.STUDENT_EPOCHS=1", "--gin.DISTILL_EPOCHS=1",
            "--gin.MAX_EVAL_EXAMPLES=16", "--gin.CellConfig.demo_sizes={'labeled': 64, 'unlabeled': 32, 'test': 16}",
            "--gin.SOFT_TARGETS='stored'",
            *(f"--gin.{m}/T5Size.num_{s}_layers=1" for m in ("teacher", "student") for s in ("encoder", "decoder"))]
CELL = ["--gin_file", "runs/experiment.gin", "--gin_file", "runs/demo_models.gin",
        "--gin_file", "experiments/demo_distill.gin"]
GRID = ["--gin_file", "sweeps/demo.gin", "--gin.GRID_START_LABELS=[50]", "--gin.GRID_BUDGETS_USD=[5]",
        "--gin.GRID_SEEDS=[0]", "--gin.GRID_STRATEGIES=['annotate', 'distill']"]


def main(output_dir: str, vocabulary: str) -> int:
    common = [*SETTINGS, f"--gin.VOCABULARY='{vocabulary}'", f"--gin.OUTPUT_DIR='{output_dir}'"]
    hosts = ([] if NUM_PROCESSES == 1 else
             ["--coordinator_address", f"127.0.0.1:{PORT}", "--num_processes", str(NUM_PROCESSES),
              "--process_id", str(PROCESS_ID)])
    code = cli.main(["run", *CELL, *common, *hosts])
    assert code == 0, code
    assert jax.process_count() == NUM_PROCESSES and jax.device_count() == 8
    return cli.main(["sweep", *GRID, *common])    # the job started by `doa run` goes on


if __name__ == "__main__":
    os.chdir(pathlib.Path(__file__).resolve().parents[1])
    sys.exit(main(sys.argv[4], sys.argv[5]))
