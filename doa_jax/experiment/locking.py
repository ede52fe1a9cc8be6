"""Exclusive locks on run folders, with leases: one sweep per output folder, one process per cell.

A lock names its holder (pid, host, when it took the lock) and carries a lease: the holder
renews it every third of `lease_s` from a background thread while it works (`DOA_LOCK_LEASE_S`,
default 120 s). A second process that finds the lock
- refuses with `Busy` naming the holder, its host and how long it has held the lock, while the
  lease is live;
- takes it over with a one-line warning when the lease ran out (its holder died, on this host or
  on one that no longer exists, as after a spot preemption: nobody renews it), or when the holder
  ran on this host and its process is gone;
- takes it whatever its state with `take_over=True` (`doa run|sweep --take_over_lock`), warning
  whose lock it took. The holder that lost its lock notices at its next renewal and says so.

Local folders: the lock file is also held with `flock`, which the kernel releases when its
process dies, so a lock on this host is free the moment its holder is gone (the record it left
is reported as taken over); a live holder's `flock` is broken only by `take_over` (or for a
holder on another host, a network filesystem, whose lease ran out) by replacing the file.
Object stores (gs://): a lock object created only if absent (`storage.create_new`), renewed by
rewriting it, deleted on release. Leases compare wall clocks across hosts: keep them in sync
(NTP; Cloud VMs are). Multi-host: process 0 takes the lock for the job (`hold_on_chief`) and
tells every process whether it got it, so all go on or all stop with the same message.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import pathlib
import socket
import sys
import threading
import time
import uuid
from typing import Iterator, Optional

from doa_jax import partitioning, storage

LEASE_ENV = "DOA_LOCK_LEASE_S"
TAKE_OVER_FLAG = "--take_over_lock"


class Busy(ValueError):
    """Another live process holds the lock."""


def lease_seconds() -> float:
    """The lease a holder takes (DOA_LOCK_LEASE_S, default 120 s)."""
    try:
        value = float(os.environ.get(LEASE_ENV, "120"))
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"{LEASE_ENV} must be a positive number of seconds, got {os.environ[LEASE_ENV]!r}")
    return value


def _ago(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds} s" if seconds < 120 else f"{seconds // 60} min" if seconds < 7200 else f"{seconds // 3600} h"


@dataclasses.dataclass
class Holder:
    """Who holds a lock (its record); `renewed`/`lease_s` None for a record without a lease."""

    pid: int
    host: str
    id: str
    started: Optional[float] = None
    renewed: Optional[float] = None
    lease_s: Optional[float] = None

    @classmethod
    def new(cls, lease_s: float) -> "Holder":
        now = time.time()
        return cls(os.getpid(), socket.gethostname(), uuid.uuid4().hex[:12], now, now, lease_s)

    @classmethod
    def parse(cls, text: str) -> Optional["Holder"]:
        """The record's holder; None for an empty record (released); an older doa-jax's
        `pid N on HOST (id)` line gives a holder without a lease."""
        text = text.strip()
        if not text:
            return None
        with contextlib.suppress(json.JSONDecodeError, TypeError, KeyError, ValueError):
            d = json.loads(text)
            return cls(int(d["pid"]), str(d["host"]), str(d["id"]), d.get("started"), d.get("renewed"), d.get("lease_s"))
        parts = text.split()
        if len(parts) >= 4 and parts[0] == "pid" and parts[1].isdigit() and parts[2] == "on":
            return cls(int(parts[1]), parts[3], parts[4].strip("()") if len(parts) > 4 else "")
        return cls(-1, "?", text[:40])

    def record(self) -> bytes:
        return json.dumps(dataclasses.asdict(self)).encode()

    def renewed_now(self) -> "Holder":
        return dataclasses.replace(self, renewed=time.time())

    def gone(self) -> Optional[str]:
        """Why this holder no longer holds its lock, or None (it may be alive)."""
        if self.pid > 0 and storage.process_gone(self.host, self.pid):
            return "its process is gone"
        if self.renewed is not None and self.lease_s is not None and time.time() - self.renewed > self.lease_s:
            return f"its lease ran out ({self.lease_s:g} s; no renewal for {_ago(time.time() - self.renewed)})"
        return None

    def describe(self) -> str:
        text = f"pid {self.pid} on {self.host}" if self.pid > 0 else self.id
        if self.started is not None:
            text += f", holding it for {_ago(time.time() - self.started)}"
        if self.renewed is not None:
            text += f", lease renewed {_ago(time.time() - self.renewed)} ago"
        return text


def _warn(text: str) -> None:
    print(f"warning: {text}", file=sys.stderr, flush=True)


def _busy(what: str, path, holder: Optional[Holder]) -> Busy:
    who = holder.describe() if holder else "another process"
    return Busy(f"{what} is being run by {who} (lock {path}); wait for it, or stop it and rerun; if that process "
                f"is gone for good (a host that no longer exists), rerun with {TAKE_OVER_FLAG}")


class _Renewer:
    """Renews a held lock's lease every third of the lease, until stopped; says once if the lock
    was taken over (or cannot be renewed)."""

    def __init__(self, lock: "_Lock"):
        self.lock, self.stop = lock, threading.Event()
        self.thread = threading.Thread(target=self._run, name="doa-lock-lease", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        said = False
        while not self.stop.wait(self.lock.me.lease_s / 3):
            try:
                if not self.lock.renew():
                    _warn(f"the lock {self.lock.path} was taken over by another process: this one no longer holds it")
                    return
                said = False
            except Exception as e:   # noqa: BLE001 (the work goes on; the lease may lapse)
                if not said:
                    _warn(f"cannot renew the lease of {self.lock.path} ({e}); retrying")
                    said = True

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10)


class _Lock:
    def __init__(self, path, what: str, lease_s: float):
        self.path, self.what, self.me = path, what, Holder.new(lease_s)

    def _taking_over(self, holder: Optional[Holder], why: str) -> None:
        if holder is not None:
            _warn(f"taking over the lock {self.path} of {self.what} from {holder.describe()}: {why}")


class _LocalLock(_Lock):
    """`flock` on a local file holding the record."""

    def acquire(self, take_over: bool) -> None:
        self.path = pathlib.Path(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._read()
            why = "asked to (--take_over_lock)" if take_over else (
                holder.gone() if holder and holder.host != socket.gethostname() else None)
            if not why:
                self.file.close()
                raise _busy(self.what, self.path, holder) from None
            self._taking_over(holder, why)
            self.file.close()
            self.path.unlink(missing_ok=True)           # its holder keeps a lock on a file nobody opens
            self.file = open(self.path, "a+")
            try:
                fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.file.close()
                raise _busy(self.what, self.path, self._read_path()) from None
        else:
            self._taking_over(self._read(), "it was left by a process that ended without releasing it")
        self._write(self.me)

    def _read(self) -> Optional[Holder]:
        self.file.seek(0)
        return Holder.parse(self.file.read())

    def _read_path(self) -> Optional[Holder]:
        with contextlib.suppress(OSError):
            return Holder.parse(self.path.read_text())
        return None

    def _write(self, holder: Holder) -> None:
        self.file.seek(0)
        self.file.truncate()
        self.file.write(holder.record().decode())
        self.file.flush()
        os.fsync(self.file.fileno())

    def _ours(self) -> bool:
        with contextlib.suppress(OSError):
            return os.stat(self.path).st_ino == os.fstat(self.file.fileno()).st_ino
        return False

    def renew(self) -> bool:
        if not self._ours():
            return False
        self.me = self.me.renewed_now()
        self._write(self.me)
        return True

    def release(self) -> None:
        if self._ours():
            self.file.seek(0)
            self.file.truncate()        # an empty record: released, not left by a dead holder
            self.file.flush()
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()


class _ObjectLock(_Lock):
    """A lock object on an object store (created only if absent)."""

    def _read(self) -> Optional[Holder]:
        try:
            return Holder.parse(storage.read_bytes(self.path).decode(errors="replace"))
        except FileNotFoundError:
            return None

    def acquire(self, take_over: bool) -> None:
        for _ in range(3):
            if storage.create_new(self.path, self.me.record()):
                return
            holder = self._read()
            if holder is None:          # released meanwhile
                continue
            if holder.id == self.me.id:  # a retried create whose first try had landed
                return
            why = "asked to (--take_over_lock)" if take_over else holder.gone()
            if not why:
                raise _busy(self.what, self.path, holder)
            self._taking_over(holder, why)
            storage.delete(self.path)
        raise _busy(self.what, self.path, self._read())

    def renew(self) -> bool:
        holder = self._read()
        if holder is None or holder.id != self.me.id:
            return False
        self.me = self.me.renewed_now()
        storage.write_atomic(self.path, self.me.record())
        return True

    def release(self) -> None:
        holder = self._read()
        if holder is not None and holder.id == self.me.id:
            storage.delete(self.path)


@contextlib.contextmanager
def hold(path: str | os.PathLike, what: str, *, take_over: bool = False,
         lease_s: Optional[float] = None) -> Iterator[None]:
    """Holds the lock at `path` for the duration, renewing its lease; raises `Busy` naming `what`,
    the holder, its host and age when a live process holds it (see the module's rules)."""
    cls = _ObjectLock if storage.is_url(path) else _LocalLock
    lock = cls(os.fspath(path) if storage.is_url(path) else path, what, lease_s or lease_seconds())
    lock.acquire(take_over)
    renewer = _Renewer(lock)
    try:
        yield
    finally:
        renewer.close()
        lock.release()


@contextlib.contextmanager
def hold_on_chief(path: str | os.PathLike, what: str, *, take_over: bool = False):
    """`hold` taken by process 0 for every process of the job; raises `Busy` on all when it is held."""
    with contextlib.ExitStack() as stack:
        def take():
            try:
                stack.enter_context(hold(path, what, take_over=take_over))
            except Busy as e:
                return str(e)
            return None

        refused = partitioning.from_chief(take)
        if refused:
            raise Busy(refused)
        yield
