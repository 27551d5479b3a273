"""Two views of each film: the whole film and its chest crop, each read by its own network.

A network that reads whole films learns how each source frames them; one that reads each
film's chest crop (chest_crop.py) loses part of the lungs when the crop cuts into them. Their
mistakes differ, and the mean of their probabilities holds up across framings better than
either (docs/generalisation.md). ``--two_views`` builds that pair as one model: one input, the
configured architecture twice ("whole" and "chest", each with its own augmentation), and the
mean of their softmax outputs. Each tower is trained on its own cross-entropy (a replaced
``train_step``), so neither leans on the other, as two separately trained models would not;
validation, early stopping (one stop for both), evaluation, prediction and the serving export
all see the mean.
"""
from __future__ import annotations

import dataclasses
import functools

import tensorflow as tf
from absl import logging

from trainer.keras_api import keras

TOWERS = ("whole", "chest")


def build(builder, model_config, image_size: int, n_classes: int, augment):
    """The configured architecture twice, on the whole film and on its chest crop, one uint8
    input, the mean of their probabilities out (``builder``: a registered model builder)."""
    inputs = keras.Input((image_size, image_size, 3), dtype="uint8", name="image")
    outputs = []
    for name in TOWERS:
        tower_config = dataclasses.replace(model_config, two_views=False,
                                           chest_crop=name == "chest")
        tower = builder(tower_config, image_size, n_classes, augment)
        outputs.append(keras.Model(tower.inputs, tower.outputs, name=name)(inputs))
    mean = keras.layers.Average(name="mean_probabilities", dtype="float32")(outputs)
    return keras.Model(inputs, mean, name=f"{model_config.architecture}_two_views")


def towers(model) -> list | None:
    """The whole-film and chest towers of a two-view model, or None for any other model."""
    names = [layer.name for layer in model.layers]
    if not all(name in names for name in TOWERS) or \
            not isinstance(model.layers[-1], keras.layers.Average):
        return None
    return [model.get_layer(name) for name in TOWERS]


def loss(model, x, y, sample_weight=None, training: bool = True):
    """The mean of the towers' own losses (the compiled loss, class or sample weights
    applied), and the mean prediction: a tower's gradient depends on its prediction alone."""
    predictions = [tf.cast(tower(x, training=training), tf.float32) for tower in towers(model)]
    total = tf.add_n([model.compute_loss(x, y, p, sample_weight) for p in predictions])
    return total / len(predictions), tf.add_n(predictions) / len(predictions)


def train_step(model, data) -> dict:
    """Keras' ``train_step`` with each tower fitted on its own loss (``loss``); the metrics
    are the mean prediction's."""
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    with tf.GradientTape() as tape:
        value, mean = loss(model, x, y, sample_weight)
    model.optimizer.minimize(value, model.trainable_variables, tape=tape)
    return model.compute_metrics(x, y, mean, sample_weight)


def use(model) -> None:
    """Train a two-view ``model`` tower by tower from its next ``fit``; any other model is left
    as it is. Call it in the strategy's scope, where the model was built."""
    if towers(model) is not None:
        model.train_step = functools.partial(train_step, model)
        logging.info("two views: the whole film and its chest crop, each through its own %s, "
                     "each fitted on its own loss; the model predicts their mean",
                     model.name.removesuffix("_two_views"))
