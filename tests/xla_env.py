"""The XLA flags of the test session, for conftest.py and for the child processes tests start.

The suite's main cost is compiling many tiny programs that then run in microseconds: they compile
at XLA's lowest CPU backend optimisation (about 30% less compile time measured here; the programs'
HLO is unchanged; results may differ in the last bits, within every tolerance the tests use).
Children (resume, multi-host, predict) get the same flags with their own device count, so their
programs are the session's (one compilation cache serves both) and compile as cheaply.
"""
import os

FAST_COMPILE = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")
DEVICE_COUNT = "--xla_force_host_platform_device_count"


def flags(device_count: int, base: str | None = None) -> str:
    """`base` (default: $XLA_FLAGS) with the CPU device count set to `device_count` and the
    fast-compile flags added where `base` does not set them."""
    kept = [f for f in (os.environ.get("XLA_FLAGS", "") if base is None else base).split()
            if not f.startswith(DEVICE_COUNT)]
    kept += [f for f in FAST_COMPILE if not any(k.startswith(f.split("=")[0]) for k in kept)]
    return " ".join([f"{DEVICE_COUNT}={device_count}", *kept])
