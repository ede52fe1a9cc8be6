"""One path layer for the files doa-jax writes and reads: local paths and URLs (`gs://...`, or any
scheme fsspec knows, e.g. `memory://` in tests).

`path(p)` is a `pathlib.Path` for a local path (so local runs behave exactly as before) and an
`etils.epath.Path` for a URL (the path type Orbax and T5X use; `gs://` goes through gcsfs, for our
files and Orbax's alike, so one client and one set of credentials serve the run). Both have the
same pathlib API (`/`, `exists`, `read_text`, `write_text`, `open`, `iterdir`, `unlink`). Path
objects exist for the schemes epath knows (gs, s3, az, hf); the functions below that take a path
(`append_line`, `read_appended`, `write_atomic`, `hold`, `check_writable`) take any fsspec URL.

What an object store cannot do, and the design used instead:

* Appends (`results.jsonl`, ledgers, `metrics.jsonl`). Local: `open(.., "a")` + fsync, and a torn
  last line (a kill mid-write) is cut before the next append. Object store: one object per row,
  `<file>.rows/<time_ns>-<host>-<pid>-<n>`, listed and ordered by name on read (`read_appended`).
  A put is atomic, so no row is ever torn.
* Atomic replacement (`write_atomic`). Local: a temporary file, fsync, `os.replace`. Object store:
  a single put, which readers see whole or not at all.
* Locks (one sweep per OUTPUT_DIR, one process per cell; `hold`). Local: `flock` (the kernel frees
  it when the holder dies). Object store: a lock object created with `mode="create"` (GCS: the
  `ifGenerationMatch=0` precondition), so exactly one creator wins; it names its holder and is
  deleted on exit. A holder killed without cleanup leaves it: a process on the same host whose pid
  is gone takes it over; from another host the message names the object to delete.
* Directories do not exist on object stores: `makedirs` is a no-op there.
* Writers that can only write local files (SentencePiece's trainer, checkpoint savers that
  `doa convert` calls) write into a local temporary folder (`staged`), uploaded file by file
  when they finish without error; a failure leaves nothing at the URL.

Multi-host: every host runs the same command, and only process 0 writes shared files (the trainer's
chief writes metrics and config; `run_cell` and sweeps write rows on process 0 only), while Orbax's
collective save writes each checkpoint once into the one shared directory.
"""
from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import pathlib
import shutil
import socket
import tempfile
import time
import uuid
from typing import Iterator, Union

from etils import epath

import fsspec

# gs:// through gcsfs (fsspec) rather than TF's gfile: the client our own files use, and the one
# that honours STORAGE_EMULATOR_HOST. Read by epath at each call; a user's explicit choice wins.
os.environ.setdefault("EPATH_USE_TF", "false")

AnyPath = Union[pathlib.Path, epath.Path]
ROWS_SUFFIX = ".rows"
_counter = itertools.count()


class Busy(ValueError):
    """Another process holds the lock."""


def is_url(p: str | os.PathLike) -> bool:
    """True for `scheme://...` paths other than `file://`."""
    s = os.fspath(p)
    return "://" in s and not s.startswith("file://")


def path(p: str | os.PathLike) -> AnyPath:
    """`pathlib.Path` for a local path, `epath.Path` for a URL."""
    if isinstance(p, epath.Path) and not isinstance(p, pathlib.Path):
        return p
    s = os.fspath(p)
    if s.startswith("file://"):
        return pathlib.Path(s[len("file://"):])
    return epath.Path(s) if is_url(s) else pathlib.Path(s)


def absolute(p: str | os.PathLike) -> AnyPath:
    """`path(p)`, made absolute when local (URLs are absolute already)."""
    q = path(p)
    return q if is_url(q) else q.absolute()


def resolved(p: str | os.PathLike) -> AnyPath:
    """`path(p)`, made absolute with symlinks followed when local (URLs as they are)."""
    q = path(p)
    return q if is_url(q) else q.resolve()


