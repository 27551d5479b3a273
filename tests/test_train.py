"""A whole run on generated images: artifacts, reload, refusal, resume after SIGKILL."""
from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import tree_with_sources
from trainer import checkpoints, config as config_lib, data, models, runs, train
from trainer.keras_api import keras
from trainer.errors import RunDirError

ARTIFACTS = ["config.yaml", "checkpoints/best.keras", "checkpoints/last.keras",
             "checkpoints/best.json", "history.csv", "metrics.json", "logs/train"]


def _history(run: Path) -> list[dict]:
    with open(run / "history.csv") as f:
        return list(csv.DictReader(f))


def test_end_to_end_run_writes_every_artifact(tiny_config, capsys):
    results = train.run(tiny_config)
    run = Path(tiny_config.output.model_dir)
    for name in ARTIFACTS:
        assert (run / name).exists(), name
    assert not (run / "backup").exists()  # completed: nothing left to resume
    assert config_lib.from_yaml_text((run / "config.yaml").read_text(), "config.yaml") == tiny_config
    assert [int(r["epoch"]) for r in _history(run)] == [1, 2, 3]
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["classes"] == ["COVID-19", "NORMAL", "Viral Pneumonia"]
    assert np.array(saved["confusion_matrix"]).sum() == 18 == saved["test"]["tp"] + saved["test"]["fn"]
    assert set(saved["per_class"]["NORMAL"]) == {"sensitivity", "specificity", "precision", "f1",
                                                 "support"}
    assert saved["class_weights"] == pytest.approx([1.0, 1.0, 1.0])
    out = capsys.readouterr().out
    assert "Test metrics" in out and "accuracy" in out and "specificity" in out
    assert results["test"] == saved["test"]

    # The best checkpoint reloaded from disk reproduces the in-process test metrics.
    best = checkpoints.load(str(run / "checkpoints" / "best.keras"))
    # best, last and the export hold the weights once: no optimizer state (Adam's would triple
    # them); resuming reads backup/ instead.
    weights = sum(w.nbytes for w in best.get_weights())
    exported = sum(f.stat().st_size for f in (run / "export").rglob("*") if f.is_file())
    for name, size in [("best.keras", (run / "checkpoints" / "best.keras").stat().st_size),
                       ("last.keras", (run / "checkpoints" / "last.keras").stat().st_size),
                       ("export/", exported)]:
        assert weights < size < 1.3 * weights, (name, size, weights)
    again = train.evaluate(best, data.make_splits(tiny_config.data).test, tiny_config)
    for name, value in saved["test"].items():
        assert again["test"][name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    assert again["confusion_matrix"] == saved["confusion_matrix"]

    # A finished run is never replaced silently ...
    with pytest.raises(RunDirError, match="holds a finished run .* --overwrite"):
        train.run(tiny_config)
    # ... but is with --overwrite.
    tiny_config.output.overwrite = True
    tiny_config.train.epochs = 1
    train.run(tiny_config)
    assert [int(r["epoch"]) for r in _history(run)] == [1]


def test_unrelated_folder_is_refused(tiny_config):
    run = Path(tiny_config.output.model_dir)
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="is not empty and holds no run"):
        train.prepare_run_dir(tiny_config)
    assert (run / "notes.txt").read_text() == "mine"


def test_interrupted_run_with_another_config_is_refused(tiny_config):
    assert train.prepare_run_dir(tiny_config) is False
    assert train.prepare_run_dir(tiny_config) is True  # same config: resume
    tiny_config.train.learning_rate = 0.5
    with pytest.raises(RunDirError, match=r"train.learning_rate: 0.001 -> 0.5"):
        train.prepare_run_dir(tiny_config)
    tiny_config.output.allow_config_change = True
    assert train.prepare_run_dir(tiny_config) is True
    assert "learning_rate: 0.5" in (Path(tiny_config.output.model_dir) / "config.yaml").read_text()


def test_default_model_dir_is_new(tmp_path, monkeypatch):
    import datetime
    monkeypatch.chdir(tmp_path)
    now = datetime.datetime(2026, 1, 2, 3, 4, 5)
    first = train.default_model_dir("vanilla", now)
    assert first == os.path.join("runs", "vanilla-20260102-030405")
    os.makedirs(first)
    assert train.default_model_dir("vanilla", now) == first + "-2"


