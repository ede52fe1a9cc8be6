"""A local GCS emulator for the cloud-storage tests (no tests here).

`gcs_emulator()` starts `gcp-storage-emulator` on 127.0.0.1 (a free port, in memory, one bucket)
and points every client at it: gcsfs (our files, and Orbax's epath) through STORAGE_EMULATOR_HOST,
TensorStore (Orbax's arrays) through TENSORSTORE_GCS_HTTP_URL. Nothing leaves the machine.
`gcs_emulator(faults=FaultPlan(path))` starts it with fault injection (tests/gcs_emulator_main.py):
the plan's rules can be changed while it runs.
"""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import pytest

BUCKET = "doa-test"
MAIN = pathlib.Path(__file__).resolve().with_name("gcs_emulator_main.py")
ENV = {
    # gcsfs's zonal-bucket probe (a gRPC call the emulator does not serve) is off; epath uses gcsfs.
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    "EPATH_USE_TF": "false",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FaultPlan:
    """The fault rules of an emulator (see tests/gcs_emulator_main.py), set while it runs, and the
    faults it injected."""

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        self.set()

    def set(self, *rules: dict, seed: int = 0) -> None:
        """Replaces the rules (none: no faults); the emulator rereads them at its next request."""
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"seed": seed, "rules": list(rules)}))
        os.replace(tmp, self.path)

    def injected(self) -> list[tuple[str, str]]:
        """(fault, target) of every fault injected so far."""
        log = pathlib.Path(f"{self.path}.log")
        return [tuple(line.split("\t", 1)) for line in log.read_text().splitlines()] if log.exists() else []


def start_emulator(faults: FaultPlan | None = None) -> tuple[subprocess.Popen, str]:
    """Starts an emulator (with `faults` when given); returns the process and its URL once it answers."""
    port = _free_port()
    env = dict(os.environ, DOA_GCS_FAULTS=str(faults.path)) if faults else None
    proc = subprocess.Popen([sys.executable, str(MAIN), "start", "--host=127.0.0.1",
                             f"--port={port}", "--in-memory", f"--default-bucket={BUCKET}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 30
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            break
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise RuntimeError("the GCS emulator did not start")
        time.sleep(0.1)
    return proc, f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def gcs_emulator(faults: FaultPlan | None = None):
    """Yields the environment (a dict) that points GCS clients at a fresh emulator (injecting
    `faults` when given); sets it in os.environ meanwhile (subprocesses inherit it)."""
    saved = {k: os.environ.get(k) for k in [*ENV, "STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL",
                                            "GOOGLE_APPLICATION_CREDENTIALS"]}
    os.environ.update(ENV)    # before gcsfs is imported: it picks its client class at import
    pytest.importorskip("gcsfs", reason="gs:// needs gcsfs (pip install -e '.[gcs]')")
    pytest.importorskip("gcp_storage_emulator", reason="the GCS tests need gcp-storage-emulator ('.[test]')")
    proc, url = start_emulator(faults)
    env = dict(ENV, STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url)
    try:
        os.environ.update(env)
        os.environ.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
        import fsspec

        fsspec.filesystem("gs").clear_instance_cache()   # no client made before the emulator ran
        yield env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.terminate()
        proc.wait(timeout=30)


def ls(url: str) -> list[str]:
    """Every object under a gs:// prefix, as paths relative to it."""
    import fsspec

    fs, key = fsspec.core.url_to_fs(url)
    return sorted(p[len(key):].lstrip("/") for p in fs.find(key, refresh=True))
