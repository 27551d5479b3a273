"""Training callbacks the stock Keras ones do not cover: atomic best/last checkpoints that
survive a resume, a history CSV that works on gs://, a NaN stop that says where, validation
on one device for multi-replica runs, and a short console line per epoch."""
from __future__ import annotations

import csv
import io
import json
import math
import signal
import threading
import time

from absl import logging

from trainer import checkpoints, distribute, storage
from trainer.keras_api import keras


def monitor_mode(monitor: str) -> str:
    """Which way a monitored figure improves: a loss falls ("min"), a score rises ("max")."""
    return "min" if monitor.endswith("loss") else "max"


class BestAndLastCheckpoint(keras.callbacks.Callback):
    """Keeps ``best.keras`` (best monitored value: lowest loss, highest score) and
    ``last.keras`` in ``folder``, both without optimizer state (a third of the size; resuming
    reads the backup instead).

    The best value is stored in ``best.json`` beside the model, so a resumed run only
    replaces the best checkpoint with a better one.
    """

    def __init__(self, folder: str, monitor: str = "val_loss", min_delta: float = 0.0,
                 start_from_epoch: int = 0):
        super().__init__()
        self.folder, self.monitor, self.min_delta = folder, monitor, min_delta
        self.start_from_epoch = start_from_epoch  # epochs never kept as the best
        self.sign = 1.0 if monitor_mode(monitor) == "min" else -1.0  # compare as a loss
        self.best_path = storage.join(folder, "best.keras")
        self.last_path = storage.join(folder, "last.keras")
        self.record_path = storage.join(folder, "best.json")
        self.best = self.sign * math.inf
        self.best_epoch = None

    def on_train_begin(self, logs=None):
        storage.makedirs(self.folder)
        if storage.exists(self.record_path):
            record = json.loads(storage.read_text(self.record_path))
            chosen_on = record.get("monitor", "val_loss")
            if chosen_on != self.monitor:  # --allow_config_change
                logging.warning("%s was chosen on %s, and this run follows %s: the next "
                                "epoch's checkpoint replaces it", self.best_path, chosen_on,
                                self.monitor)
                return
            self.best, self.best_epoch = record["value"], record["epoch"]

    def on_epoch_end(self, epoch, logs=None):
        if not math.isfinite(float((logs or {}).get("loss", 0.0))):
            return  # keep the last good checkpoints, never NaN weights
        value = (logs or {}).get(self.monitor)
        if epoch >= self.start_from_epoch and self._improves(value):
            checkpoints.save(self.model, self.best_path, optimizer_state=False)
            self.best, self.best_epoch = float(value), epoch + 1
            storage.write_text_atomic(self.record_path, json.dumps(
                {"epoch": self.best_epoch, "monitor": self.monitor, "value": self.best}))
        checkpoints.save(self.model, self.last_path, optimizer_state=False)  # resume: backup/

    def _improves(self, value) -> bool:
        """Whether ``value`` beats the best by more than min_delta, in the figure's direction."""
        return value is not None and self.sign * (value - self.best) < -self.min_delta


