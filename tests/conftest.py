"""Shared fixtures: small generated image trees and the real cxr3 data when present."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# What the trainer imports sets variables of its own (tf-keras, sklearn's KMP_*): imported
# here, they belong to the baseline below.
import trainer.train  # noqa: E402,F401

OWN_VARIABLES = {"PYTEST_CURRENT_TEST"}  # pytest sets it for each test


def _environment() -> dict:
    return {k: v for k, v in os.environ.items() if k not in OWN_VARIABLES}


@pytest.fixture(autouse=True)
def _logging_at_info():
    """Every test logs at INFO, as the entry points do (cli.setup_logging): a SavedModel export
    resets absl's verbosity to what it was before, WARNING in a process that never set it."""
    from absl import logging as absl_logging
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.INFO)
    yield
    absl_logging.set_verbosity(verbosity)


@pytest.fixture(scope="session")
def _baseline_environment() -> dict:
    return _environment()


@pytest.fixture(autouse=True)
def _environment_unchanged(_baseline_environment):
    """Fails a test after which os.environ differs from the session's start (a fixture of any
    scope that set a variable for good would leak it into every later test and its children);
    monkeypatch's changes are undone before this runs."""
    yield
    now = _environment()
    if now != _baseline_environment:
        changed = sorted(k for k in now.keys() | _baseline_environment.keys()
                         if now.get(k) != _baseline_environment.get(k))
        os.environ.clear()
        os.environ.update(_baseline_environment)
        pytest.fail(f"os.environ changed and was restored: {', '.join(changed)}; use "
                    "monkeypatch or pass env= to child processes")

REPO = Path(__file__).resolve().parents[1]
CXR3 = REPO.parent / "shared" / "data" / "cxr3"


@pytest.fixture
def demo_tree(tmp_path: Path) -> Path:
    """A small synthetic three-class tree (30 PNGs per class, 64x64)."""
    from trainer import demo_data
    root = tmp_path / "data"
    demo_data.generate(root, images_per_class=30, seed=1)
    return root


@pytest.fixture
def tiny_config(demo_tree: Path, tmp_path: Path):
    """A vanilla config that trains in seconds on ``demo_tree``."""
    from trainer import config as config_lib
    config = config_lib.load("vanilla", overrides={
        "data_dir": str(demo_tree), "image_size": 16, "test_per_class": 6, "batch_size": 16,
        "epochs": 3, "model_dir": str(tmp_path / "run")})
    return config


@pytest.fixture
def cxr3() -> Path:
    """The real chest X-ray set beside the checkout; tests using it skip when it is absent."""
    if not (CXR3 / "manifest.csv").is_file():
        pytest.skip(f"real data not found at {CXR3}")
    return CXR3


def train_tiny_run(root: Path, images_per_class: int, image_size: int, test_per_class: int,
                   epochs: int, seed: int) -> Path:
    """Trains a tiny vanilla run on generated images into root/run; returns the run folder."""
    from trainer import config as config_lib, demo_data, train
    demo_data.generate(root / "data", images_per_class=images_per_class, seed=seed)
    config = config_lib.load("vanilla", overrides={
        "data_dir": str(root / "data"), "image_size": image_size, "test_per_class": test_per_class,
        "batch_size": 16, "epochs": epochs, "model_dir": str(root / "run")})
    train.run(config)
    return root / "run"


def float_input_model(image_size: int, n_classes: int = 3):
    """A small model with a float [0, 1] input, as saved before models took uint8 pixels."""
    from trainer.keras_api import keras
    inputs = keras.Input((image_size, image_size, 3))
    return keras.Model(inputs, keras.layers.Dense(n_classes, activation="softmax")(
        keras.layers.Flatten()(inputs)))


def tree_with_sources(root: Path, covid: tuple = ("a", "b"), others: tuple = ("k",)) -> Path:
    """A demo tree (20 images per class) plus manifest.csv: the COVID-19 images from the
    ``covid`` sources and the other classes' from ``others``, taken in turn."""
    from trainer import config as config_lib, demo_data
    demo_data.generate(root, images_per_class=20, seed=4)
    rows = ["relpath,label,source"]
    for cls in config_lib.TUTORIAL_CLASSES:
        sources = covid if cls == "COVID-19" else others
        for i, f in enumerate(sorted((root / cls).iterdir())):
            rows.append(f"{cls}/{f.name},{cls},{sources[i % len(sources)]}")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root


def write_manifest(root: Path, rows) -> Path:
    """ROOT/manifest.csv with a (relpath, label, source) row per image; returns ROOT."""
    import csv
    with open(root / "manifest.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["relpath", "label", "source"])
        writer.writerows(rows)
    return root


def run_python(script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Runs ``script`` in a fresh Python with the repo importable and no TF_CONFIG (for a
    device layout that must be set before TensorFlow starts); fails the test if it fails."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(REPO)}
    env.pop("TF_CONFIG", None)
    done = subprocess.run([sys.executable, "-c", script, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def script_result(done: subprocess.CompletedProcess):
    """What a script run by ``run_python`` printed as JSON after ``RESULT ``."""
    return json.loads(done.stdout.split("RESULT ", 1)[1])


def layout_film(rng, high: bool, size: int = 48):
    """A gray uint8 [size, size] film whose dark band ("lungs") sits high or low, plus noise:
    a class told by its layout alone."""
    import numpy as np
    image = rng.normal(170, 12, (size, size))
    top = rng.integers(size // 12, size // 5) if high else rng.integers(size // 2, size * 5 // 8)
    image[top:top + size * 7 // 24, size // 8:size - size // 8] -= 100
    return np.clip(image, 0, 255).astype(np.uint8)


def drawn_chest(size: int, lungs, surround: bool = True, seed: int = 0):
    """uint8 [size, size, 3]: a drawn chest X-ray for the chest crop's tests. Two dark lungs
    fill ``lungs`` (top, left, bottom, right fractions) inside a bright body, on a black film
    when ``surround``, the body filling the film otherwise (a film cropped to the chest)."""
    import numpy as np
    y, x = np.mgrid[0:size, 0:size] + 0.5
    top, left, bottom, right = (v * size for v in lungs)
    image = np.full((size, size), 175.0)
    if surround:  # the body: the lungs' box grown by a fifth; black around it
        grow_y, grow_x = (bottom - top) / 5, (right - left) / 5
        body = ((y - (top + bottom) / 2) / ((bottom - top) / 2 + grow_y)) ** 2 + \
               ((x - (left + right) / 2) / ((right - left) / 2 + grow_x)) ** 2 <= 1
        image[~body] = 8.0
    half_w, half_h = (right - left) * 0.13, (bottom - top) / 2  # under 40% of the body
    for centre in (left + half_w, right - half_w):  # rounded, as lungs are: superellipses
        inside = ((x - centre) / half_w) ** 4 + ((y - (top + bottom) / 2) / half_h) ** 4 <= 1
        image[inside] = 70.0
    rng = np.random.default_rng(seed)
    image += rng.normal(0, 4, image.shape)
    return np.repeat(np.clip(image, 0, 255).astype(np.uint8)[..., None], 3, axis=-1)
