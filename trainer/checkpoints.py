"""Whole-model checkpoint files (.keras), saved atomically to local paths or gs://.

Keras writes .keras files with zipfile, which cannot open gs:// paths, and a crash in the
middle of a write would leave half a file. So a model is saved to a local temporary file,
copied next to its destination under a temporary name, then renamed over it.
"""
from __future__ import annotations

import os
import tempfile

import tensorflow as tf

from trainer import augment, intensity  # noqa: F401 (registers the models' own layers for loading)
from trainer.keras_api import keras


def save(model, path: str) -> None:
    """Saves ``model`` to ``path`` (local or gs://); readers see the old or the new file."""
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "model.keras")
        model.save(local)
        staged = path + ".partial"
        tf.io.gfile.copy(local, staged, overwrite=True)
        tf.io.gfile.rename(staged, path, overwrite=True)


def load(path: str):
    """Loads a .keras checkpoint from a local path or gs:// (custom layers need no
    custom_objects: importing this module registered them)."""
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "model.keras")
        tf.io.gfile.copy(path, local, overwrite=True)
        return keras.models.load_model(local)
