"""Whole-model checkpoint files (.keras), saved atomically to local paths or gs://.

Keras writes .keras files with zipfile, which cannot open gs:// paths, and a crash in the
middle of a write would leave half a file. So a model is saved to a local temporary file,
copied next to its destination under a temporary name, then renamed over it.

The run's best and last checkpoints hold the architecture and weights only: Adam's two
moments per weight would triple their size, and resuming reads backup/, not these files.
"""
from __future__ import annotations

import os
import tempfile
import weakref

import tensorflow as tf

# registers the models' own layers for loading
from trainer import augment, chest_crop, intensity  # noqa: F401
from trainer.keras_api import keras

_WEIGHTS_ONLY = weakref.WeakKeyDictionary()  # model -> its uncompiled copy, made once


def weights_only(model):
    """An uncompiled copy of ``model`` holding its current weights and no optimizer state.

    The copy is made on the first call (under the same distribution strategy scope, if any)
    and refreshed with ``set_weights`` afterwards, so an epoch's checkpoint costs a copy of the
    weights, not a rebuild of the model."""
    copy = _WEIGHTS_ONLY.get(model)
    if copy is None:
        copy = _WEIGHTS_ONLY[model] = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return copy


def save(model, path: str, optimizer_state: bool = True) -> None:
    """Saves ``model`` to ``path`` (local or gs://); readers see the old or the new file.

    ``optimizer_state=False`` writes the architecture and weights only (see weights_only)."""
    if not optimizer_state:
        model = weights_only(model)
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "model.keras")
        model.save(local)
        staged = path + ".partial"
        tf.io.gfile.copy(local, staged, overwrite=True)
        tf.io.gfile.rename(staged, path, overwrite=True)


def load(path: str):
    """Loads a .keras checkpoint from a local path or gs://, compiled for ``evaluate`` (one
    saved without optimizer state gets the trainer's loss and metrics); the models' own layers
    need no custom_objects (importing this module registered them)."""
    from trainer import metrics
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "model.keras")
        tf.io.gfile.copy(path, local, overwrite=True)
        model = keras.models.load_model(local)
    if model.optimizer is None:
        model.compile(loss=metrics.LOSS, metrics=metrics.compiled_metrics())
    return model
