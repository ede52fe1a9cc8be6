"""The trainer's step checkpoints: an Orbax `CheckpointManager` in the project's native layout.

`MODEL_DIR/checkpoints/<step>/` holds the native items `params` (float32 param tree) and
`config` (JSON: `T5Config.to_dict()` + `NATIVE_FORMAT`), so `doa_jax.checkpoints.load_checkpoint`
and `doa_jax.load_model` read a fine-tuned model directly, plus the trainer's own items:
`opt_state` (the optax state) and `trainer_state` (JSON: step, data position, RNG seed and key,
best dev metric, early-stopping counter).

Saves are asynchronous (the device->host copy blocks, the writes do not) and atomic: Orbax writes
into a temporary directory and renames it when complete, so a process killed during a save leaves
the previous step as the latest usable checkpoint (leftover temporary directories are removed
when a manager is opened again). Saving a step that is already committed is a no-op (a resumed run
replays steps bit-identically, so the committed step already holds that state): a run killed
between two saves of one step (e.g. after `best/<step>`, before `checkpoints/<step>`) resumes.
A step whose files are damaged can be moved aside (`quarantine`) so the one before is used.

A save that cannot be written (a full disk, no permission, a store that keeps failing) raises
`storage.StorageError` naming the step, the folder and the cause: the step before it stays the
latest committed one. The echoes of such a fault in Orbax's thread logs, and the callbacks of
TensorStore reads and writes left running after a save or restore failed (they find Orbax's event
loop closed, ~100 tracebacks for one damaged checkpoint), are not printed.
"""
from __future__ import annotations

import contextlib
import logging
import pathlib
import sys
import time
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint._src.metadata import array_metadata_store  # the store Orbax's default handler uses

from doa_jax import storage
from doa_jax.checkpoints.native import CONFIG_ITEM, FORMAT as NATIVE_FORMAT, PARAMS_ITEM, model_items

ITEMS = (PARAMS_ITEM, CONFIG_ITEM, "opt_state", "trainer_state")

# Orbax saves a replicated array "replica-parallel" (each of R replicas writes 1/R of it) on CPU and
# TPU. For a small array that is all cost: each replica's part is an eager slice, compiled per
# shape and device (a tiny model's save on an 8-device CPU mesh compiled 56 such programs and spent
# ~13% of its 5-step run there). Only parts of at least this many bytes are written in parallel;
# smaller arrays are written whole by one replica, as Orbax does on GPUs.
MIN_REPLICA_SLICE_BYTES = 1 << 20


def _register_array_handler() -> None:
    """Orbax's jax.Array handler with the minimum above (quietly: Orbax warns on every override)."""
    absl_log = logging.getLogger("absl")
    level = absl_log.level
    absl_log.setLevel(logging.ERROR)
    try:
        ocp.type_handlers.register_type_handler(
            jax.Array, ocp.type_handlers.ArrayHandler(array_metadata_store=array_metadata_store.Store(),
                                                      min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES),
            override=True)
    finally:
        absl_log.setLevel(level)


_register_array_handler()


def _closed_loop_callback(unraisable) -> bool:
    """A TensorStore read finishing after the restore that awaited it failed: its callback finds
    Orbax's event loop closed. Nothing is lost; the restore's own error says what was wrong."""
    value = unraisable.exc_value
    return isinstance(value, RuntimeError) and str(value) == "Event loop is closed"


# What a store fault reads like in the messages of TensorStore and Orbax (a full disk, no permission,
# a store that keeps failing); the fault itself reaches the caller as `StorageError`.
FAULT_MARKERS = ("No space left on device", "Errno 28", "RESOURCE_EXHAUSTED", "PERMISSION_DENIED", "Forbidden",
                 "UNAVAILABLE", "DEADLINE_EXCEEDED")


class _FaultEchoes(logging.Filter):
    """Drops the echoes of one store fault that Orbax's threads log (a traceback per thread, per
    item) and asyncio logs for futures nobody awaited after the save failed: the save's own
    `StorageError` says it once."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            text += str(record.exc_info[1])
        echo = "raised an exception" in text or "exception was never retrieved" in text
        return not (echo and any(m in text for m in FAULT_MARKERS))


def _quiet_fault_echoes() -> None:
    for name in ("absl", "asyncio"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _FaultEchoes) for f in logger.filters):
            logger.addFilter(_FaultEchoes())


_quiet_fault_echoes()


def quiet_closed_loop_callbacks() -> None:
    """Stops the interpreter printing a traceback per closed-loop callback (a damaged checkpoint's
    restore printed ~100 of them); every other unraisable exception is printed as before."""
    previous = sys.unraisablehook
    if getattr(previous, "doa_quiet", False):
        return

    def hook(unraisable):
        if not _closed_loop_callback(unraisable):
            previous(unraisable)

    hook.doa_quiet = True
    sys.unraisablehook = hook


quiet_closed_loop_callbacks()     # a failed save leaves them too


# TensorStore status codes of a store that failed (not of damaged files): a restore that meets one
# stops the run (`StorageError`) instead of setting a good checkpoint aside.
STORE_FAULTS = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "PERMISSION_DENIED", "UNAUTHENTICATED")


class DamagedCheckpoint(ValueError):
    """A checkpoint whose files do not read back (truncated, altered, missing); its message is
    the first line of the reader's error."""


