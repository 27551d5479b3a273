"""Consistency training (--consistency): the divergence it adds, that it makes augmented views
agree, that it reaches a whole run, and that the saved model does not depend on it."""
from __future__ import annotations

import csv
import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from conftest import run_python, script_result
from trainer import checkpoints, config as config_lib, consistency, models, train
from trainer.keras_api import keras

SIZE = 16
IMAGES = np.random.default_rng(0).integers(0, 256, (32, SIZE, SIZE, 3), dtype=np.uint8)
LABELS = keras.utils.to_categorical(np.arange(32) % 3, 3)
ONE_HOT = np.eye(3, dtype=np.float32)
SOFT = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]], np.float32)


def _entropy_form(*rows) -> float:
    """The divergence written another way: entropy of the mean less the mean entropy."""
    def entropy(p):
        p = np.asarray(p, np.float64)
        return -sum(x * math.log(x) for x in p if x > 0)
    return entropy(np.mean(rows, axis=0)) - np.mean([entropy(r) for r in rows])


JS_CASES = [  # (views, expected divergence per example)
    ([ONE_HOT, ONE_HOT], [0.0, 0.0, 0.0]),
    ([ONE_HOT, ONE_HOT[[1, 2, 0]]], [math.log(2)] * 3),
    ([ONE_HOT, ONE_HOT[[1, 2, 0]], ONE_HOT[[2, 0, 1]]], [math.log(3)] * 3),
    ([SOFT, SOFT[::-1]], [_entropy_form(SOFT[0], SOFT[1])] * 2),
    ([np.full((1, 3), 1 / 3, np.float32), np.array([[0.5, 0.5, 0.0]], np.float32)],
     [_entropy_form([1 / 3] * 3, [0.5, 0.5, 0.0])]),
]


@pytest.mark.parametrize("views, expected", JS_CASES)
def test_jensen_shannon_of_known_distributions(views, expected):
    got = consistency.jensen_shannon([tf.constant(v) for v in views]).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)


def _model(weight: float, seed: int = 5):
    config = config_lib.load("robust", overrides={"two_views": False, "image_size": SIZE,
                                                  "border_crop": 0.0, "consistency": weight})
    keras.utils.set_random_seed(seed)
    model = models.build(config.model, SIZE, 3, config.augment)
    train.compile_model(model, config)
    consistency.use(model, config.train.consistency)
    return model


def _disagreement(model, draws: int = 8) -> float:
    """Mean divergence between each image's prediction as it is and augmented."""
    clean = model(IMAGES, training=False)
    return float(np.mean([tf.reduce_mean(consistency.jensen_shannon(
        [clean, model(IMAGES, training=True)])) for _ in range(draws)]))


def test_consistency_makes_augmented_views_agree():
    """The same model, data and seed, trained with and without the term: with it, predictions
    move far less when the robust recipe's augmentation is drawn on the images."""
    without, with_term = _model(0.0), _model(50.0)
    for model in (without, with_term):
        model.fit(IMAGES, LABELS, batch_size=8, epochs=15, verbose=0)
    assert _disagreement(with_term) < 0.5 * _disagreement(without)


class _BlankWhileTraining(keras.layers.Layer):
    """Augmentation stand-in: a blank image in training, the image itself otherwise, so the
    augmented and clean views differ without chance."""

    def call(self, inputs, training=None):
        return inputs * 0.0 if training else inputs


def _two_view_model(fit: str):
    inputs = keras.Input((4,))
    dense = keras.layers.Dense(3, activation="softmax", bias_initializer="zeros",
                               kernel_initializer=keras.initializers.RandomNormal(stddev=1.0, seed=3))
    model = keras.Model(inputs, dense(_BlankWhileTraining()(inputs)))
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="categorical_crossentropy")
    consistency.use(model, 1.0, fit)
    return model


FEATURES = np.random.default_rng(2).normal(size=(6, 4)).astype(np.float32) * 3
TARGETS = ONE_HOT[np.arange(6) % 3]


def _cross_entropy(model, training: bool) -> float:
    predicted = model(FEATURES, training=training)
    return float(keras.losses.categorical_crossentropy(TARGETS, predicted).numpy().mean())