def _fs(p: str | os.PathLike) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and key of a URL. For gs:// with GOOGLE_APPLICATION_CREDENTIALS set, that file
    is the token (a missing file is an error at once, not a fall-through to other credential
    sources that probe the network)."""
    s = os.fspath(p)
    creds = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
    if s.startswith("gs://") and creds and not os.environ.get("STORAGE_EMULATOR_HOST"):
        return fsspec.core.url_to_fs(s, token=creds)
    return fsspec.core.url_to_fs(s)


def read_bytes(p: str | os.PathLike) -> bytes:
    """The bytes of the file at `p` (a local path or any fsspec URL); FileNotFoundError when absent."""
    if not is_url(p):
        return pathlib.Path(p).read_bytes()
    fs, key = _fs(p)
    return fs.cat_file(key)


def join(p: str | os.PathLike, name: str) -> str:
    """`p/name` for a local path or a URL (any fsspec scheme), as a string."""
    return f"{os.fspath(p).rstrip('/')}/{name}" if is_url(p) else os.path.join(os.fspath(p), name)


def makedirs(p: str | os.PathLike) -> None:
    """Creates a local directory (and parents); nothing on an object store."""
    if not is_url(p):
        pathlib.Path(p).mkdir(parents=True, exist_ok=True)


def write_atomic(p: str | os.PathLike, data: bytes | str) -> None:
    """Replaces the file at `p` all at once: readers see the old or the new content, never a part."""
    data = data.encode("utf-8") if isinstance(data, str) else data
    if is_url(p):
        fs, key = _fs(p)
        fs.pipe_file(key, data)
        return
    p = pathlib.Path(p)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f"{p.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)


# ----------------------------------------------------------------------------- append-only logs

def _row_keys(p: str | os.PathLike) -> list[str]:
    fs, key = _fs(p)
    try:
        return sorted(fs.ls(key + ROWS_SUFFIX, detail=False, refresh=True))
    except FileNotFoundError:
        return []


def log_exists(p: str | os.PathLike) -> bool:
    """True when the append-only log `p` has been written (a file, or row objects)."""
    return bool(_row_keys(p)) if is_url(p) else pathlib.Path(p).exists()


def read_appended(p: str | os.PathLike) -> bytes:
    """The bytes of the append-only log `p` (b"" when absent): the file, or its row objects in order."""
    if not is_url(p):
        p = pathlib.Path(p)
        return p.read_bytes() if p.exists() else b""
    fs, _ = _fs(p)
    keys = _row_keys(p)
    return b"".join(fs.cat_file(k) for k in keys)


def cut_torn_line(p: str | os.PathLike) -> None:
    """Cuts a local log's last line without its newline (a write a kill cut short); rows on an
    object store are whole or absent, so there is nothing to cut there."""
    if is_url(p) or not pathlib.Path(p).exists():
        return
    data = pathlib.Path(p).read_bytes()
    if data and not data.endswith(b"\n"):
        with open(p, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def append_line(p: str | os.PathLike, line: str, *, durable: bool = True) -> None:
    """Appends one line (its newline added) to the log `p`; local appends first cut a torn last line."""
    text = line.rstrip("\n") + "\n"
    if is_url(p):
        fs, key = _fs(p)
        name = f"{time.time_ns():020d}-{socket.gethostname()}-{os.getpid()}-{next(_counter):06d}"
        fs.pipe_file(f"{key}{ROWS_SUFFIX}/{name}", text.encode("utf-8"))
        return
    p = pathlib.Path(p)
    p.parent.mkdir(parents=True, exist_ok=True)
    cut_torn_line(p)
    with open(p, "a", encoding="utf-8") as f:
        f.write(text)
        if durable:
            f.flush()
            os.fsync(f.fileno())


def rewrite_appended(p: str | os.PathLike, lines: list[str]) -> None:
    """Replaces the log's content with `lines` (each ending in a newline)."""
    if not is_url(p):
        write_atomic(p, "".join(lines))
        return
    fs, _ = _fs(p)
    old = _row_keys(p)
    if lines:
        append_line(p, "".join(lines).rstrip("\n"))
    for key in old:
        fs.rm_file(key)


# ----------------------------------------------------------------------------- locks

