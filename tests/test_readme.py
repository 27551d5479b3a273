"""The README's commands, run as a new user would run them, on generated data and tiny sizes.

Each local ``python -m trainer.*`` command of the README runs in a subprocess, from a fresh
folder, with its placeholders replaced (/data/cxr: a generated tree, RUN: the run the set-up
command left in ./runs, scan.png and folder/: demo images) and training made tiny
(--image_size=16 --epochs=1). Two kinds are not run, and the test says which: InceptionV3
training (minutes on a CPU; its flags are parsed and its config validated, and
tests/test_models.py trains InceptionV3 one step), and the walk-throughs that need a bucket or a
cluster ("Data in a bucket", "Run on GKE": tests/test_gcs.py, test_prepare.py and test_pull.py
run those flows against a GCS emulator, tests/test_k8s.py checks the Kubernetes files).
No network: `pip install` is not repeated (the package is installed, as .ci/run installs it).
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CXR3

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
CLOUD_SECTIONS = ("Data in a bucket", "Run on GKE")
TINY = ["--image_size=16", "--epochs=1"]
CPP_LOG_LINE = re.compile(r"^([IWEF]\d{4} [\d:.]+\s+\d+ \S+\.cc:\d+\]|WARNING: All log messages)",
                          re.M)  # TensorFlow's C++ log


def readme_commands() -> list[tuple[str, str]]:
    """(section, command) for every command of the README's bash blocks, comments removed,
    continuation lines joined, words separated by one space (quotes removed)."""
    commands, section = [], ""
    for part in re.split(r"(^#+ .*$)", README.read_text(), flags=re.M):
        if part.startswith("#"):
            section = part.lstrip("#").strip()
            continue
        for block in re.findall(r"```bash\n(.*?)```", part, re.S):
            for line in block.replace("\\\n", " ").splitlines():
                words = shlex.split(line, comments=True)
                if words:
                    commands.append((section, " ".join(words)))
    return commands


COMMANDS = readme_commands()
SET_UP = [c for s, c in COMMANDS if s == "covid-cxr-trainer"]  # the two lines at the top
LOCAL = [c for s, c in COMMANDS if s not in CLOUD_SECTIONS and c not in SET_UP]


def test_the_first_two_lines_are_the_set_up_commands():
    ci = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert SET_UP == ["pip install -e . && python -m trainer.task --model=vanilla",
                      " ".join(shlex.split(ci))]
    assert README.read_text().split("```bash\n")[1].startswith("pip install -e . && python -m")


def test_every_command_outside_the_cloud_walk_throughs_is_a_trainer_command():
    """So each one is run (or validated) below; a new kind of command needs a runner here."""
    assert LOCAL and all(c.startswith("python -m trainer.") for c in LOCAL), LOCAL
    assert all(not c.startswith("python -m trainer.") or "gs://" in c or s == "Run on GKE"
               for s, c in COMMANDS if s in CLOUD_SECTIONS)


def _env(tmp: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # as a user has it
    env.update(PYTHONPATH=str(REPO), CXR_TRAINER_CACHE=str(tmp / "cache"), PYTHONUNBUFFERED="1")
    return env


def _run(words: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *words[1:]], cwd=cwd, env=_env(cwd), text=True,
                          capture_output=True, timeout=300)


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    """A fresh folder where the set-up command ran (./runs/vanilla-* on the demo data), with
    the trees and files the other commands name."""
    from trainer import demo_data
    home = tmp_path_factory.mktemp("user")
    words = shlex.split(SET_UP[0].split("&&", 1)[1]) + TINY
    done = _run(words, home)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Test metrics" in done.stdout
    assert not CPP_LOG_LINE.search(done.stderr), done.stderr  # no TensorFlow start-up notices
    assert "training on " in done.stderr
    demo_data.generate(home / "cxr", images_per_class=50, seed=4)  # 40 per class go to test
    # The database's two layouts, where the README's commands name them (relative paths).
    demo_data.generate_database(home / "COVID-19_Radiography_Dataset", images_per_class=50, seed=5)
    demo_data.generate(home / "covid" / "COVID-19 Radiography Database", images_per_class=50,
                       seed=6)
    (home / "my-experiment.yaml").write_text("model:\n  architecture: vanilla\n"
                                             "train:\n  learning_rate: 0.002\n")
    return home


def test_set_up_command_leaves_a_run_marked_as_synthetic(home):
    (run,) = (home / "runs").iterdir()
    assert run.name.startswith("vanilla-") and (run / "metrics.json").is_file()
    assert "synthetic: true" in (run / "config.yaml").read_text()


def _placed(command: str, home: Path) -> list[str]:
    """The command's words with the README's placeholders replaced by this test's files."""
    (run,) = (home / "runs").iterdir()
    demo = home / "cache" / "demo-v1"
    places = {"/data/cxr": home / "cxr", "RUN": run, "scan.png": demo / "NORMAL" / "demo-000.png",
              "folder/": demo / "COVID-19", "../shared/data/cxr3": CXR3}

    def place(word: str) -> str:
        name, eq, value = word.partition("=")
        if eq and name.startswith("--"):
            return f"{name}={places.get(value, value)}"
        return str(places.get(word, word))
    return [place(word) for word in shlex.split(command)]


def _validate(words: list[str]) -> None:
    """Parses the flags with the trainer's own definitions and validates the config."""
    from absl import flags
    from trainer import config as config_lib, models, task  # noqa: F401  (defines the flags)
    values = {}
    for word in words[3:]:
        name, _, value = word[2:].partition("=")
        values[name] = flags.FLAGS[name].parser.parse(value) if value else True
    overrides = {k: v for k, v in values.items() if k in config_lib.flag_fields()}
    config = config_lib.load(values.get("model"), values.get("config"), overrides)
    config_lib.validate(config, models.min_image_sizes())


@pytest.mark.parametrize("index, command", list(enumerate(LOCAL)), ids=[c[:60] for c in LOCAL])
def test_readme_command_works(home, index, command):
    if "../shared/data/cxr3" in command and not (CXR3 / "manifest.csv").is_file():
        pytest.skip(f"real data not found at {CXR3}")
    words = _placed(command, home)
    if words[2] == "trainer.task" and "--help" not in words:
        if "--model=inception" in words:  # minutes on a CPU: flags and config checked only
            _validate(words)
            return
        words += TINY + [f"--model_dir={home / 'more-runs' / str(index)}"]
    done = _run(words, home)
    assert done.returncode == 0, f"{shlex.join(words)}\n{done.stderr[-3000:]}"
    assert not CPP_LOG_LINE.search(done.stderr), done.stderr
    if "--help" in words:
        assert done.stdout.startswith(f"usage: python -m {words[2]} ")
    if words[2] in ("trainer.evaluate", "trainer.predict"):  # the demo run says what it is
        assert "warning: " in done.stderr and "SYNTHETIC demo data" in done.stderr
    if words[2] == "trainer.evaluate":
        run = next(w for w in words if w.startswith("--model_dir=")).split("=", 1)[1]
        assert (Path(run) / "eval" / "best-test" / "gradcam.png").is_file()
