"""Exclusive locks on run folders: one sweep per output folder, one process per cell.

Local folders: an OS file lock (`flock`), released by the kernel when its process dies, so a kill
never leaves a stale lock behind. Object stores (gs://): a lock object created only if absent (see
`doa_jax.storage`). The lock records who holds it, for the message a second process gets.
Multi-host: process 0 takes the lock for the job (`hold_on_chief`) and tells every process whether
it got it, so all go on or all stop with the same message.
"""
from __future__ import annotations

import contextlib
import os

from doa_jax import partitioning, storage

Busy = storage.Busy


@contextlib.contextmanager
def hold(path: str | os.PathLike, what: str):
    """Holds the lock at `path` for the duration; raises `Busy` naming `what` and the holder."""
    with storage.hold(path, what):
        yield


@contextlib.contextmanager
def hold_on_chief(path: str | os.PathLike, what: str):
    """`hold` taken by process 0 for every process of the job; raises `Busy` on all when it is held."""
    with contextlib.ExitStack() as stack:
        def take():
            try:
                stack.enter_context(storage.hold(path, what))
            except Busy as e:
                return str(e)
            return None

        refused = partitioning.from_chief(take)
        if refused:
            raise Busy(refused)
        yield