def _task(args: list[str], **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.Popen([sys.executable, "-m", "trainer.task", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def test_sigkilled_run_resumes_from_its_backup(demo_tree, tmp_path):
    run = tmp_path / "run"
    args = ["--model=vanilla", f"--data_dir={demo_tree}", f"--model_dir={run}", "--image_size=16",
            "--test_per_class=6", "--batch_size=8", "--epochs=12", "--patience=100"]
    first = _task(args)
    deadline = time.time() + 240
    while time.time() < deadline and first.poll() is None:
        if (run / "history.csv").exists() and len(_history(run)) >= 2:
            break
        time.sleep(0.05)
    assert first.poll() is None, "the run ended before it could be killed:\n" + first.stdout.read()
    first.send_signal(signal.SIGKILL)
    first.wait()
    done = len(_history(run))
    assert not (run / "metrics.json").exists()
    assert any((run / "backup").iterdir()), "no backup was written before the kill"

    second = _task(args)
    out, _ = second.communicate(timeout=300)
    assert second.returncode == 0, out
    assert "resuming the interrupted run" in out
    first_epoch = int(out.split("Epoch ", 1)[1].split("/", 1)[0])
    assert first_epoch >= done  # resumed after the last backed-up epoch, not from 1
    assert [int(r["epoch"]) for r in _history(run)] == list(range(1, 13))
    assert (run / "metrics.json").exists() and not (run / "backup").exists()


CLI_ERRORS = [
    (["--epochs=0"], 2, "train.epochs (--epochs) must be at least 1, got 0"),
    (["--batch_size=0"], 2, "train.batch_size (--batch_size) must be at least 1"),
    (["--model=inception", "--image_size=64", "--weights=none"], 2, "must be at least 75 for inception"),
    (["--data_dir=/no/such/dir"], 2, "--data_dir: no such directory: /no/such/dir"),
    (["--model=resnet"], 2, "unknown model 'resnet' (--model)"),
    (["--epochs=ten"], 2, "flag --epochs=ten"),
    (["--no_such_flag=1"], 2, "no_such_flag"),
    (["--config=/no/such.yaml", "--model="], 2, "config file not found: /no/such.yaml"),
    (["--cache=disk"], 2, "data.cache (--cache) must be one of auto, memory, none"),
    (["extra-arg"], 2, "unexpected arguments: extra-arg"),
]


@pytest.mark.parametrize("args, status, message", CLI_ERRORS)
def test_cli_errors_are_one_line(args, status, message):
    proc = _task(args)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == status, out
    assert "Traceback" not in out
    lines = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], out


def test_cli_data_error_exits_3(tmp_path):
    (tmp_path / "COVID-19").mkdir()
    proc = _task([f"--data_dir={tmp_path}", f"--model_dir={tmp_path / 'run'}"])
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 3, out
    assert "Traceback" not in out and "error: " in out and "no folder for class 'NORMAL'" in out
    assert not (tmp_path / "run").exists()


# (overrides, what the log must say about the stop)
STOPS = [
    ({"epochs": 2, "patience": 100}, r"trained the 2 epochs asked for \(--epochs\)"),
    # min_delta=10: no epoch after the first improves enough, so patience 1 stops at epoch 2.
    ({"epochs": 50, "patience": 1, "min_delta": 10.0},
     r"early stopping at epoch 2: val_loss did not improve by more than 10 for 1 epochs "
     r"\(--patience\)"),
    # accuracy cannot rise by 10 either: the same stop, on the figure --monitor names
    ({"epochs": 50, "patience": 1, "min_delta": 10.0, "monitor": "accuracy"},
     r"early stopping at epoch 2: val_accuracy did not improve by more than 10 for 1 epochs "
     r"\(--patience\)"),
]


@pytest.mark.parametrize("overrides, stop", STOPS)
def test_the_log_says_each_epoch_briefly_why_training_stopped_and_what_is_kept(
        tiny_config, caplog, overrides, stop):
    for key, value in overrides.items():
        setattr(tiny_config.train, key, value)
    with caplog.at_level("INFO"):
        train.run(tiny_config)
    lines = [r.getMessage() for r in caplog.records]
    epochs = [line for line in lines if line.startswith("Epoch ")]
    assert len(epochs) == 2, epochs
    for line in epochs:  # loss, accuracy and AUC of training and validation, nothing more
        assert re.fullmatch(r"Epoch \d/\d+ - \d+s - loss: [0-9.]+ - accuracy: [0-9.]+ - auc: "
                            r"[0-9.]+ - val_loss: [0-9.]+ - val_accuracy: [0-9.]+ - val_auc: "
                            r"[0-9.]+", line), line
    assert any(re.fullmatch(stop, line) for line in lines), lines
    best = json.loads((Path(tiny_config.output.model_dir) / "checkpoints" / "best.json").read_text())
    kept = "highest val_accuracy" if overrides.get("monitor") == "accuracy" else "lowest val_loss"
    assert best["monitor"] == kept.split()[1]
    assert f"keeping checkpoints/best.keras from epoch {best['epoch']} ({kept}: " \
           f"{best['value']:.4f})" in lines


# (monitor, its value at each epoch, start_from_epoch, the epoch best.keras must hold)
KEPT = [
    ("val_loss", [0.9, 0.5, 0.7], 0, 2),
    ("val_loss", [0.5, 0.5, 0.6], 0, 1),  # a tie is no improvement
    ("val_accuracy", [0.6, 0.8, 0.7], 0, 2),
    ("val_accuracy", [0.8, 0.8, 0.5], 0, 1),
    ("loss", [1.2, 1.1, 1.0], 0, 3),
    ("val_accuracy", [0.9, 0.6, 0.7], 1, 3),  # the first epoch is never kept
    ("val_loss", [0.1, 0.2, 0.9], 2, 3),
]


@pytest.mark.parametrize("monitor, values, start, epoch", KEPT)
def test_best_checkpoint_keeps_the_lowest_loss_or_the_highest_accuracy(tmp_path, monitor,
                                                                       values, start, epoch):
    from trainer import callbacks
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    keeper = callbacks.BestAndLastCheckpoint(str(tmp_path), monitor=monitor,
                                             start_from_epoch=start)
    keeper.set_model(model)
    keeper.on_train_begin()
    for i, value in enumerate(values):
        model.layers[0].bias.assign([float(i)])  # each epoch's weights are told apart
        keeper.on_epoch_end(i, {"loss": 1.0, monitor: value})
    best = json.loads((tmp_path / "best.json").read_text())
    assert (best["epoch"], best["monitor"], best["value"]) == (epoch, monitor, values[epoch - 1])
    kept = keras.models.load_model(tmp_path / "best.keras")
    assert float(kept.layers[0].bias.numpy()[0]) == epoch - 1
    # resumed with a worse figure, the record and the checkpoint stay
    again = callbacks.BestAndLastCheckpoint(str(tmp_path), monitor=monitor,
                                            start_from_epoch=start)
    again.set_model(model)
    again.on_train_begin()
    again.on_epoch_end(len(values), {"loss": 1.0, monitor: values[epoch - 1]})
    assert json.loads((tmp_path / "best.json").read_text())["epoch"] == epoch


def test_start_from_epoch_keeps_no_checkpoint_and_stops_nothing_before_it(tiny_config):
    """min_delta=10: only the first epoch looked at improves enough, so patience 1 stops one
    epoch later; epochs 1 and 2 are not looked at, so the stop is at epoch 4, and the kept
    checkpoint is the lower val_loss of epochs 3 and 4."""
    train_cfg = tiny_config.train
    train_cfg.epochs, train_cfg.patience, train_cfg.min_delta = 50, 1, 10.0
    train_cfg.start_from_epoch = 2
    train.run(tiny_config)
    run = Path(tiny_config.output.model_dir)
    rows = _history(run)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    looked_at = {int(r["epoch"]): float(r["val_loss"]) for r in rows[2:]}
    best = json.loads((run / "checkpoints" / "best.json").read_text())
    assert best["epoch"] == min(looked_at, key=looked_at.get)


def test_a_best_checkpoint_chosen_on_another_figure_is_replaced_and_the_log_says_so(
        tmp_path, caplog):
    """Resumed with --allow_config_change and another --monitor: a recorded val_loss of 0.3
    is no bar for an accuracy of 0.2 (it is the other figure), and the log names both."""
    from trainer import callbacks
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    (tmp_path / "best.json").write_text(json.dumps(
        {"epoch": 4, "monitor": "val_loss", "value": 0.3}))
    keeper = callbacks.BestAndLastCheckpoint(str(tmp_path), monitor="val_accuracy")
    keeper.set_model(model)
    with caplog.at_level("WARNING"):
        keeper.on_train_begin()
    keeper.on_epoch_end(4, {"loss": 1.0, "val_accuracy": 0.2})
    assert json.loads((tmp_path / "best.json").read_text()) == {
        "epoch": 5, "monitor": "val_accuracy", "value": 0.2}
    assert any("was chosen on val_loss, and this run follows val_accuracy" in r.getMessage()
               for r in caplog.records)


def test_lr_patience_lowers_the_learning_rate_training_uses_and_says_so(tiny_config, caplog):
    """min_delta=10: no epoch after the first improves enough, so lr_patience 1 halves the rate
    after epochs 2 and 3; history.csv records the rate each epoch trained with."""
    tiny_config.train.epochs, tiny_config.train.patience = 3, 100
    tiny_config.train.min_delta, tiny_config.train.lr_patience = 10.0, 1
    with caplog.at_level("INFO"):
        train.run(tiny_config)
    with open(Path(tiny_config.output.model_dir) / "history.csv") as f:
        rates = [float(row["lr"]) for row in csv.DictReader(f)]
    assert rates == pytest.approx([1e-3, 1e-3, 5e-4])
    lines = [r.getMessage() for r in caplog.records]
    assert [line for line in lines if line.startswith("learning rate")] == [
        f"learning rate {a} -> {b} after epoch {n}: val_loss did not improve by more than 10 "
        f"for 1 epochs (--lr_patience)" for a, b, n in (("0.001", "0.0005", 2),
                                                        ("0.0005", "0.00025", 3))]


def test_without_lr_patience_the_rate_stays_as_given(tiny_config):
    tiny_config.train.epochs, tiny_config.train.patience, tiny_config.train.min_delta = 2, 100, 10.0
    train.run(tiny_config)
    with open(Path(tiny_config.output.model_dir) / "history.csv") as f:
        assert "lr" not in next(csv.DictReader(f))


def test_keys_the_trainer_sets_do_not_block_a_resume():
    """A demo run interrupted before data.synthetic existed reads it as False; the trainer now
    sets it to True: that is no change of the user's settings."""
    old = config_lib.load("vanilla", overrides={"data_dir": "/d"})
    new = config_lib.load("vanilla", overrides={"data_dir": "/d"})
    new.data.synthetic = True
    assert train.config_changes(old, new) == []
    new.data.image_size = 32
    assert train.config_changes(old, new) == ["data.image_size: 50 -> 32"]


@pytest.fixture
def one_class_model():
    """Registers a model that calls every image class 0 (a large bias, a zero kernel)."""
    def build(model, image_size, n_classes, augment):
        inputs = keras.Input((image_size, image_size, 3), dtype="uint8")
        x = keras.layers.Flatten()(keras.layers.Rescaling(1 / 255)(inputs))
        bias = keras.initializers.Constant([50.0] + [0.0] * (n_classes - 1))
        out = keras.layers.Dense(n_classes, activation="softmax", kernel_initializer="zeros",
                                 bias_initializer=bias)(x)
        return keras.Model(inputs, out)
    models.register("one_class", min_image_size=4)(build)
    yield "one_class"
    del models.REGISTRY["one_class"]


def test_a_run_whose_model_calls_everything_one_class_says_so(tiny_config, one_class_model,
                                                               caplog):
    tiny_config.model.architecture = one_class_model
    tiny_config.train.epochs = 1
    tiny_config.train.learning_rate = 1e-6
    with caplog.at_level("WARNING"):
        results = train.run(tiny_config)
    assert np.asarray(results["confusion_matrix"])[:, 1:].sum() == 0  # all COVID-19
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("calls every one of the 18 images COVID-19" in w and "--seed" in w
               for w in warnings), warnings


# --- validation weights (--val_class_weights) ------------------------------------------------

@pytest.mark.parametrize("mode, val_sources, weighted", [
    ("auto", [], False),
    ("auto", ["m"], True),
    ("balanced", [], True),
    ("none", ["m"], False),
])
def test_validation_weights_balance_the_classes_when_asked(tmp_path, mode, val_sources,
                                                           weighted):
    root = tree_with_sources(tmp_path / "data", ("a", "b"), ("k", "m"))
    config = config_lib.load("vanilla", overrides={
        "data_dir": str(root), "test_per_class": 2, "val_sources": val_sources,
        "val_class_weights": mode})
    splits = data.make_splits(config.data)
    weights = train.validation_weights(splits, config)
    if not weighted:
        assert weights is None
        return
    labels = np.array([e.label for e in splits.val])
    assert weights.shape == labels.shape and weights.sum() == pytest.approx(len(labels))
    per_class = [weights[labels == c].sum() for c in range(3)]  # every class counts alike
    assert per_class == pytest.approx([len(labels) / 3] * 3)


def test_val_loss_is_the_balanced_mean_of_the_validation_losses(tmp_path):
    """With a val source of two classes (10 images each) and 4 COVID-19 validation images
    from training's sources, the val_loss a run records is the class-balanced mean."""
    root = tree_with_sources(tmp_path / "data", ("a", "b"), ("k", "m"))
    config = config_lib.load("vanilla", overrides={
        "data_dir": str(root), "image_size": 16, "test_per_class": 2, "val_sources": ["m"],
        "epochs": 1, "batch_size": 8, "model_dir": str(tmp_path / "run")})
    train.run(config)
    splits = data.make_splits(config.data)
    assert splits.counts()["val"] == [4, 10, 10]
    model = runs.load_model(str(tmp_path / "run" / "checkpoints" / "last.keras"))
    images = np.concatenate([x for x, _ in data.make_dataset(splits.val, config.data, 8,
                                                             training=False)])
    labels = np.array([e.label for e in splits.val])
    probs = model.predict(models.feed(model, images), verbose=0)
    losses = -np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-7, 1))
    per_class = [losses[labels == c].mean() for c in range(3)]
    recorded = float(_history(tmp_path / "run")[0]["val_loss"])
    assert recorded == pytest.approx(np.mean(per_class), rel=1e-3)
    assert recorded != pytest.approx(losses.mean(), rel=1e-3)  # not the plain mean
