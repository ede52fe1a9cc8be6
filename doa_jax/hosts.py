"""Multi-host jobs: starting one (`jax.distributed`), and noticing a host that went away.

Every host runs the same command; `initialize_distributed` joins the job (before any other JAX
call) and records which pid on which host each process is, so a message can name it.

A host that goes away (killed, crashed, its VM reclaimed) must not leave the others waiting in a
collective or in JAX's shutdown barrier. Each process keeps one TCP connection to every other
(`_PeerWatch`, addresses exchanged through JAX's coordination service): when one closes while
its process is not exiting, the peer went away, and the watcher says who in one line and exits at
once with HOST_LOST_EXIT (75). That is immediate for a process that dies (its kernel closes its
sockets); a machine that vanishes without a word is found by TCP keepalive within ~25 s, and at
the latest JAX's coordination service declares a host gone after `host_timeout_s`
(`--host_timeout`, 60 s) of missed heartbeats and stops every process itself. A collective that
fails because a peer left is reported the same way (`exit_if_hosts_lost`, called by `doa`).
"""
from __future__ import annotations

import atexit
import contextlib
import os
import socket
import sys
import threading
import time
from typing import Optional, Sequence

import jax

HOST_LOST_EXIT = 75      # EX_TEMPFAIL: a host of the job went away; rerun on every host
KEEPALIVE = {"TCP_KEEPIDLE": 10, "TCP_KEEPINTVL": 5, "TCP_KEEPCNT": 3}   # a silent peer: gone in ~25 s
HOST_TIMEOUT_S = 60      # default heartbeat timeout of a multi-host job (JAX's own default is 100 s)
_HOSTS: list[str] = []    # "pid N on HOST" of each process of the job, recorded at start


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None,
                           local_device_ids: Optional[Sequence[int]] = None,
                           auto: bool = False, host_timeout_s: int = HOST_TIMEOUT_S, label: str = "doa") -> None:
    """Starts multi-host JAX (`jax.distributed.initialize`) before any other JAX call.

    GPU clusters pass `coordinator_address` ('host:port' of process 0), `num_processes` and
    `process_id`; Cloud TPU VMs and SLURM detect them (`auto=True`). A no-op otherwise. A process
    silent for `host_timeout_s` seconds is declared gone (and the job stops on every host); one
    that dies is noticed at once, and `label` (e.g. "doa sweep") starts the line that says so.
    """
    given = [coordinator_address, num_processes, process_id]
    if all(v is None for v in given) and not auto:
        return
    if not auto and any(v is None for v in given):
        raise ValueError("multi-host start needs coordinator_address, num_processes and process_id "
                         "together (or auto-detection on a TPU VM / SLURM)")
    if host_timeout_s < 1:
        raise ValueError(f"the host timeout must be >= 1 s, got {host_timeout_s}")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, local_device_ids=local_device_ids,
                               heartbeat_timeout_seconds=host_timeout_s, shutdown_timeout_seconds=host_timeout_s)
    _record_hosts()
    _PeerWatch.start(label)


class _PeerWatch:
    """One TCP connection between each pair of processes (the lower index connects to the higher
    one's listening port, published in the coordination service); a thread per connection reads
    it, and a connection that ends while this process is not exiting means its peer went away."""

    exiting = False
    label = "doa"
    _lock = threading.Lock()

    @classmethod
    def start(cls, label: str) -> None:
        cls.label = label
        me, n = jax.process_index(), jax.process_count()
        server = socket.create_server(("", 0))
        client = _client()
        client.key_value_set(f"doa/watch/{me}", f"{_address_towards_coordinator()}:{server.getsockname()[1]}")
        threading.Thread(target=cls._accept, args=(server, me), name="doa-peer-watch", daemon=True).start()
        for peer in range(me + 1, n):
            address = client.blocking_key_value_get(f"doa/watch/{peer}", 60_000)
            host, port = address.rsplit(":", 1)
            try:
                conn = socket.create_connection((host, int(port)), timeout=10)
                conn.sendall(f"{me}\n".encode())
            except OSError as e:       # a firewall between the hosts: JAX's heartbeat still notices
                print(f"{label}: note: cannot watch {describe_host(peer)} at {address} ({e}); a host that goes away "
                      f"is noticed within the host timeout instead", file=sys.stderr, flush=True)
                continue
            cls._watch(conn, peer)
        atexit.register(cls._at_exit)

    @classmethod
    def _accept(cls, server: socket.socket, me: int) -> None:
        for _ in range(me):           # one connection from each lower process (that could reach it)
            conn, _ = server.accept()
            with contextlib.suppress(OSError, ValueError):
                cls._watch(conn, int(conn.makefile().readline()))

    @classmethod
    def _watch(cls, conn: socket.socket, peer: int) -> None:
        conn.settimeout(None)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in KEEPALIVE.items():
            if hasattr(socket, name):
                conn.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
        threading.Thread(target=cls._read, args=(conn, peer), name=f"doa-peer-watch-{peer}", daemon=True).start()

    @classmethod
    def _read(cls, conn: socket.socket, peer: int) -> None:
        try:
            while conn.recv(64):
                pass
        except OSError:
            pass
        _exit_lost(f"{cls.label}: error: {describe_host(peer)} went away (its connection to process "
                   f"{jax.process_index()} closed); {_RERUN}")

    @classmethod
    def _at_exit(cls) -> None:
        with cls._lock:
            cls.exiting = True        # peers that exit now, past JAX's shutdown barrier, are not lost


