"""Exclusive locks on run folders: one sweep per output folder, one process per cell.

An OS file lock (`flock`), released by the kernel when its process dies, so a kill never leaves a
stale lock behind. The lock file records who holds it, for the message a second process gets.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import pathlib
import socket


class Busy(ValueError):
    """Another process holds the lock."""


@contextlib.contextmanager
def hold(path: pathlib.Path, what: str):
    """Holds the lock file `path` for the duration; raises `Busy` naming `what` and the holder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise Busy(f"{what} is being run by {holder} (it holds {path}); wait for it, or stop it and rerun") \
                from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
