"""Which JAX platforms a doa process starts, and JAX imported without other hardware's start-up notices.

The `aot` extra installs libtpu and the CUDA plugin so that `doa aot` can compile for TPU slices
and NVIDIA GPUs this host does not have. Installed, JAX would probe both on every start: libtpu
looks for a TPU (and on a cloud VM asks the metadata server), the CUDA plugin logs "Could not find
cuda drivers" from C++ several times on every `import jax`, and the first device query prints a
plugin traceback. `prepare()` keeps every other command as it was on a CPU host:

* when JAX_PLATFORMS is unset, it names the platforms whose hardware this host has (a TPU or an
  NVIDIA GPU on the PCI bus, or their device files) plus `cpu`, so JAX probes nothing else;
  a TPU VM or a GPU box is left to JAX as before; a JAX_PLATFORMS you set is kept;
* it imports JAX and registers its plugins with C++ stderr captured, and passes on every line
  except the known notices of plugins whose hardware is absent (`NOTICES`).

It runs once, before the first `import jax` of the process (`doa_jax/__init__.py` calls it), and
only when such a plugin is installed: with plain JAX nothing changes. Backends are not started,
so `jax.distributed.initialize` can still follow.
"""
from __future__ import annotations

import contextlib
import glob
import importlib.util
import os
import re
import sys
import tempfile

# PCI vendor ids of the accelerators JAX has plugins for.
PCI_VENDORS = {"tpu": "0x1ae0", "cuda": "0x10de"}   # Google (Cloud TPU), NVIDIA
DEVICE_FILES = {"tpu": ("/dev/accel*", "/dev/vfio/[0-9]*"), "cuda": ("/dev/nvidia[0-9]*",)}
# Python modules whose presence means JAX will load that platform's plugin.
PLUGIN_MODULES = {"tpu": ("libtpu",), "cuda": ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_plugins.xla_cuda12",
                                              "jax_plugins.xla_cuda13")}
# What plugins print when their hardware is absent (dropped); the absl preamble goes with them.
NOTICES = re.compile(r"cudart_stub\.cc:\d+\] Could not find cuda drivers"
                     r"|^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR$")


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def plugins_installed() -> set[str]:
    """Accelerator platforms whose JAX plugin is importable here."""
    return {p for p, mods in PLUGIN_MODULES.items() if any(_installed(m) for m in mods)}


def hardware_present(pci_root: str = "/sys/bus/pci/devices") -> set[str]:
    """Accelerator platforms whose hardware this host has: a PCI device of the vendor, or its device files."""
    found = set()
    for vendor_file in glob.glob(os.path.join(pci_root, "*", "vendor")):
        try:
            with open(vendor_file) as f:
                vendor = f.read().strip().lower()
        except OSError:
            continue
        found |= {p for p, v in PCI_VENDORS.items() if vendor == v}
    for platform, patterns in DEVICE_FILES.items():
        if any(glob.glob(p) for p in patterns):
            found.add(platform)
    return found


def choose(environ=os.environ, *, installed=None, present=None) -> str | None:
    """The JAX_PLATFORMS to set, or None to leave it: unset before, and a plugin is installed for
    hardware this host lacks (then: the platforms present, then cpu)."""
    if environ.get("JAX_PLATFORMS"):
        return None
    installed = plugins_installed() if installed is None else installed
    present = hardware_present() if present is None else present
    if not installed - present:
        return None
    return ",".join([p for p in ("tpu", "cuda") if p in present] + ["cpu"])


def prepare() -> None:
    """Sets JAX_PLATFORMS as `choose` says and imports JAX quietly; a no-op once JAX is imported or
    when no plugin for absent hardware is installed."""
    if "jax" in sys.modules:
        return
    installed = plugins_installed()
    if not installed:
        return
    present = hardware_present()
    platforms = choose(installed=installed, present=present)
    if platforms:
        os.environ["JAX_PLATFORMS"] = platforms
    if installed - present:
        with filtered_stderr():
            import jax  # noqa: F401
            from jax._src import xla_bridge
            register = getattr(xla_bridge, "_discover_and_register_pjrt_plugins", None)
            if register is not None:   # plugin registration logs too; it starts no backend
                register()


class filtered_stderr:
    """Captures file descriptor 2 (C++ logs included) and re-emits it without the lines `NOTICES`
    matches (or, with `keep_all_on_error`, everything when the block raised)."""

    def __init__(self, notices: re.Pattern = NOTICES, keep_all_on_error: bool = True):
        self.notices, self.keep_all_on_error = notices, keep_all_on_error

    def __enter__(self):
        sys.stderr.flush()
        self._saved = os.dup(2)
        self._tmp = tempfile.TemporaryFile()
        os.dup2(self._tmp.fileno(), 2)
        return self

    def __exit__(self, exc_type, exc, tb):
        sys.stderr.flush()
        self.captured = ""
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._tmp.seek(0)
        text = self._tmp.read().decode("utf-8", errors="replace")
        self._tmp.close()
        self.captured = text
        keep_all = exc_type is not None and self.keep_all_on_error
        for line in text.splitlines(keepends=True):
            if keep_all or not self.notices.search(line.rstrip("\n")):
                sys.stderr.write(line)
        sys.stderr.flush()
        return False


@contextlib.contextmanager
def compilation_cache_off():
    """Inside, programs compile afresh: the persistent cache is neither read nor written.

    For `doa calibrate`, which times a cold compile (what a run pays on a machine whose cache does
    not hold its programs yet). JAX decides once per process whether it uses the cache, so the
    decision is reset on the way in and on the way out.
    """
    import jax
    from jax.experimental.compilation_cache import compilation_cache as jax_cache

    before = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    jax_cache.reset_cache()
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", before)
        jax_cache.reset_cache()
