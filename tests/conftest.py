"""Test setup: a fake 8-device CPU mesh, quiet TensorFlow, float32 matmuls, shared paths."""
import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
if "--xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
# The suite's main cost is compiling many tiny programs that then run in microseconds: compile
# them at XLA's lowest CPU backend optimisation (about 30% less compile time measured here; the
# programs' HLO is unchanged; results may differ in the last bits, within every tolerance the tests use).
for _flag in ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true"):
    if _flag.split("=")[0] not in os.environ["XLA_FLAGS"]:
        os.environ["XLA_FLAGS"] += " " + _flag
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# One persistent XLA compilation cache for the session and every subprocess it starts: the suite
# compiles the same tiny programs in many tests and CLI runs; a cache hit skips only compilation.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    str(pathlib.Path(__file__).resolve().parents[1] / ".pytest_cache" / "jax-compilation-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402  (after XLA_FLAGS)
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from doa_jax import configurables  # noqa: E402

configurables.register()   # as the doa CLI does before parsing gin files

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = (REPO / ".." / "shared").resolve()
FIXTURES = SHARED / "fixtures" / "t5x_tiny"
DATA = SHARED / "data" / "doa"


def require_shared(path: pathlib.Path) -> pathlib.Path:
    """Skip the calling test, with the reason, when ../shared (or a path under it) is absent."""
    if not path.exists():
        pytest.skip(f"shared material not found at {path} (../shared is absent on this machine)")
    return path


@pytest.fixture(scope="session")
def t5x_fixtures() -> pathlib.Path:
    return require_shared(FIXTURES)


@pytest.fixture(scope="session")
def doa_data() -> pathlib.Path:
    return require_shared(DATA)
