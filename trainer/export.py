"""The serving export: RUN/export/, a SavedModel whose ``serving_default`` signature takes
encoded image bytes (PNG, JPEG, BMP, GIF) and returns class probabilities and the class name.

Decoding is ``data.decode_pixels``, the function the training pipeline uses, with the run's
image size and interpolation, so a server sees exactly the pixels training saw.
"""
from __future__ import annotations

import tensorflow as tf
from absl import logging

from trainer import checkpoints, data, models, storage
from trainer.config import Config

SIGNATURE = "serving_default"
INPUT_NAME = "image_bytes"  # TF Serving's REST API base64-decodes inputs named *_bytes


class ServingModule(tf.Module):
    """The model plus the training decode, as one traceable serving function."""

    def __init__(self, model, image_size: int, interpolation: str, classes: list[str]):
        super().__init__()
        self.model = model
        self.image_size = image_size
        self.interpolation = interpolation
        self.classes = tf.constant(list(classes))

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=INPUT_NAME)])
    def serve(self, image_bytes):
        size = self.image_size
        pixels = tf.map_fn(lambda b: data.decode_pixels(b, size, self.interpolation), image_bytes,
                           fn_output_signature=tf.TensorSpec([size, size, 3], tf.uint8))
        images = models.feed(self.model, pixels)
        probabilities = tf.cast(self.model(images, training=False), tf.float32)
        index = tf.argmax(probabilities, axis=1, output_type=tf.int32)
        return {"probabilities": probabilities, "class_index": index,
                "class_name": tf.gather(self.classes, index)}


def save(model, config: Config, export_dir: str) -> str:
    """Writes the serving SavedModel to export_dir (local or gs://), replacing an old one.

    Locally it is written beside the target and renamed into place, so a crash never leaves
    half an export under the final name.
    """
    module = ServingModule(checkpoints.weights_only(model), config.data.image_size,
                           config.data.interpolation, config.data.classes)  # no optimizer state
    target = export_dir.rstrip("/")
    staged = target if storage.is_remote(target) else target + ".partial"
    storage.remove_tree(staged)
    tf.saved_model.save(module, staged, signatures={SIGNATURE: module.serve})
    if staged != target:
        storage.remove_tree(target)
        tf.io.gfile.rename(staged, target)
    logging.info("serving export: %s (signature %s: %s -> probabilities, class_name)",
                 target, SIGNATURE, INPUT_NAME)
    return target


def load_signature(export_dir: str):
    """The serving function of an export (for clients and tests)."""
    return tf.saved_model.load(export_dir).signatures[SIGNATURE]