class HistoryCSV(keras.callbacks.Callback):
    """Writes one row per epoch to a CSV, rewriting it whole (gs:// has no append)."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self.rows: list[dict] = []

    def on_train_begin(self, logs=None):
        if storage.exists(self.path):
            self.rows = list(csv.DictReader(io.StringIO(storage.read_text(self.path))))

    def on_epoch_end(self, epoch, logs=None):
        row = {"epoch": epoch + 1, **{k: float(v) for k, v in (logs or {}).items()}}
        self.rows = [r for r in self.rows if int(r["epoch"]) < epoch + 1] + [row]
        fields = list(dict.fromkeys(k for r in self.rows for k in r))
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(self.rows)
        storage.write_text_atomic(self.path, out.getvalue())


class ReduceLearningRate(keras.callbacks.ReduceLROnPlateau):
    """ReduceLROnPlateau that says in the log when it lowers the rate, and why."""

    def __init__(self, monitor: str, patience: int, factor: float, min_delta: float):
        super().__init__(monitor=monitor, mode=monitor_mode(monitor), patience=patience,
                         factor=factor, min_delta=min_delta)

    def on_epoch_end(self, epoch, logs=None):
        before = float(keras.backend.get_value(self.model.optimizer.learning_rate))
        super().on_epoch_end(epoch, logs)
        after = float(keras.backend.get_value(self.model.optimizer.learning_rate))
        if after < before:
            logging.info("learning rate %.3g -> %.3g after epoch %d: %s did not improve by more "
                         "than %g for %d epochs (--lr_patience)", before, after, epoch + 1,
                         self.monitor, self.min_delta, self.patience)


class StopOnNaN(keras.callbacks.TerminateOnNaN):
    """TerminateOnNaN that remembers the epoch and step where the loss stopped being finite."""

    def __init__(self):
        super().__init__()
        self.epoch = 0
        self.where: tuple[int, int] | None = None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)) and self.where is None:
            self.where = (self.epoch + 1, batch + 1)
        super().on_batch_end(batch, logs)


class PreemptibleBackup(keras.callbacks.BackupAndRestore):
    """BackupAndRestore that also backs up on SIGTERM (what Kubernetes sends on preemption).

    The signal only sets a flag; at the end of the running step the state is saved, training
    stops, and the backup is kept (the stock callback deletes it when training ends). With
    ``save_freq='epoch'`` the interrupted epoch is re-run from its start on resume. Only for
    single-worker runs: a backup under MultiWorkerMirroredStrategy needs every worker.
    """

    def __init__(self, backup_dir: str, save_freq="epoch", handle_sigterm: bool = True):
        super().__init__(backup_dir, save_freq=save_freq, delete_checkpoint=True)
        self.handle_sigterm = handle_sigterm
        self.preempted_at: tuple[int, int] | None = None
        self._signalled = False
        self._previous_handler = None

    def _implements_train_batch_hooks(self):
        return True  # the flag is checked after every step

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if self.handle_sigterm and threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame):
        self._signalled = True

    def on_train_batch_end(self, batch, logs=None):
        super().on_train_batch_end(batch, logs)
        if self._signalled and self.preempted_at is None:
            epoch = self._current_epoch
            if self.save_freq == "epoch":
                self._backup(epoch=epoch - 1)  # resume re-runs this epoch from its start
            else:
                self._backup(epoch=epoch, batch=batch)  # resume at the next step
            self.preempted_at = (epoch + 1, batch + 1)
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        if self.preempted_at is None:  # a stopped epoch is not a finished one
            super().on_epoch_end(epoch, logs)

    def on_train_end(self, logs=None):
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None
        if self.preempted_at is None:
            super().on_train_end(logs)
        else:  # keep the backup for the restart
            del self._training_state
            del self.model._training_state


class OneDeviceValidation(keras.callbacks.Callback):
    """Validates on one device of the chief and gives every worker the figures as ``val_*``.

    Keras would split each validation batch across the replicas, and a short last batch leaves
    some replica none: oneDNN's CPU kernels fail on a batch of zero images. On one device
    every image is counted once, in whole batches. ``copy`` is a compiled model built outside
    the strategy that takes the trained weights each epoch (None on the other workers). Put
    it first, so that the callbacks after it see the validation figures.
    """

    def __init__(self, copy, dataset, strategy, me: distribute.Role):
        super().__init__()
        self.copy, self.dataset, self.strategy, self.me = copy, dataset, strategy, me

    def on_epoch_end(self, epoch, logs=None):
        names = self.model.metrics_names
        values = [0.0] * len(names)
        if self.copy is not None:
            self.copy.set_weights(self.model.get_weights())
            scores = distribute.outside_strategy(
                lambda: self.copy.evaluate(self.dataset, return_dict=True, verbose=0))
            values = [float(scores[name]) for name in names]
        values = distribute.share_from_chief(self.strategy, self.me, values)
        if logs is not None:
            logs.update({f"val_{name}": value for name, value in zip(names, values)})


class EpochLog(keras.callbacks.Callback):
    """One short line per epoch: loss, accuracy and AUC of training and validation, and the
    consistency term where trained with it (every metric stays in history.csv and
    TensorBoard)."""

    SHOWN = ("loss", "accuracy", "auc", "consistency")  # consistency: with --consistency

    def __init__(self, epochs: int):
        super().__init__()
        self.epochs = epochs
        self.started = time.monotonic()

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.monotonic()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        shown = [f"{key}: {float(logs[key]):.4f}" for prefix in ("", "val_")
                 for key in (prefix + name for name in self.SHOWN) if key in logs]
        logging.info("Epoch %d/%d - %.0fs - %s", epoch + 1, self.epochs,
                     time.monotonic() - self.started, " - ".join(shown))
