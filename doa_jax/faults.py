"""Faults of a store or a disk, sorted: transient ones (retried with backoff: `retrying`), and
the rest, raised as `StorageError`, one line naming the path and the cause (`describe`).

Transient: HTTP 408/429/5xx, a connection reset, refused or timed out (what gcsfs and aiohttp
raise for them). `retrying` retries those for up to `DOA_STORAGE_RETRY_S` seconds (default 300;
1 s doubling to 30 s, jittered, one line on stderr when it starts) on top of gcsfs's own six tries.
Permanent: no permission (403), a missing bucket or folder (404 on a write), a full, read-only or
over-quota disk; and a transient fault that outlasted the retries.
"""
from __future__ import annotations

import asyncio
import errno
import os
import random
import sys
import time
from typing import Callable, TypeVar

RETRY_ENV = "DOA_STORAGE_RETRY_S"
T = TypeVar("T")


class StorageError(OSError):
    """A read or write that cannot succeed: no permission, a missing bucket, a full disk, or a
    transient fault that outlasted the retries. Its message is one line naming the path."""


def _status(e: BaseException) -> int | None:
    for attr in ("code", "status"):
        value = getattr(e, attr, None)
        if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
            return int(value)
    return None


def transient(e: BaseException) -> bool:
    """True for a fault worth retrying: HTTP 408/429/5xx, a connection reset, refused or timed out."""
    code = _status(e)
    if code is not None:
        return code in (408, 429) or 500 <= code < 600
    if isinstance(e, (ConnectionError, TimeoutError, asyncio.TimeoutError)):
        return True
    kind = f"{type(e).__module__}.{type(e).__name__}"
    return kind.startswith(("aiohttp.", "requests.exceptions.")) or kind.endswith("FSTimeoutError")


def describe(e: BaseException) -> str:
    """The cause of a storage fault in a few words (first line of its message)."""
    if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left on device" in str(e):
        return "no space left on device (ENOSPC)"
    if isinstance(e, OSError) and e.errno == errno.EDQUOT:
        return "disk quota exceeded (EDQUOT)"
    if isinstance(e, OSError) and e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"{os.strerror(e.errno)} ({errno.errorcode[e.errno]})"
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    first = lines[0] if lines else ""
    if first.startswith("Forbidden:"):      # gcsfs's 403: "Forbidden: <url>" then GCS's message
        return "HTTP 403 Forbidden" + (f" ({lines[1]})" if len(lines) > 1 else "")
    code = _status(e)
    if isinstance(e, FileNotFoundError):
        first = "not found (a missing bucket or folder?)"
    elif code is not None and str(code) not in first:
        first = f"HTTP {code} {first}".strip()
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def retry_seconds() -> float:
    """How long a transient fault is retried (DOA_STORAGE_RETRY_S, default 300 s)."""
    try:
        return max(0.0, float(os.environ.get(RETRY_ENV, "300")))
    except ValueError:
        raise ValueError(f"{RETRY_ENV} must be a number of seconds, got {os.environ[RETRY_ENV]!r}") from None


def retrying(verb: str, p: str | os.PathLike, fn: Callable[[], T], *, missing_ok: bool = False) -> T:
    """`fn()`, retried with exponential backoff (1 s doubling to 30 s, jittered) while it fails
    transiently, for up to `retry_seconds()`; any other failure (or one that outlasts the retries)
    raises `StorageError` "cannot <verb> <p>: <cause>". FileNotFoundError passes through as it is
    when `missing_ok` (a read of what is absent)."""
    deadline, delay, said = time.monotonic() + retry_seconds(), 1.0, False
    while True:
        try:
            return fn()
        except FileNotFoundError:
            if missing_ok:
                raise
            raise StorageError(f"cannot {verb} {os.fspath(p)}: {describe(FileNotFoundError())}") from None
        except StorageError:
            raise
        except Exception as e:   # noqa: BLE001 (clients raise many types; each is sorted here)
            if not (transient(e) and time.monotonic() + delay < deadline):
                raise StorageError(f"cannot {verb} {os.fspath(p)}: {describe(e)}"
                                   + (f" (still failing after {retry_seconds():.0f} s of retries)"
                                      if transient(e) else "")) from None
            if not said:
                print(f"storage: {verb} {os.fspath(p)} failed ({describe(e)}); retrying with backoff for up to "
                      f"{retry_seconds():.0f} s", file=sys.stderr, flush=True)
                said = True
            time.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, 30.0)