_RERUN = "this process stops too. Rerun the same command on every host: the job resumes from what was saved"


def _exit_lost(line: str) -> None:
    """Says `line` and exits at once with HOST_LOST_EXIT (the first caller only; nothing when this
    process is already exiting normally)."""
    with _PeerWatch._lock:
        if _PeerWatch.exiting:
            return
        _PeerWatch.exiting = True
    print(line, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(HOST_LOST_EXIT)


def _address_towards_coordinator() -> str:
    """This host's IP address on the route to the coordinator (the one its peers reach it by)."""
    from jax._src import distributed

    host = (distributed.global_state.coordinator_address or "127.0.0.1:0").rsplit(":", 1)[0].strip("[]")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((host, 9))
            return probe.getsockname()[0]
        except OSError:
            return socket.gethostbyname(socket.gethostname())


def exit_if_hosts_lost(error: BaseException, prefix: str) -> None:
    """When `error` struck because a host of the job went away: says `PREFIX: error: <who went
    away>` and exits at once with HOST_LOST_EXIT (Python's exit would wait in JAX's shutdown
    barrier for the lost host). Returns when no host was lost."""
    lost = lost_hosts_message(error)
    if lost:
        _exit_lost(f"{prefix}: error: {lost}")


def _client():
    from jax._src import distributed   # the coordination service's client (no public handle)

    return distributed.global_state.client


def _record_hosts() -> None:
    """Every process's "pid N on HOST", in the coordination service's key-value store and here."""
    client = _client()
    client.key_value_set(f"doa/host/{jax.process_index()}", f"pid {os.getpid()} on {socket.gethostname()}")
    _HOSTS[:] = [client.blocking_key_value_get(f"doa/host/{i}", 60_000) for i in range(jax.process_count())]


def describe_host(index: int) -> str:
    """`process I (pid N on HOST)` (the host part once the job has recorded it)."""
    return f"process {index} ({_HOSTS[index]})" if index < len(_HOSTS) else f"process {index}"


def lost_hosts_message(error: BaseException, wait_s: float = 5.0) -> Optional[str]:
    """One line naming the processes of a multi-host job that went away when `error` struck, or
    None (one process, or every process still alive: `error` is an ordinary one). The
    coordination service is asked which processes are alive (for up to `wait_s` while it has not
    noticed yet); when it cannot be asked, process 0, which runs it, is the one gone."""
    if _client() is None or jax.process_count() == 1:     # not a multi-host job (no backend started for asking)
        return None
    everyone = list(range(jax.process_count()))
    text = str(error)
    if not any(s in text for s in ("Gloo", "onnection", "UNAVAILABLE", "Socket closed", "heartbeat")):
        wait_s = 0.0       # not a collective that lost a peer: ask once
    deadline = time.monotonic() + wait_s
    while True:
        try:
            gone = [i for i in everyone if i not in _client().get_live_nodes(everyone)]
        except Exception:   # noqa: BLE001 (the service is unreachable: the host that ran it is gone)
            gone = [0]
        if gone or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    if not gone:
        return None
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(error).__name__)
    who = ", ".join(describe_host(i) for i in gone)
    return f"{who} went away ({type(error).__name__}: {first[:200]}); {_RERUN}"


