"""Exclusive locks on run folders: one sweep per output folder, one process per cell.

Local folders: an OS file lock (`flock`), released by the kernel when its process dies, so a kill
never leaves a stale lock behind. Object stores (gs://): a lock object created only if absent (see
`doa_jax.storage`). The lock records who holds it, for the message a second process gets.
"""
from __future__ import annotations

import contextlib
import os

from doa_jax import storage

Busy = storage.Busy


@contextlib.contextmanager
def hold(path: str | os.PathLike, what: str):
    """Holds the lock at `path` for the duration; raises `Busy` naming `what` and the holder."""
    with storage.hold(path, what):
        yield
