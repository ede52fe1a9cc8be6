"""One path layer for the files doa-jax writes and reads: local paths and URLs (`gs://...`, or any
scheme fsspec knows, e.g. `memory://` in tests).

`path(p)` is a `pathlib.Path` for a local path (so local runs behave exactly as before) and an
`etils.epath.Path` for a URL (the path type Orbax and T5X use; `gs://` goes through gcsfs, for our
files and Orbax's alike, so one client and one set of credentials serve the run). Both have the
same pathlib API (`/`, `exists`, `read_text`, `write_text`, `open`, `iterdir`, `unlink`). Path
objects exist for the schemes epath knows (gs, s3, az, hf); the functions below that take a path
(`append_line`, `read_appended`, `write_atomic`, `create_new`, `check_writable`) take any fsspec URL.

What an object store cannot do, and the design used instead:

* Appends (`results.jsonl`, ledgers, `metrics.jsonl`). Local: `open(.., "a")` + fsync, and a torn
  last line (a kill mid-write) is cut before the next append. Object store: one object per row,
  `<file>.rows/<time_ns>-<host>-<pid>-<n>`, listed and ordered by name on read (`read_appended`).
  A put is atomic, so no row is ever torn.
* Atomic replacement (`write_atomic`). Local: a temporary file, fsync, `os.replace`. Object store:
  a single put, which readers see whole or not at all.
* Locks (`doa_jax.experiment.locking`, leases renewed by their holder) need one primitive here:
  `create_new`, an object created only if absent (GCS: the `ifGenerationMatch=0` precondition), so
  exactly one creator wins.
* Directories do not exist on object stores: `makedirs` is a no-op there.
* Writers that can only write local files (SentencePiece's trainer, checkpoint savers that
  `doa convert` calls) write into a local temporary folder (`staged`), uploaded file by file
  when they finish without error; a failure leaves nothing at the URL.

Multi-host: every host runs the same command, and only process 0 writes shared files (the trainer's
chief writes metrics and config; `run_cell` and sweeps write rows on process 0 only), while Orbax's
collective save writes each checkpoint once into the one shared directory.

Faults (sorted in `doa_jax.faults`). Transient ones (HTTP 408/429/5xx, a connection reset, a
timeout) are retried twice over: by gcsfs on every request (6 tries, backoff 1-32 s; TensorStore,
which writes Orbax's arrays, has its own), and here, for the functions below, with exponential
backoff for up to `DOA_STORAGE_RETRY_S` seconds (default 300) before giving up. A retried write may have landed
already; every write here is safe to repeat (a put of the same name, a delete of what is gone).
Permanent ones (no permission, a missing bucket, a full or read-only disk) raise `StorageError`:
one line naming the path and the cause, which `doa` prints as it is. Nothing written before is
touched: a failed local write leaves no temporary file, and a failed append cuts the part it
wrote. A kill leaves at most a temporary file named `<name>.<host>-<pid>.doa-tmp`, which
`clean_orphans` (run at the start of every cell and sweep) removes once its process is gone.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import os
import pathlib
import shutil
import socket
import tempfile
import time
import uuid
from typing import Callable, Iterator, Union

from etils import epath

import fsspec

from doa_jax.faults import StorageError, describe, retrying, transient  # noqa: F401  (callers use storage.*)

# gs:// through gcsfs (fsspec) rather than TF's gfile: the client our own files use, and the one
# that honours STORAGE_EMULATOR_HOST. Read by epath at each call; a user's explicit choice wins.
os.environ.setdefault("EPATH_USE_TF", "false")
# gcsfs logs each request it gives up on, with a traceback, through the root logger (absl prints
# it); the same failure reaches the caller as an exception, which says it in one line.
logging.getLogger("gcsfs").setLevel(logging.CRITICAL)

AnyPath = Union[pathlib.Path, epath.Path]
ROWS_SUFFIX = ".rows"
TMP_SUFFIX = ".doa-tmp"        # `<name>.<host>-<pid>.doa-tmp`: a write in progress (or cut short by a kill)
_counter = itertools.count()


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
    check_credentials(s)
    return epath.Path(s) if is_url(s) else pathlib.Path(s)


def check_credentials(p: str | os.PathLike) -> None:
    """For a gs:// path, fails at once (ValueError, one line naming it) when no Google credentials can
    exist here: no GOOGLE_APPLICATION_CREDENTIALS, no `gcloud auth application-default login` file, and
    not a Google Cloud VM (whose metadata server gives its service account). Without this check gcsfs
    probes the metadata server and retries for ~50 s before failing with a long traceback."""
    s = os.fspath(p)
    if not s.startswith("gs://") or os.environ.get("STORAGE_EMULATOR_HOST") or os.environ.get(
            "GOOGLE_APPLICATION_CREDENTIALS") or os.environ.get("GCE_METADATA_HOST"):
        return
    config = os.environ.get("CLOUDSDK_CONFIG") or os.path.join(os.path.expanduser("~"), ".config", "gcloud")
    if os.path.isfile(os.path.join(config, "application_default_credentials.json")) or _on_google_cloud():
        return
    raise ValueError(f"no Google Cloud credentials for {s}: set GOOGLE_APPLICATION_CREDENTIALS to a key file, run "
                     f"`gcloud auth application-default login`, or run on a Cloud VM (its service account)")


def _on_google_cloud() -> bool:
    """True on a Compute Engine or Cloud TPU VM (its DMI product name says Google), as google-auth checks."""
    try:
        with open("/sys/class/dmi/id/product_name") as f:
            return f.read().strip().startswith("Google")
    except OSError:
        return False


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
    check_credentials(s)
    creds = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
    if s.startswith("gs://") and creds and not os.environ.get("STORAGE_EMULATOR_HOST"):
        return fsspec.core.url_to_fs(s, token=creds)
    return fsspec.core.url_to_fs(s)


def read_bytes(p: str | os.PathLike) -> bytes:
    """The bytes of the file at `p` (a local path or any fsspec URL); FileNotFoundError when absent."""
    if not is_url(p):
        return pathlib.Path(p).read_bytes()
    fs, key = _fs(p)
    return retrying("read", p, lambda: fs.cat_file(key), missing_ok=True)


def join(p: str | os.PathLike, name: str) -> str:
    """`p/name` for a local path or a URL (any fsspec scheme), as a string."""
    return f"{os.fspath(p).rstrip('/')}/{name}" if is_url(p) else os.path.join(os.fspath(p), name)


def makedirs(p: str | os.PathLike) -> None:
    """Creates a local directory (and parents); nothing on an object store."""
    if not is_url(p):
        pathlib.Path(p).mkdir(parents=True, exist_ok=True)


def _tmp_name(p: pathlib.Path) -> pathlib.Path:
    return p.with_name(f"{p.name}.{socket.gethostname()}-{os.getpid()}{TMP_SUFFIX}")


def write_atomic(p: str | os.PathLike, data: bytes | str) -> None:
    """Replaces the file at `p` all at once: readers see the old or the new content, never a part.
    A failure leaves the old content and no temporary file, and raises `StorageError`."""
    data = data.encode("utf-8") if isinstance(data, str) else data
    if is_url(p):
        fs, key = _fs(p)
        retrying("write", p, lambda: fs.pipe_file(key, data))
        return
    p = pathlib.Path(p)
    tmp = _tmp_name(p)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise StorageError(f"cannot write {p}: {describe(e)}") from None


def create_new(p: str | os.PathLike, data: bytes) -> bool:
    """Creates the object `p` holding `data` only if it does not exist (GCS: `ifGenerationMatch=0`,
    so of several creators exactly one wins); True when this call created it. URLs only (local
    locks are the kernel's `flock`)."""
    fs, key = _fs(p)

    def put() -> bool:
        try:
            fs.pipe_file(key, data, mode="create")
            return True
        except FileExistsError:
            return False

    return retrying("create", p, put)


def delete(p: str | os.PathLike) -> None:
    """Deletes the file or object at `p`; nothing when it is already gone (a retried delete)."""
    if not is_url(p):
        pathlib.Path(p).unlink(missing_ok=True)
        return
    fs, key = _fs(p)
    with contextlib.suppress(FileNotFoundError):
        retrying("delete", p, lambda: fs.rm_file(key), missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def process_gone(host: str, pid: int) -> bool:
    """True when `pid` ran on this host and is no longer running (on another host: unknown, False)."""
    return host == socket.gethostname() and not _pid_alive(pid)


def clean_orphans(root: str | os.PathLike) -> list[pathlib.Path]:
    """Removes the temporary files (and staging folders) under the local folder `root` that writers
    on this host left when killed mid-write (their process is gone); returns what it removed.
    Nothing on an object store, where a put is whole or absent."""
    if is_url(root) or not os.path.isdir(root):
        return []
    removed, here = [], socket.gethostname()
    for tmp in pathlib.Path(root).rglob(f"*{TMP_SUFFIX}"):
        rest, _, pid = tmp.name[: -len(TMP_SUFFIX)].rpartition("-")       # <name>.<host>-<pid>
        if pid.isdigit() and rest.endswith(f".{here}") and process_gone(here, int(pid)):
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


@contextlib.contextmanager
def local_staging(target: str | os.PathLike) -> Iterator[pathlib.Path]:
    """A temporary folder beside the local path `target` (same filesystem, so a file moved from it
    into place with `os.replace` appears whole); removed afterwards, and by `clean_orphans` after a
    kill."""
    target = pathlib.Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    folder = _tmp_name(target)
    folder.mkdir(exist_ok=True)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ----------------------------------------------------------------------------- append-only logs

def _row_keys(p: str | os.PathLike) -> list[str]:
    fs, key = _fs(p)

    def listing() -> list[str]:
        try:
            return sorted(fs.ls(key + ROWS_SUFFIX, detail=False, refresh=True))
        except FileNotFoundError:
            return []

    return retrying("list", f"{os.fspath(p)}{ROWS_SUFFIX}", listing)


def log_exists(p: str | os.PathLike) -> bool:
    """True when the append-only log `p` has been written (a file, or row objects)."""
    return bool(_row_keys(p)) if is_url(p) else pathlib.Path(p).exists()


def _read_rows(p: str | os.PathLike) -> list[tuple[str, bytes]]:
    """(key, bytes) of each row object of the log `p`, in order (a row deleted meanwhile is skipped)."""
    fs, _ = _fs(p)
    out = []
    for k in _row_keys(p):
        with contextlib.suppress(FileNotFoundError):
            out.append((k, retrying("read a row of", p, lambda k=k: fs.cat_file(k), missing_ok=True)))
    return out


def read_appended(p: str | os.PathLike) -> bytes:
    """The bytes of the append-only log `p` (b"" when absent): the file, or its row objects in order."""
    if not is_url(p):
        p = pathlib.Path(p)
        return p.read_bytes() if p.exists() else b""
    return b"".join(data for _, data in _read_rows(p))


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
    """Appends one line (its newline added) to the log `p`; local appends first cut a torn last
    line. A failed local append cuts what it wrote and raises `StorageError`."""
    text = line.rstrip("\n") + "\n"
    if is_url(p):
        fs, key = _fs(p)
        # The name is fixed before the first try, so a retry of a put that landed rewrites the same row.
        name = f"{time.time_ns():020d}-{socket.gethostname()}-{os.getpid()}-{next(_counter):06d}"
        retrying("append to", p, lambda: fs.pipe_file(f"{key}{ROWS_SUFFIX}/{name}", text.encode("utf-8")))
        return
    p = pathlib.Path(p)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        cut_torn_line(p)
        with open(p, "a", encoding="utf-8") as f:
            size = f.tell()
            try:
                f.write(text)
                f.flush()
                if durable:
                    os.fsync(f.fileno())
            except OSError:
                with contextlib.suppress(OSError):
                    f.truncate(size)          # frees what the cut-short write took
                raise
    except OSError as e:
        raise StorageError(f"cannot append to {p}: {describe(e)}") from None


def rewrite_appended(p: str | os.PathLike, keep: Callable[[str], bool]) -> None:
    """Keeps only the log's lines that `keep` accepts. On an object store each row object is
    rewritten (or deleted) on its own, so a kill part-way leaves no line twice and repeating the
    call finishes the job."""
    if not is_url(p):
        data = read_appended(p).decode("utf-8", errors="replace")
        write_atomic(p, "".join(line + "\n" for line in data.splitlines() if keep(line)))
        return
    fs, _ = _fs(p)
    where = os.fspath(p)
    for key, data in _read_rows(p):
        lines = data.decode("utf-8", errors="replace").splitlines()
        kept = "".join(line + "\n" for line in lines if keep(line))
        if not kept:
            with contextlib.suppress(FileNotFoundError):
                retrying("delete a row of", where, lambda key=key: fs.rm_file(key), missing_ok=True)
        elif len(kept.splitlines()) != len(lines):
            retrying("rewrite a row of", where, lambda key=key, kept=kept: fs.pipe_file(key, kept.encode("utf-8")))


# ----------------------------------------------------------------------------- local-only writers

def exists(p: str | os.PathLike) -> bool:
    """True when a file, folder or (URL) any object at or under `p` exists."""
    if not is_url(p):
        return os.path.lexists(p)
    fs, key = _fs(p)
    return retrying("look up", p, lambda: fs.exists(key))


def remove(p: str | os.PathLike) -> None:
    """Removes the file or folder at `p` (on an object store: every object under it)."""
    if not is_url(p):
        shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.unlink(p)
        return
    fs, key = _fs(p)
    with contextlib.suppress(FileNotFoundError):
        retrying("remove", p, lambda: fs.rm(key, recursive=True), missing_ok=True)


def upload(local: str | os.PathLike, url: str | os.PathLike) -> None:
    """Copies a local file to the URL, or each file of a local folder under it (one put each)."""
    local = pathlib.Path(local)
    fs, key = _fs(url)
    key = key.rstrip("/")
    files = [local] if local.is_file() else sorted(f for f in local.rglob("*") if f.is_file())
    for f in files:
        dest = key if f == local else f"{key}/{f.relative_to(local).as_posix()}"
        retrying("upload to", url, lambda f=f, dest=dest: fs.put_file(str(f), dest))


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
    check_credentials(p)
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


__all__ = ["StorageError", "absolute", "append_line", "check_credentials", "check_writable", "clean_orphans", "create_new", "cut_torn_line",
           "delete", "exists", "is_url", "local_staging", "log_exists", "makedirs", "path", "process_gone",
           "read_appended", "read_bytes", "remove", "retrying", "rewrite_appended", "staged", "transient", "upload",
           "write_atomic"]