@contextlib.contextmanager
def hold(p: str | os.PathLike, what: str) -> Iterator[None]:
    """Holds the lock at `p` for the duration; raises `Busy` naming `what` and the holder."""
    if is_url(p):
        with _hold_object(os.fspath(p), what):
            yield
        return
    p = pathlib.Path(p)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise Busy(f"{what} is being run by {holder} (it holds {p}); wait for it, or stop it and rerun") \
                from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale(holder: str) -> bool:
    """True when the lock's holder ran on this host and its process is gone."""
    parts = holder.split()
    if len(parts) < 4 or parts[0] != "pid" or parts[2] != "on" or not parts[1].isdigit():
        return False
    return parts[3] == socket.gethostname() and not _pid_alive(int(parts[1]))


@contextlib.contextmanager
def _hold_object(p: str, what: str) -> Iterator[None]:
    fs, key = _fs(p)
    me = f"pid {os.getpid()} on {socket.gethostname()} ({uuid.uuid4().hex[:8]})"
    for attempt in range(2):
        try:
            fs.pipe_file(key, me.encode(), mode="create")
            break
        except FileExistsError:
            holder = fs.cat_file(key).decode(errors="replace").strip()
            if attempt == 0 and _stale(holder):
                fs.rm_file(key)      # its holder died on this host: take the lock over
                continue
            raise Busy(f"{what} is being run by {holder} (it holds the lock object {p}); wait for it, or, "
                       f"if that process is gone, delete {p} and rerun") from None
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(key)


# ----------------------------------------------------------------------------- local-only writers

def exists(p: str | os.PathLike) -> bool:
    """True when a file, folder or (URL) any object at or under `p` exists."""
    if not is_url(p):
        return os.path.lexists(p)
    fs, key = _fs(p)
    return fs.exists(key)


def remove(p: str | os.PathLike) -> None:
    """Removes the file or folder at `p` (on an object store: every object under it)."""
    if not is_url(p):
        shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.unlink(p)
        return
    fs, key = _fs(p)
    fs.rm(key, recursive=True)


def upload(local: str | os.PathLike, url: str | os.PathLike) -> None:
    """Copies a local file to the URL, or each file of a local folder under it (one put each)."""
    local = pathlib.Path(local)
    fs, key = _fs(url)
    key = key.rstrip("/")
    files = [local] if local.is_file() else sorted(f for f in local.rglob("*") if f.is_file())
    for f in files:
        fs.put_file(str(f), key if f == local else f"{key}/{f.relative_to(local).as_posix()}")


@contextlib.contextmanager
def staged(p: str | os.PathLike) -> Iterator[pathlib.Path]:
    """A local path to write `p` at, for writers that only write local files: `p` itself when local;
    for a URL, a path of the same name in a temporary folder, whose file (or folder's files) is
    uploaded to `p` when the block ends without error."""
    if not is_url(p):
        yield pathlib.Path(p)
        return
    url = os.fspath(p).rstrip("/")
    with tempfile.TemporaryDirectory(prefix="doa-staged-") as tmp:
        local = pathlib.Path(tmp) / url.rsplit("/", 1)[-1]
        yield local
        upload(local, url)


# ----------------------------------------------------------------------------- preflight

def check_writable(p: str | os.PathLike, what: str = "output folder") -> None:
    """Fails fast, before any compute, when `p` cannot be written: a missing bucket, missing or
    bad credentials, no permission. Writes and deletes one small probe object (URLs only; a local
    folder is created as before). Raises ValueError naming `p` and the cause."""
    if not is_url(p):
        return
    probe = f"{os.fspath(p).rstrip('/')}/.doa_write_probe-{uuid.uuid4().hex[:8]}"
    try:
        fs, key = _fs(probe)
        fs.pipe_file(key, b"probe")
        fs.rm_file(key)
    except Exception as e:   # any client error: credentials, bucket, network, permission
        creds = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
        hint = (f"GOOGLE_APPLICATION_CREDENTIALS={creds}" if creds else
                "no GOOGLE_APPLICATION_CREDENTIALS (run `gcloud auth application-default login`, or use the "
                "TPU VM's service account)")
        raise ValueError(f"cannot write the {what} {os.fspath(p)}: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else e!r} (check the bucket name and that the "
                         f"credentials may write it; {hint})") from None


__all__ = ["Busy", "absolute", "append_line", "check_writable", "cut_torn_line", "exists", "hold", "is_url",
           "log_exists", "makedirs", "path", "read_appended", "remove", "rewrite_appended", "staged", "upload",
           "write_atomic"]
