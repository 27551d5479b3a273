"""The single import point for Keras: tf-keras (Keras 2 for TensorFlow).

Keras 3's ``fit`` fails under MultiWorkerMirroredStrategy (keras-team/keras#20585),
so the trainer uses tf-keras everywhere. Import ``keras`` from here only, so a
later move to Keras 3 is a change of this one file.
"""
import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import tf_keras as keras  # noqa: E402

__all__ = ["keras"]
