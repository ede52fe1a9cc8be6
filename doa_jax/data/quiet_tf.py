"""Quiet TensorFlow/SeqIO start-up, imported by the data layer's TF entry points before TF loads.

TF's C++ start-up lines are silenced: `TF_CPP_MIN_LOG_LEVEL=3` (read once, at import, so set
first; a value the user set is kept) hides the oneDNN notices, and TensorFlow itself is imported
here with file descriptor 2 pointed at /dev/null, because TF 2.21's CUDA stub logs "could not find
cuda drivers" through absl's C++ logging before any level applies. Only that import is muted: an
import error is raised after stderr is restored, and later warnings print as usual.

SeqIO's absl warning about an "uncached FunctionDataset" does not apply here: the pools live in
memory and are shuffled whole with a fixed seed (`seqio_tasks.SHUFFLE_BUFFER`), so that one
message is filtered; every other warning still shows.
"""
from __future__ import annotations

import logging
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

KNOWN_NOISE = ("Using an uncached FunctionDataset",)


class DropKnownNoise(logging.Filter):
    """Drops log records whose message starts with one of `KNOWN_NOISE`."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(KNOWN_NOISE)


def import_tensorflow() -> None:
    """Imports TensorFlow with the C++ start-up lines it writes to fd 2 discarded (once)."""
    if "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import tensorflow  # noqa: F401
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def install() -> None:
    """Adds the filter to absl's logger (idempotent) and keeps absl at WARNING (no INFO chatter)."""
    from absl import logging as absl_logging

    logger = logging.getLogger("absl")
    if not any(isinstance(f, DropKnownNoise) for f in logger.filters):
        logger.addFilter(DropKnownNoise())
    absl_logging.set_verbosity(absl_logging.WARNING)


import_tensorflow()
install()
