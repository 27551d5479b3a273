"""Faults during a run: NaN loss, an unwritable model_dir, a write that dies half-way, SIGTERM."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from trainer import checkpoints, models, train
from trainer.errors import ExitStatus, RunDirError, TrainerError
from trainer.keras_api import keras


class NanAfter(keras.layers.Layer):
    """Passes its input through for ``steps`` training steps, then outputs NaN."""

    def __init__(self, steps: int, **kwargs):
        super().__init__(**kwargs)
        self.steps = steps

    def build(self, input_shape):
        self.count = self.add_weight("count", shape=(), initializer="zeros", trainable=False)

    def call(self, x, training=None):
        if training:
            self.count.assign_add(1.0)
        return tf.where(self.count > self.steps, x * np.nan, x)

    def get_config(self):
        return {**super().get_config(), "steps": self.steps}


@pytest.fixture
def nan_model():
    """Registers a small model whose output turns NaN at its 7th training step."""
    def build(model, image_size, n_classes, augment):
        inputs = keras.Input((image_size, image_size, 3))
        x = keras.layers.Flatten()(NanAfter(6)(inputs))
        return keras.Model(inputs, keras.layers.Dense(n_classes, activation="softmax")(x))
    models.register("nan_after_6", min_image_size=4)(build)
    yield "nan_after_6"
    del models.REGISTRY["nan_after_6"]


def test_nan_loss_stops_with_epoch_and_step_and_keeps_good_checkpoints(tiny_config, nan_model):
    # 57 training images, batch 32 -> 2 steps per epoch: steps 1-6 finite, step 7 (epoch 4) NaN.
    tiny_config.model.architecture = nan_model
    tiny_config.train.batch_size = 32
    tiny_config.train.epochs = 5
    tiny_config.train.patience = 100
    with pytest.raises(TrainerError, match=r"NaN or infinite at epoch 4, step 1"):
        train.run(tiny_config)
    run = Path(tiny_config.output.model_dir)
    record = json.loads((run / "checkpoints" / "best.json").read_text())
    assert record["epoch"] in (1, 2, 3)
    restored = keras.models.load_model(run / "checkpoints" / "last.keras",
                                       custom_objects={"NanAfter": NanAfter})
    assert all(np.isfinite(w).all() for w in restored.get_weights())
    assert not (run / "metrics.json").exists()


@pytest.mark.parametrize("make_model_dir", [
    lambda tmp: str(tmp / "a-file" / "run"),      # a file where a folder must be
    lambda tmp: "/proc/covid-cxr-trainer-run",    # a read-only file system (even for root)
], ids=["parent-is-a-file", "read-only-fs"])
def test_unwritable_model_dir_fails_before_training(tiny_config, tmp_path, make_model_dir):
    (tmp_path / "a-file").write_text("x")
    tiny_config.output.model_dir = make_model_dir(tmp_path)
    with pytest.raises(RunDirError, match="cannot write to --model_dir"):
        train.prepare_run_dir(tiny_config)


def test_checkpoint_write_that_dies_half_way_leaves_the_old_file(tmp_path, monkeypatch):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    path = str(tmp_path / "best.keras")
    checkpoints.save(model, path)
    before = Path(path).read_bytes()

    def dying_copy(src, dst, overwrite=False):
        Path(dst).write_bytes(Path(src).read_bytes()[:100])  # half a file, then the disk is full
        raise tf.errors.ResourceExhaustedError(None, None, "No space left on device")

    monkeypatch.setattr(tf.io.gfile, "copy", dying_copy)
    model.layers[0].kernel.assign(model.layers[0].kernel + 1.0)
    with pytest.raises(tf.errors.ResourceExhaustedError):
        checkpoints.save(model, path)
    assert Path(path).read_bytes() == before


def _task(args):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.Popen([sys.executable, "-m", "trainer.task", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _epochs(run: Path) -> list[int]:
    import csv
    if not (run / "history.csv").exists():
        return []
    with open(run / "history.csv") as f:
        return [int(r["epoch"]) for r in csv.DictReader(f)]


@pytest.mark.parametrize("backup_freq", ["epoch", "2"])
def test_sigterm_saves_the_backup_exits_75_and_the_restart_resumes(demo_tree, tmp_path, backup_freq):
    run = tmp_path / "run"
    args = ["--model=vanilla", f"--data_dir={demo_tree}", f"--model_dir={run}", "--image_size=16",
            "--test_per_class=6", "--batch_size=4", "--epochs=8", "--patience=100",
            f"--backup_freq={backup_freq}"]
    first = _task(args)
    deadline = time.time() + 240
    while time.time() < deadline and first.poll() is None and len(_epochs(run)) < 2:
        time.sleep(0.05)
    assert first.poll() is None, first.stdout.read()
    first.send_signal(signal.SIGTERM)
    out, _ = first.communicate(timeout=120)
    assert first.returncode == ExitStatus.PREEMPTED, out
    assert "error: stopped by SIGTERM at epoch" in out and "Traceback" not in out
    assert any((run / "backup").iterdir())
    done = _epochs(run)

    second = _task(args)
    out, _ = second.communicate(timeout=300)
    assert second.returncode == 0, out
    resumed_at = int(out.split("Epoch ", 1)[1].split("/", 1)[0])
    assert resumed_at >= done[-1]  # the stopped epoch at the earliest, never epoch 1 again
    assert _epochs(run) == list(range(1, 9))
    assert (run / "metrics.json").exists() and not (run / "backup").exists()
