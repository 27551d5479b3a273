"""TensorFlow's own C++ log on an entry point's console.

On a machine without a GPU, importing and starting TensorFlow prints lines a user reads as
errors (``E0000 ... failed call to cuInit``) or as noise (CUDA-driver, CPU-feature and oneDNN
notices). Unless the user set ``TF_CPP_MIN_LOG_LEVEL``, the entry points set it to 3 before
TensorFlow is imported, and filter the lines the import prints before TensorFlow's logging
is initialised (no level hides those). Failures still reach the user as Python exceptions
and through the trainer's own log, which this leaves alone.
"""
from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import os
import re
import sys
import threading
from typing import MutableMapping

LEVEL_VARIABLE = "TF_CPP_MIN_LOG_LEVEL"
QUIET_LEVEL = "3"  # 2 still shows E-level lines such as the cuInit failure on CPU machines

_GLOG = r"[{levels}]\d{{4}} [\d:.]+\s+\d+ \S+:\d+\] "  # e.g. I0000 00:00:17.5  812 port.cc:153]
_OLD = r"\d{{4}}-\d\d-\d\d [\d:.]+: [{levels}] \S+:\d+\] "  # TF before 2.16: 2024-01-02 03:04:05.6: I
_NOISE = re.compile(
    r"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    rf"|{_GLOG.format(levels='IW')}|{_OLD.format(levels='IW')}"  # INFO and WARNING lines
    r"|To enable the following instructions: .*rebuild TensorFlow"  # the CPU notice's 2nd line
    # CUDA builds on GPU machines: an E-level notice without consequence (tensorflow#62075)
    rf"|(?:{_GLOG.format(levels='E')}|{_OLD.format(levels='E')})Unable to register "
    r"cu(?:DNN|FFT|BLAS) factory: Attempting to register factory for plugin")


def is_noise(line: str) -> bool:
    """Whether a line TensorFlow prints while it is imported is a start-up notice to drop."""
    return bool(_NOISE.match(line))


def quiet_level(env: MutableMapping[str, str] = os.environ) -> bool:
    """Sets TF_CPP_MIN_LOG_LEVEL=3 unless it is set; True when this set it."""
    if LEVEL_VARIABLE in env:
        return False
    env[LEVEL_VARIABLE] = QUIET_LEVEL
    return True


def quiet() -> None:
    """For an entry point, before TensorFlow is imported: the quiet level, and the import's
    start-up notices filtered; nothing when the user chose a level."""
    if quiet_level() and "tensorflow" not in sys.modules and \
            not any(isinstance(f, _FilteredImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _FilteredImport())


class _FilteredImport(importlib.abc.MetaPathFinder):
    """Finds ``tensorflow`` as usual (once) and runs its import through ``filtered_stderr``."""

    def find_spec(self, name, path, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader, exec_module = spec.loader, spec.loader.exec_module

        def filtered_exec(module):
            try:
                with filtered_stderr():
                    exec_module(module)
            finally:
                del loader.exec_module
        loader.exec_module = filtered_exec
        return spec


@contextlib.contextmanager
def filtered_stderr():
    """Routes file descriptor 2 (C++ and Python output alike) through ``is_noise``; kept lines
    reach the real stderr as they come. Without a usable descriptor 2, does nothing."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    out = os.dup(saved)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def forward() -> None:
        with os.fdopen(read_end, "rb") as lines, os.fdopen(out, "wb", buffering=0) as real:
            for line in lines:
                if not is_noise(line.decode(errors="replace")):
                    real.write(line)

    thread = threading.Thread(target=forward, name="tf-import-stderr", daemon=True)
    thread.start()
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os.dup2(saved, 2)  # closes the pipe's last write end: the thread sees the end
        os.close(saved)
        thread.join()
