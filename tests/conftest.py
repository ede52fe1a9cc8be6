"""Test setup: a fake 8-device CPU mesh, quiet TensorFlow, float32 matmuls, shared paths."""
import collections
import importlib.util
import os
import pathlib
import sys

import xla_env  # noqa: E402  (tests/ is on sys.path: rootdir-relative conftest)

# A fake 8-device CPU mesh (unless the caller set a device count), compiled cheaply (xla_env).
_count = next((f.split("=")[1] for f in os.environ.get("XLA_FLAGS", "").split()
               if f.startswith(xla_env.DEVICE_COUNT + "=")), "8")
os.environ["XLA_FLAGS"] = xla_env.flags(int(_count))
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

import doa_jax  # noqa: E402,F401  (before jax: no start-up notices of the aot extra's plugins; doa_jax/platforms.py)
import jax  # noqa: E402  (after XLA_FLAGS)
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from doa_jax import configurables  # noqa: E402

configurables.register()   # as the doa CLI does before parsing gin files

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = (REPO / ".." / "shared").resolve()
FIXTURES = SHARED / "fixtures" / "t5x_tiny"
DATA = SHARED / "data" / "doa"


def load_script(name: str):
    """A script of scripts/ as a module (they are not a package); registered in sys.modules, where the
    dataclasses of a script look their module up."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


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


def pytest_collection_modifyitems(config, items):
    """Files with slow tests first, the most first: xdist (`--dist loadfile`) hands out whole files
    in this order, so the long files start early on both workers and the short ones fill in at the
    end (its default order, most tests first, left the few-test long files for a one-worker tail)."""
    slow = collections.Counter(item.path for item in items if item.get_closest_marker("slow"))
    items.sort(key=lambda item: -slow[item.path])