class TrainCheckpoints:
    """Step checkpoints under `directory` (the last `keep`), optionally without optimizer state."""

    def __init__(self, directory: str | pathlib.Path, *, keep: Optional[int] = 2, async_save: bool = True,
                 with_optimizer: bool = True):
        self.directory = storage.absolute(directory)   # a local folder or a URL (gs://)
        self.with_optimizer = with_optimizer
        self._failed = False
        items = ITEMS if with_optimizer else ("params", "config", "trainer_state")
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                                 create=True, cleanup_tmp_directories=True),
            item_names=items)

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, *, params: Any, model_config, trainer_state: dict[str, Any],
             opt_state: Any = None) -> bool:
        """Starts saving `step` (returns once arrays are copied off the devices); False (nothing
        written) when `step` is already committed here."""
        if step in self.manager.all_steps():
            return False
        items = dict(model_items(model_config, params), trainer_state=ocp.args.JsonSave(trainer_state))
        if self.with_optimizer:
            items["opt_state"] = ocp.args.StandardSave(opt_state)
        with self._failing_as_storage_error(step):
            self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        return True

    @contextlib.contextmanager
    def _failing_as_storage_error(self, step: Optional[int]):
        """A save that fails raises one `StorageError` naming the step, the folder, the cause and
        the step that stays the latest (later waits do not raise it again)."""
        try:
            yield
        except Exception as e:   # noqa: BLE001 (Orbax/TensorStore raise many types)
            if self._failed:
                return
            self._failed = True
            kept = self.manager.latest_step()
            what = f"checkpoint step {step}" if step is not None else "a checkpoint"
            raise storage.StorageError(
                f"cannot write {what} in {self.directory}: {storage.describe(e)}; "
                + (f"step {kept} stays the latest checkpoint" if kept is not None else "no checkpoint was saved before")
                ) from None

    def restore(self, step: Optional[int], *, abstract_params: Any, abstract_opt_state: Any = None
                ) -> tuple[Any, Any, dict[str, Any], dict[str, Any]]:
        """`(params, opt_state, trainer_state, config)` of `step` (latest when None).

        `abstract_*` are trees of `jax.ShapeDtypeStruct` with shardings: arrays are read
        straight into that layout (each host reads its own shards).
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        items = dict(params=ocp.args.StandardRestore(abstract_params), config=ocp.args.JsonRestore(),
                     trainer_state=ocp.args.JsonRestore())
        if self.with_optimizer and abstract_opt_state is not None:
            items["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:   # noqa: BLE001 (Orbax/TensorStore raise many types on damaged files)
            text = str(e)
            if isinstance(e, storage.StorageError) or storage.transient(e) or any(f"{c}:" in text for c in STORE_FAULTS):
                raise storage.StorageError(f"cannot read checkpoint step {step} in {self.directory}: "
                                           f"{storage.describe(e)}") from None
            reason = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
            raise DamagedCheckpoint(f"{type(e).__name__}: {reason[:300]}" if reason else type(e).__name__) from None
        opt_state = out["opt_state"] if "opt_state" in items else None
        return out["params"], opt_state, dict(out["trainer_state"]), dict(out["config"])

    def quarantine(self, step: int, *, move: bool = True) -> pathlib.Path:
        """Moves the damaged `step` to `<directory>.corrupt/<step>-<time>` (kept for inspection, out
        of the manager's sight) and rereads the step list. With `move=False` (non-chief hosts) only
        rereads. Returns where the step went."""
        dest = self.directory.with_name(self.directory.name + ".corrupt") / f"{step}-{int(time.time())}"
        if move:
            storage.makedirs(dest.parent)
            (self.directory / str(step)).rename(dest)
        self.manager.reload()
        return dest

    def wait(self) -> None:
        with self._failing_as_storage_error(None):
            self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def has_checkpoint(directory: str | pathlib.Path) -> bool:
    """True when `directory` is a manager root with at least one committed step."""
    directory = storage.path(directory)
    if not directory.is_dir():
        return False
    return any(p.is_dir() and p.name.isdigit() and (p / "_CHECKPOINT_METADATA").exists()
               for p in directory.iterdir())


def step_directory(path: str | pathlib.Path) -> pathlib.Path:
    """A native step directory from either a step directory or a manager root (its latest step)."""
    path = storage.path(path)
    if (path / "params").is_dir() and (path / "config").exists():
        return path
    steps = sorted((int(p.name) for p in path.iterdir() if p.name.isdigit()
                    and (p / "params").is_dir()), reverse=True) if path.is_dir() else []
    if not steps:
        raise FileNotFoundError(f"{path} holds no doa_jax checkpoint (no params/ and config items, "
                                f"and no step directories)")
    return path / str(steps[0])


def restore_step_directory(path: str | pathlib.Path, *, abstract_params: Any, abstract_opt_state: Any = None
                           ) -> tuple[Any, Any, dict[str, Any], dict[str, Any]]:
    """Reads a trainer step directory (or a manager root's latest step) outside its manager.

    Returns `(params, opt_state or None, trainer_state or {}, config)`.
    """
    directory = storage.absolute(step_directory(path))   # Orbax refuses relative paths (doa demo's demo_out/...)
    present = {p.name for p in directory.iterdir()}
    items = dict(params=ocp.args.StandardRestore(abstract_params), config=ocp.args.JsonRestore())
    if "trainer_state" in present:
        items["trainer_state"] = ocp.args.JsonRestore()
    if abstract_opt_state is not None:
        if "opt_state" not in present:
            raise FileNotFoundError(f"{directory} has no optimizer state (opt_state/): it cannot resume "
                                    f"the full train state; start from its params only instead")
        items["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        out = ckptr.restore(directory, args=ocp.args.Composite(**items))
    return (out["params"], out["opt_state"] if "opt_state" in items else None,
            dict(out["trainer_state"]) if "trainer_state" in items else {}, dict(out["config"]))


__all__ = ["DamagedCheckpoint", "ITEMS", "NATIVE_FORMAT", "TrainCheckpoints", "has_checkpoint",
           "restore_step_directory", "step_directory"]