@pytest.mark.parametrize("fit, expected", [
    ("augmented", lambda blank, clean: blank),
    ("clean", lambda blank, clean: clean),
    ("both", lambda blank, clean: (blank + clean) / 2),
])
def test_the_cross_entropy_fits_the_view_asked_for(fit, expected):
    """The logged loss is the cross-entropy of the view(s) --consistency_fit names: a blank
    augmented view predicts 1/3 each (log 3); the clean view predicts from the features."""
    model = _two_view_model(fit)
    blank, clean = _cross_entropy(model, True), _cross_entropy(model, False)
    assert blank == pytest.approx(math.log(3), rel=1e-5) and abs(clean - blank) > 0.1
    logged = model.fit(FEATURES, TARGETS, batch_size=6, epochs=1, verbose=0).history["loss"][0]
    assert logged == pytest.approx(expected(blank, clean), rel=1e-4)


def test_weight_zero_leaves_keras_training_as_it_is():
    model = _model(0.0)
    assert "train_step" not in vars(model)
    history = model.fit(IMAGES, LABELS, batch_size=16, epochs=1, verbose=0).history
    assert "consistency" not in history


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_consistency_is_reported_and_the_saved_model_is_unchanged(tmp_path, policy):
    keras.mixed_precision.set_global_policy(policy)
    try:
        model = _model(1.0)
        history = model.fit(IMAGES, LABELS, batch_size=16, epochs=2, verbose=0).history
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert len(history["consistency"]) == 2 and np.isfinite(history["consistency"]).all()
    assert 0 < history["consistency"][0] <= math.log(3)
    assert np.isfinite(history["loss"]).all()
    path = str(tmp_path / "model.keras")
    checkpoints.save(model, path)
    loaded = checkpoints.load(path)
    assert type(loaded) is type(_model(0.0))
    assert "train_step" not in vars(loaded)
    np.testing.assert_allclose(loaded.predict(IMAGES, verbose=0), model.predict(IMAGES, verbose=0),
                               atol=1e-6)


def test_a_run_with_consistency_logs_it_each_epoch(tiny_config, caplog):
    config = dataclasses.replace(
        tiny_config, augment=dataclasses.replace(tiny_config.augment, augment=True),
        train=dataclasses.replace(tiny_config.train, consistency=2.0, epochs=2))
    with caplog.at_level("INFO"):
        train.run(config)
    with open(Path(config.output.model_dir) / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    assert all(0 < float(row["consistency"]) <= math.log(3) for row in rows)
    epochs = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Epoch ")]
    assert len(epochs) == 2 and all(" - consistency: " in line for line in epochs), epochs


# Two replicas on two logical CPUs (set before TensorFlow starts, hence a subprocess): each
# replica's share of the term is halved, as Keras halves the cross-entropy, and fit runs.
MIRRORED_SCRIPT = """
import json
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from trainer import config as config_lib, consistency, models, train
from trainer.keras_api import keras
divergence = consistency.jensen_shannon([tf.constant([[1.0, 0.0, 0.0]]),
                                         tf.constant([[0.0, 1.0, 0.0]])])
alone = float(consistency.penalty(divergence, 3.0))
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
shares = strategy.experimental_local_results(
    strategy.run(tf.function(lambda: consistency.penalty(divergence, 3.0))))
config = config_lib.load("robust", overrides={"two_views": False, "image_size": 16,
                                              "border_crop": 0.0, "consistency": 12.0})
with strategy.scope():
    model = models.build(config.model, 16, 3, config.augment)
    train.compile_model(model, config)
    consistency.use(model, config.train.consistency)
x = np.random.default_rng(1).integers(0, 256, (16, 16, 16, 3), dtype=np.uint8)
y = np.eye(3, dtype=np.float32)[np.arange(16) % 3]
history = model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(8), epochs=2,
                    verbose=0).history
print("RESULT " + json.dumps({"alone": alone, "shares": [float(s) for s in shares],
                              "consistency": history["consistency"]}))
"""


def test_two_replicas_share_the_term_and_train():
    result = script_result(run_python(MIRRORED_SCRIPT))
    assert result["alone"] == pytest.approx(3.0 * math.log(2), rel=1e-5)
    assert result["shares"] == pytest.approx([result["alone"] / 2] * 2, rel=1e-5)
    assert len(result["consistency"]) == 2
    assert all(0 < value <= math.log(3) for value in result["consistency"])
