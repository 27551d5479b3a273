"""The entry points' console: TensorFlow's start-up notices, and what the commands import."""
from __future__ import annotations

import subprocess
import sys

import pytest

from trainer import tf_log

ENTRY_POINTS = ["task", "evaluate", "predict", "prepare", "pull"]

START_UP_LINES = [
    ("WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
     True),
    ("I0000 00:00:1796283696.904877    2379 cudart_stub.cc:31] Could not find cuda drivers on "
     "your machine, GPU will not be used.", True),
    ("I0000 00:00:1796283022.579476    4578 cpu_feature_guard.cc:227] This TensorFlow binary is "
     "optimized to use available CPU instructions in performance-critical operations.", True),
    ("To enable the following instructions: AVX2 FMA, in other operations, rebuild TensorFlow "
     "with the appropriate compiler flags.", True),
    ("I0000 00:00:1733400000.123456   812 port.cc:153] oneDNN custom operations are on. You may "
     "see slightly different numerical results.", True),
    ("W0000 00:00:1733400000.123456   812 some_notice.cc:10] a start-up warning", True),
    ("E0000 00:00:1796283027.650126    4578 cuda_platform.cc:52] failed call to cuInit: INTERNAL",
     False),
    ("F0000 00:00:1796283027.650126    4578 something.cc:1] Check failed: a fatal error", False),
    ("Traceback (most recent call last):", False),
    ("ImportError: libcudnn.so.9: cannot open shared object file", False),
    ("", False),
]


@pytest.mark.parametrize("line, dropped", START_UP_LINES)
def test_only_start_up_notices_are_dropped_from_the_import(line, dropped):
    assert tf_log.is_noise(line + "\n") is dropped


@pytest.mark.parametrize("env, expected, changed", [
    ({}, {"TF_CPP_MIN_LOG_LEVEL": "3"}, True),
    ({"TF_CPP_MIN_LOG_LEVEL": "0"}, {"TF_CPP_MIN_LOG_LEVEL": "0"}, False),  # the user's choice
    ({"TF_CPP_MIN_LOG_LEVEL": "2"}, {"TF_CPP_MIN_LOG_LEVEL": "2"}, False),
])
def test_quiet_level_respects_the_users_setting(env, expected, changed):
    assert tf_log.quiet_level(env) is changed
    assert env == expected


def test_filtered_stderr_keeps_real_lines_in_order(capfd):
    import os
    with tf_log.filtered_stderr():
        for line in ("I0000 00:00:1.2 3 cudart_stub.cc:31] notice\n", "E0000 00:00:1.2 3 x.cc:1] "
                     "real error\n", "plain text\n"):
            os.write(2, line.encode())
    assert capfd.readouterr().err == "E0000 00:00:1.2 3 x.cc:1] real error\nplain text\n"


def test_entry_points_import_no_tensorflow_before_their_flags_are_parsed():
    """So --help and usage errors come at once, and the log level is set before the import."""
    code = ("import sys; import " + ", ".join(f"trainer.{m}" for m in ENTRY_POINTS)
            + "; print(sorted(m for m in sys.modules if m.split('.')[0] == 'tensorflow'))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
