"""The entry points' console: TensorFlow's start-up notices, and what the commands import."""
from __future__ import annotations

import os
import re
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
    ("2024-02-09 09:37:32.343117: I tensorflow/core/platform/cpu_feature_guard.cc:182] This "
     "TensorFlow binary is optimized to use available CPU instructions", True),
    ("E0000 00:00:1751448150.986970   10148 cuda_dnn.cc:8579] Unable to register cuDNN factory: "
     "Attempting to register factory for plugin cuDNN when one has already been registered", True),
    ("2024-02-09 09:37:32.334667: E external/local_xla/xla/stream_executor/cuda/cuda_fft.cc:607] "
     "Unable to register cuFFT factory: Attempting to register factory for plugin cuFFT when one "
     "has already been registered", True),
    ("E0000 00:00:1796283027.650126    4578 cuda_platform.cc:52] failed call to cuInit: INTERNAL",
     False),
    ("2024-02-09 09:37:32.1: E tensorflow/core/x.cc:1] Could not load dynamic library libcudnn.so",
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


# --- --help ---------------------------------------------------------------------------------

def _command(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"trainer.{module}", *args], capture_output=True,
                          text=True, timeout=120)


def _usage(module: str):
    import importlib
    return importlib.import_module(f"trainer.{module}").USAGE


@pytest.mark.parametrize("module", ENTRY_POINTS)
@pytest.mark.parametrize("help_flag", ["--help", "-h", "--helpfull"])
def test_help_is_usage_then_every_flag_with_its_default_and_exits_0(module, help_flag):
    from trainer import config as config_lib, helptext
    proc = _command(module, help_flag)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"usage: python -m trainer.{module} ")
    assert all(line.startswith(f"   e.g. python -m trainer.{module} ") for line in lines[1:3])
    assert lines[3] == "" and proc.stderr == ""
    usage = _usage(module)
    heads = {re.match(r"  --(?:\[no\])?(\w+)", line).group(1): line for line in lines
             if line.startswith("  --")}
    for name in usage.flags:
        head = heads.get(name)
        assert head, f"--{name} missing from {module} --help"
        shows_default = usage.defaults == helptext.RECIPE and name in config_lib.leaf_fields()
        assert ("(default: " in head) or not shows_default, head
    if help_flag != "--helpfull":
        assert max(map(len, lines)) <= helptext.WIDTH


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_help_lists_every_flag_the_command_defines(module):
    """A flag defined for a command but left out of its help would be invisible (evaluate's
    --gradcam, predict's --format and prepare's --src were, before)."""
    from absl import flags
    usage = _usage(module)
    defined = {f.name for f in flags.FLAGS.flags_by_module_dict().get(f"trainer.{module}", [])}
    assert defined <= set(usage.flags), defined - set(usage.flags)


@pytest.mark.parametrize("args, shown", [
    ([], ["--image_size=N  (default: 50)", "--batch_size=N  (default: 250)",
          "--weights=imagenet|none|FILE  (default: none)", "configs/vanilla.yaml"]),
    (["--model=inception"], ["--image_size=N  (default: 256)", "--batch_size=N  (default: 15)",
                             "--weights=imagenet|none|FILE  (default: imagenet)",
                             "configs/inception.yaml"]),
    ([], ["--cache=auto|memory|none  (default: auto)", "--[no]check  (default: true)",
          "--strategy=auto|default|one_device|mirrored|multi_worker  (default: auto)"]),
])
def test_task_help_shows_the_chosen_recipes_defaults_and_allowed_values(args, shown):
    proc = _command("task", *args, "--help")
    assert proc.returncode == 0, proc.stderr
    for text in shown:
        assert text in proc.stdout, text


def test_evaluate_help_shows_the_runs_own_values(tmp_path):
    from trainer import config as config_lib
    config = config_lib.load("vanilla", overrides={"batch_size": 7})
    (tmp_path / "config.yaml").write_text(config_lib.to_yaml(config))
    proc = _command("evaluate", f"--model_dir={tmp_path}", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "--batch_size=N  (default: 7)" in proc.stdout
    assert f"default to {tmp_path / 'config.yaml'}" in proc.stdout


@pytest.mark.parametrize("module, args, message", [
    ("task", ["--model=resnet", "--help"], "unknown model 'resnet' (--model)"),
    ("task", ["--epochs=ten", "--help"], "flag --epochs=ten"),
    ("predict", ["--model_dir=RUN", "--image_size=64", "scan.png"],
     "--image_size does not apply to predict"),
])
def test_bad_usage_next_to_help_is_one_error_line(module, args, message):
    proc = _command(module, *args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: ") and message in proc.stderr
    assert len(proc.stderr.splitlines()) == 1


@pytest.mark.parametrize("path, level, kept", [
    ("/site-packages/tensorflow/python/saved_model/builder_impl.py", "INFO", False),
    ("/site-packages/tensorflow/python/saved_model/builder_impl.py", "WARNING", True),
    ("/work/trainer/train.py", "INFO", True),
])
def test_tensorflows_own_info_lines_are_dropped_from_the_log(path, level, kept):
    """e.g. 'Assets written to: RUN/export.partial/assets', which the tensorflow logger sends
    to absl's handler (a filter on absl's own logger did not see it)."""
    import logging
    from trainer import cli
    record = logging.LogRecord("tensorflow", getattr(logging, level), path.replace("/", os.sep),
                               1, "Assets written to: x", None, None)
    assert cli._QuietTensorFlow().filter(record) is kept
