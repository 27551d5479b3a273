"""Consistency training: one image, as it is and augmented twice, should get one prediction.

AugMix's Jensen-Shannon consistency (Hendrycks et al., ICLR 2020): each training step also
predicts every image as it is (augmentation off) and under two independent draws of the
augmentation layers, and adds ``weight`` x the Jensen-Shannon divergence of the three
predictions to the cross-entropy. Plain augmentation only asks each view to be classified
right; a film's class can then still lean on its framing. The consistency term asks the
views to agree, so whatever the augmentation changes (framing, aspect, contrast) cannot move
the prediction. The cross-entropy is computed on the first augmented view, the image as it
is (AugMix's own form) or their mean (``fit``, --consistency_fit). It replaces the model's
``train_step`` (an attribute of the instance, so the saved model and its checkpoints are the
same as without it) and costs three forward passes a step.
"""
from __future__ import annotations

import functools

import tensorflow as tf

from trainer.keras_api import keras

EPSILON = 1e-7  # keeps the logarithms finite where a class has probability 0


def jensen_shannon(views: list[tf.Tensor]) -> tf.Tensor:
    """Per example, the Jensen-Shannon divergence of several predicted distributions (each
    [batch, classes], rows summing to 1): the mean KL divergence of each from their mean.
    0 when they agree; at most log(len(views))."""
    mean = tf.clip_by_value(tf.add_n(views) / len(views), EPSILON, 1.0)
    divergences = [tf.reduce_sum(v * (tf.math.log(tf.clip_by_value(v, EPSILON, 1.0))
                                      - tf.math.log(mean)), axis=-1) for v in views]
    return tf.add_n(divergences) / len(views)


def penalty(divergence: tf.Tensor, weight: float) -> tf.Tensor:
    """``weight`` x the batch's mean divergence, as this replica's share of the loss: Keras
    sums the replicas' gradients, so each replica's loss is divided by their number, as Keras
    does for the cross-entropy."""
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    return weight * tf.reduce_mean(divergence) / replicas


def train_step(model, data, weight: float, fit: str, tracker) -> dict:
    """Keras' ``train_step`` with the consistency term: cross-entropy (and class weights) on
    the view(s) ``fit`` names (``augmented``: the first augmented view; ``clean``: the image as
    it is; ``both``: the mean of the two), plus ``weight`` x the mean Jensen-Shannon divergence
    of the image as it is and its two augmented views; the divergence's epoch mean is logged
    as ``consistency`` (``tracker``, a ``keras.metrics.Mean``)."""
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    with tf.GradientTape() as tape:
        augmented, clean = model(x, training=True), model(x, training=False)
        views = [augmented, model(x, training=True), clean]
        views = [tf.cast(v, tf.float32) for v in views]  # mixed precision predicts in 16 bits
        divergence = jensen_shannon(views)
        fitted = {"augmented": [augmented], "clean": [clean], "both": [augmented, clean]}[fit]
        cross_entropy = tf.add_n([model.compute_loss(x, y, p, sample_weight)
                                  for p in fitted]) / len(fitted)
        loss = cross_entropy + penalty(divergence, weight)
    model.optimizer.minimize(loss, model.trainable_variables, tape=tape)
    tracker.update_state(divergence)
    logs = model.compute_metrics(x, y, fitted[0], sample_weight)
    return {**logs, "consistency": tracker.result()}


def use(model, weight: float, fit: str = "augmented") -> None:
    """Train ``model`` with the consistency term from its next ``fit`` (weight 0: no change).
    Call it in the strategy's scope, where the model was built. The divergence's running mean
    is kept outside the model (a metric attribute would add its variables to the model's
    weights) and reset with the model's metrics at the start of each epoch."""
    if not weight:
        return
    tracker = keras.metrics.Mean(name="consistency")
    reset_model_metrics = model.reset_metrics

    def reset_metrics():
        reset_model_metrics()
        tracker.reset_state()

    model.reset_metrics = reset_metrics
    model.train_step = functools.partial(train_step, model, weight=weight, fit=fit,
                                         tracker=tracker)
