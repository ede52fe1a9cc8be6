"""`doa`'s persistent XLA compilation cache: on by default in a user cache folder, the user's own
JAX_COMPILATION_CACHE_DIR respected, DOA_COMPILATION_CACHE=off honoured, and off inside
`doa calibrate` (which times cold compiles)."""
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import pytest

from doa_jax import cli, platforms
from doa_jax.experiment import calibration

PROBE = ("import json; from doa_jax import cli; d = cli.compilation_cache(); import jax; "
         "print(json.dumps([d, jax.config.jax_compilation_cache_dir, "
         "jax.config.jax_persistent_cache_min_compile_time_secs, jax.config.jax_enable_compilation_cache]))")


def _probe(tmp_path, **env):
    clean = {k: v for k, v in os.environ.items()
             if k not in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", cli.CACHE_ENV)}
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True,
                          env={**clean, "XDG_CACHE_HOME": str(tmp_path / "xdg"), **env})
    return json.loads(proc.stdout.splitlines()[-1])


def test_the_cache_is_on_by_default_in_the_user_cache_folder_for_programs_of_any_compile_time(tmp_path):
    where = str(tmp_path / "xdg" / "doa_jax" / "xla")
    assert _probe(tmp_path) == [where, where, 0.0, True]


def test_a_cache_folder_the_user_set_is_the_one_used(tmp_path):
    mine = str(tmp_path / "mine")
    assert _probe(tmp_path, JAX_COMPILATION_CACHE_DIR=mine)[:2] == [mine, mine]


def test_doa_compilation_cache_off_leaves_jax_without_a_cache(tmp_path):
    assert _probe(tmp_path, DOA_COMPILATION_CACHE="off")[:2] == [None, None]


def test_doa_compilation_cache_off_wins_over_a_cache_folder_set_elsewhere(tmp_path):
    got = _probe(tmp_path, DOA_COMPILATION_CACHE="off", JAX_COMPILATION_CACHE_DIR=str(tmp_path / "elsewhere"))
    assert got[0] is None and got[3] is False


def _entries(directory) -> set:
    return set(os.listdir(directory)) if os.path.isdir(directory) else set()


@pytest.fixture
def own_cache(tmp_path):
    """This test's own cache folder (the session's is shared with the other xdist worker, which
    writes to it meanwhile)."""
    from jax.experimental.compilation_cache import compilation_cache as jax_cache

    previous = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "xla"))
    jax_cache.reset_cache()
    yield tmp_path / "xla"
    jax.config.update("jax_compilation_cache_dir", previous)
    jax_cache.reset_cache()


def test_inside_compilation_cache_off_nothing_is_written_to_the_cache_and_after_it_again(own_cache):
    directory = cli.compilation_cache()
    assert directory == str(own_cache)
    fresh = float(time.time_ns() % 10 ** 9) + 0.5      # a constant no earlier run compiled: a new program
    before = _entries(directory)
    with platforms.compilation_cache_off():
        jax.jit(lambda x: x * fresh + 17.0)(jnp.ones(3)).block_until_ready()
    assert _entries(directory) == before
    jax.jit(lambda x: x * fresh - 19.0)(jnp.ones(3)).block_until_ready()
    assert len(_entries(directory) - before) >= 1


def test_doa_calibrate_measures_with_the_cache_off(tmp_path, monkeypatch):
    seen = {}

    def fake_calibrate(settings):
        seen["cache_enabled"] = jax.config.jax_enable_compilation_cache
        raise ValueError("stop here")

    monkeypatch.setattr(calibration, "calibrate", fake_calibrate)
    assert cli.main(["calibrate", "--accelerator", "cpu", "--teacher", "tiny", "--student", "tiny",
                     "--task", "demo", "--out", str(tmp_path / "c.json")]) == 2
    assert seen == {"cache_enabled": False} and jax.config.jax_enable_compilation_cache
