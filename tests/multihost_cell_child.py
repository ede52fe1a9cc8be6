"""One process of the multi-host `doa run` / `doa sweep` test:
`python multihost_cell_child.py PROCESS_ID NUM_PROCESSES PORT COMMANDS_JSON`.

NUM_PROCESSES=1 runs on 8 CPU devices; 2 runs on 4 CPU devices each, joined on 127.0.0.1:PORT
(gloo CPU collectives) by the first command's multi-host flags. COMMANDS_JSON is a list of `doa`
argument lists, run in order in this process (e.g. `doa run` on a cell, then `doa sweep`). With
DOA_TEST_DAMAGE_CHUNK=N and DOA_TEST_DAMAGE_STORES=DIR, process 0 truncates chunk N's .npz of every store
in DIR between commands.
"""
import json
import os
import pathlib
import sys

PROCESS_ID, NUM_PROCESSES, PORT = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import xla_env  # noqa: E402

os.environ["XLA_FLAGS"] = xla_env.flags(8 // NUM_PROCESSES)   # the session's compile flags
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
if NUM_PROCESSES > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
# The compilation cache comes from the environment (tests/conftest.py sets JAX_COMPILATION_CACHE_DIR).

from doa_jax import cli  # noqa: E402
from doa_jax.experiment import phases  # noqa: E402

# Smaller store chunks, so that both hosts compute some (the test sets the same in its one-host run).
phases.STORE_CHUNK_SIZE = int(os.environ.get("DOA_TEST_STORE_CHUNK_SIZE", phases.STORE_CHUNK_SIZE))
if os.environ.get("DOA_TEST_STORE_FAILS_ON") == str(PROCESS_ID):   # this host fails its share of the store
    def _failing_build(*args, **kwargs):
        raise OSError("no space left on device (test)")

    phases.teacher_store.build_store = _failing_build

if os.environ.get("DOA_TEST_COUNT_DEVICE_ROWS"):   # how each host's device-held rows join the job's batches
    import atexit

    from doa_jax import partitioning

    _joined = {"device to device": 0, "through the host": 0}
    _direct = partitioning._from_local_rows_on_devices

    def _counting(rows, sharding):
        moved = _direct(rows, sharding)
        _joined["device to device" if moved is not None else "through the host"] += 1
        return moved

    partitioning._from_local_rows_on_devices = _counting
    atexit.register(lambda: print("test: device-held rows joined the job's batch: " + ", ".join(
        f"{how} {n}" for how, n in _joined.items()), flush=True))


def _damage(stores: pathlib.Path, chunk: int) -> None:
    """Truncates chunk `chunk`'s .npz in every teacher store under `stores`, as a bad disk would."""
    for npz in stores.glob(f"*/chunk_{chunk:05d}.npz"):
        npz.write_bytes(npz.read_bytes()[:50])


def main(commands: list) -> int:
    """Runs each `doa` argv in turn in this process; the first joins the multi-host job with
    `doa run`'s (or `doa sweep`'s) own flags, the later ones run in the job it started."""
    hosts = ([] if NUM_PROCESSES == 1 else
             ["--coordinator_address", f"127.0.0.1:{PORT}", "--num_processes", str(NUM_PROCESSES),
              "--process_id", str(PROCESS_ID)])
    for i, argv in enumerate(commands):
        if i and os.environ.get("DOA_TEST_DAMAGE_CHUNK"):   # between commands, process 0 truncates that chunk
            from doa_jax import partitioning

            partitioning.from_chief(lambda: _damage(pathlib.Path(os.environ["DOA_TEST_DAMAGE_STORES"]),
                                                    int(os.environ["DOA_TEST_DAMAGE_CHUNK"])))
        code = cli.main([*argv, *(hosts if i == 0 else [])])
        if code:
            return code
        assert jax.process_count() == NUM_PROCESSES and jax.device_count() == 8
    return 0


if __name__ == "__main__":
    os.chdir(pathlib.Path(__file__).resolve().parents[1])
    sys.exit(main(json.loads(sys.argv[4])))
