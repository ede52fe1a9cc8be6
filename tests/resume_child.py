"""A training run for the resume tests, run as a subprocess: `python resume_child.py MODEL_DIR MODE`.

MODE: `normal`; `slow` (each batch takes 0.2 s, so the parent can kill it mid-run); `hang_save`
(the step-8 checkpoint hangs after its files are written, just before Orbax commits it, and a
marker file `MODEL_DIR/saving_8` appears); `eval` (normal, plus a dev evaluation every 4 steps
that keeps `best/<step>`); `hang_after_best` (eval, and `checkpoints/8` hangs before its commit
once `best/8` is committed; the data stops after step 8, so no later best replaces it). The final parameters go to `MODEL_DIR/final.npz`.
"""
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import xla_env  # noqa: E402

os.environ["XLA_FLAGS"] = xla_env.flags(8)
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# The compilation cache comes from the environment (tests/conftest.py sets JAX_COMPILATION_CACHE_DIR).

import numpy as np  # noqa: E402

from doa_jax.optimizers import OptimizerConfig  # noqa: E402
from doa_jax.data.batches import ArrayBatches  # noqa: E402
from doa_jax.trainer import Trainer  # noqa: E402
from train_helpers import copy_arrays, eval_source, flat, run_config, tiny_config  # noqa: E402

TRAIN_STEPS, CHECKPOINT_EVERY, HANG_STEP = 24, 4, 8


class SlowBatches(ArrayBatches):
    def iterate(self, start=0):
        for batch in super().iterate(start):
            time.sleep(0.2)
            yield batch


class HeldAfterHangStep(ArrayBatches):
    """The first HANG_STEP batches, then none until the parent kills the run: training stops right
    after step HANG_STEP's evaluation and saves, so no later best checkpoint replaces `best/8`
    (steps are milliseconds; the parent's kill could come several steps late)."""

    def iterate(self, start=0):
        for i, batch in enumerate(super().iterate(start), start):
            while i >= HANG_STEP:
                time.sleep(1)
            yield batch


def hang_before_commit(model_dir: pathlib.Path, after_best: bool = False) -> None:
    from orbax.checkpoint._src.path import atomicity

    original = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize(self):
        final = self.get_final()
        if final.name == str(HANG_STEP) and final.parent.name == "checkpoints":
            while after_best and not (model_dir / "best" / str(HANG_STEP) / "_CHECKPOINT_METADATA").exists():
                time.sleep(0.05)
            (model_dir / f"saving_{HANG_STEP}").write_text(str(self.get()))
            while True:
                time.sleep(1)
        return await original(self)

    atomicity.AtomicRenameTemporaryPath.finalize = finalize


def main(model_dir: str, mode: str) -> None:
    model_dir = pathlib.Path(model_dir)
    if mode in ("hang_save", "hang_after_best"):
        hang_before_commit(model_dir, after_best=mode == "hang_after_best")
    source_cls = {"slow": SlowBatches, "hang_after_best": HeldAfterHangStep}.get(mode, ArrayBatches)
    with_eval = mode in ("eval", "hang_after_best")
    config = run_config(model_dir, data=2, model=4, train_steps=TRAIN_STEPS, checkpoint_every=CHECKPOINT_EVERY,
                        async_checkpointing=True, verbose=True, eval_every=CHECKPOINT_EVERY if with_eval else None,
                        optimizer=OptimizerConfig(name="adamw", learning_rate=3e-3))
    dev = eval_source(16, num_examples=16, seed=1) if with_eval else None
    result = Trainer(tiny_config(dropout_rate=0.1), config).fit(source_cls(copy_arrays(), 16, shuffle=True, seed=0),
                                                                dev)
    np.savez(model_dir / "final.npz", **flat(result.state.params))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
