"""Augmentation inside the model: off by default (the tutorial's graph and weights unchanged),
the identity at inference, random in training, under mixed precision and tf.distribute."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from conftest import run_python, script_result
from trainer import augment, checkpoints, config as config_lib, models, train
from trainer.keras_api import keras

SIZE = 24
PIXELS = np.random.default_rng(0).integers(0, 256, (4, SIZE, SIZE, 3), dtype=np.uint8)

# The vanilla model as built before augmentation, normalisation and border crop existed
# (trainer/models.py at dd5ed07): its layers, weight count at 50 px, and the sum of |w| of its
# initial weights at 16 px after keras.utils.set_random_seed(28).
TUTORIAL_LAYERS = [("InputLayer", "image"), ("Rescaling", "scaling"), ("Conv2D", "conv"),
                   ("MaxPooling2D", None), ("Dropout", None), ("Flatten", None), ("Dense", None),
                   ("Dense", "probabilities")]
TUTORIAL_PARAMS = 4_720_515
TUTORIAL_INITIAL_WEIGHTS_SUM = 11629.884546890855


def _augmented(**factors) -> config_lib.AugmentConfig:
    return dataclasses.replace(config_lib.AugmentConfig(augment=True), **factors)


ALL_ON = dict(stretch=0.2, aspect=0.2, noise=0.05, blur=1.0)  # defaults + those off by default


@pytest.mark.parametrize("name", ["vanilla", "inception"])
def test_tutorial_recipes_turn_everything_off(name):
    config = config_lib.load(name)
    assert config.augment == config_lib.AugmentConfig() and not config.augment.augment
    assert (config.model.intensity, config.model.border_crop) == ("none", 0.0)
    assert (config.data.group_by, config.data.val_sources) == ("", [])
    assert augment.layers(config.augment) == []


def test_default_vanilla_has_the_tutorial_layers_and_weights():
    config = config_lib.load("vanilla")
    model = models.build(config.model, 50, 3, config.augment)
    layers = [(type(layer).__name__, layer.name) for layer in model.layers]
    assert [kind for kind, _ in layers] == [kind for kind, _ in TUTORIAL_LAYERS]
    assert all(name is None or name == got for (_, got), (_, name) in zip(layers, TUTORIAL_LAYERS))
    assert model.count_params() == TUTORIAL_PARAMS
    keras.utils.set_random_seed(28)
    small = models.build(config.model, 16, 3, config.augment)
    total = sum(np.abs(w.numpy()).astype(np.float64).sum() for w in small.weights)
    assert total == pytest.approx(TUTORIAL_INITIAL_WEIGHTS_SUM, rel=1e-9)


def test_augmentation_adds_layers_but_no_weights():
    config = config_lib.load("vanilla")
    plain = models.build(config.model, SIZE, 3)
    augmented = models.build(config.model, SIZE, 3, _augmented(**ALL_ON))
    names = [layer.name for layer in augmented.layers]
    assert names[1:11] == ["augment_zoom", "augment_stretch", "augment_aspect",
                           "augment_translate", "augment_rotate", "augment_brightness",
                           "augment_contrast", "augment_gamma", "augment_blur", "augment_noise"]
    assert names[11] == "scaling"
    assert augmented.count_params() == plain.count_params()
    assert len(augmented.weights) == len(plain.weights)


def test_augmentation_is_off_at_inference_and_on_in_training():
    config = config_lib.load("vanilla")
    plain = models.build(config.model, SIZE, 3)
    augmented = models.build(config.model, SIZE, 3, _augmented(**ALL_ON))
    augmented.set_weights(plain.get_weights())
    expected = plain.predict(PIXELS, verbose=0)
    for out in (augmented.predict(PIXELS, verbose=0), augmented.predict(PIXELS, verbose=0),
                augmented(PIXELS).numpy(), augmented(PIXELS, training=False).numpy()):
        np.testing.assert_array_equal(out, expected)
    first = augmented(PIXELS, training=True).numpy()
    second = augmented(PIXELS, training=True).numpy()
    assert np.abs(first - second).max() > 1e-4


# factor -> value turning on that layer alone; each must change images in training only.
ONE_AT_A_TIME = [("zoom", 0.3), ("stretch", 0.3), ("aspect", 0.3), ("translate", 0.2),
                 ("rotate", 30.0), ("brightness", 0.3), ("contrast", 0.5), ("gamma", 0.5),
                 ("blur", 2.0), ("noise", 0.1)]


@pytest.mark.parametrize("factor, value", ONE_AT_A_TIME)
def test_each_augmentation_changes_images_in_training_only(factor, value):
    off = {name: 0.0 for name, _ in ONE_AT_A_TIME}
    [layer] = augment.layers(_augmented(**{**off, factor: value}))
    images = tf.constant(PIXELS, tf.float32)
    np.testing.assert_array_equal(layer(images).numpy(), PIXELS)
    np.testing.assert_array_equal(layer(images, training=False).numpy(), PIXELS)
    changed = layer(images, training=True).numpy()
    assert changed.dtype == np.float32 and changed.shape == PIXELS.shape
    assert np.abs(changed - PIXELS).mean() > 0.5
    if factor != "noise":
        assert changed.min() >= 0 and changed.max() <= 255
    per_image = np.abs(changed - PIXELS).reshape(4, -1).mean(axis=1)
    assert len(set(np.round(per_image, 3))) > 1  # drawn per image, not once per batch


def test_stretch_changes_the_height_alone():
    """A film whose grey varies only across the columns comes through a stretch unchanged; one
    whose grey varies down the rows does not: the aspect ratio changes, not the width."""
    off = {name: 0.0 for name, _ in ONE_AT_A_TIME}
    [layer] = augment.layers(_augmented(**{**off, "stretch": 0.3}))
    ramp = np.linspace(0, 255, SIZE, dtype=np.float32)
    across = np.broadcast_to(ramp[None, None, :, None], (4, SIZE, SIZE, 3))
    down = np.broadcast_to(ramp[None, :, None, None], (4, SIZE, SIZE, 3))
    np.testing.assert_allclose(layer(tf.constant(across), training=True).numpy(), across,
                               atol=1e-3)
    assert np.abs(layer(tf.constant(down), training=True).numpy() - down).mean() > 0.5


def test_aspect_cuts_rows_or_columns_never_both_and_fills_nothing():
    """Channel 0 a ramp down the rows, channel 1 a ramp across the columns (a crop moves each
    on its own): in every image one of them changes and the other does not, both kinds occur,
    the cut stays within the factor (the first row or column comes from at most factor / 2 of
    the way in) and nothing outside the image is filled in (values stay within the ramp)."""
    off = {name: 0.0 for name, _ in ONE_AT_A_TIME}
    factor, n = 0.4, 64
    [layer] = augment.layers(_augmented(**{**off, "aspect": factor}))
    ramp = np.linspace(0, 255, SIZE, dtype=np.float32)
    image = np.stack([np.broadcast_to(ramp[:, None], (SIZE, SIZE)),
                      np.broadcast_to(ramp[None, :], (SIZE, SIZE)),
                      np.zeros((SIZE, SIZE), np.float32)], axis=-1)
    batch = np.broadcast_to(image, (n, SIZE, SIZE, 3))
    out = layer(tf.constant(batch), training=True).numpy()
    rows_cut = np.abs(out[..., 0] - batch[..., 0]).reshape(n, -1).max(axis=1) > 1e-2
    cols_cut = np.abs(out[..., 1] - batch[..., 1]).reshape(n, -1).max(axis=1) > 1e-2
    assert not (rows_cut & cols_cut).any()
    assert 10 < rows_cut.sum() < n - 10 and 10 < cols_cut.sum() < n - 10
    first_row, first_col = out[:, 0, 0, 0], out[:, 0, 0, 1]
    assert first_row.max() <= 255 * factor / 2 + 1 and first_col.max() <= 255 * factor / 2 + 1
    assert out.min() >= 0 and out.max() <= 255


def test_every_factor_zero_gives_no_layers():
    assert augment.layers(_augmented(**{name: 0.0 for name, _ in ONE_AT_A_TIME})) == []


def test_augmented_checkpoint_loads_without_custom_objects(tmp_path):
    config = config_lib.load("vanilla")
    model = models.build(config.model, SIZE, 3, _augmented(**ALL_ON))
    path = str(tmp_path / "model.keras")
    checkpoints.save(model, path)
    loaded = checkpoints.load(path)
    assert [type(a) for a in model.layers] == [type(b) for b in loaded.layers]
    np.testing.assert_array_equal(loaded.predict(PIXELS, verbose=0),
                                  model.predict(PIXELS, verbose=0))
    assert np.abs(loaded(PIXELS, training=True).numpy()
                  - loaded(PIXELS, training=True).numpy()).max() > 1e-4


def test_augmented_model_trains_under_mixed_bfloat16():
    config = config_lib.load("vanilla", overrides={"mixed_precision": "mixed_bfloat16"})
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = models.build(config.model, SIZE, 3, _augmented(**ALL_ON))
        train.compile_model(model, config)
        y = keras.utils.to_categorical([0, 1, 2, 0], 3)
        history = model.fit(PIXELS, y, batch_size=4, epochs=1, verbose=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert np.isfinite(history.history["loss"][0])
    assert model.get_layer("conv").compute_dtype == "bfloat16"
    for layer in model.layers[1:10]:
        assert layer.compute_dtype == "float32", layer.name


# Two replicas on two logical CPUs (the device layout must be set before TensorFlow starts,
# hence a subprocess): each replica draws its own augmentation, and fit runs.
MIRRORED_SCRIPT = """
import json
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from trainer import augment, config as config_lib, models, train
from trainer.keras_api import keras
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
aug = config_lib.AugmentConfig(augment=True, noise=0.05, blur=1.0)
config = config_lib.load("vanilla")
with strategy.scope():
    keras.utils.set_random_seed(3)
    model = models.build(config.model, 16, 3, aug)
    train.compile_model(model, config)
    layers = augment.layers(aug)
    images = tf.constant(np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3)), tf.float32)
    for layer in layers:
        layer(images)  # builds it, and its random generator, in the strategy's scope
@tf.function
def step():
    return strategy.run(lambda: [layer(images, training=True) for layer in layers])
per_replica = [[v.numpy() for v in strategy.experimental_local_results(out)] for out in step()]
differ = [bool(np.abs(a - b).max() > 1e-3) for a, b in per_replica]
x = np.random.default_rng(1).integers(0, 256, (16, 16, 16, 3), dtype=np.uint8)
y = np.eye(3, dtype=np.float32)[np.arange(16) % 3]
ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
loss = model.fit(ds, epochs=1, verbose=0).history["loss"][0]
print("RESULT " + json.dumps({"replicas": strategy.num_replicas_in_sync, "differ": differ,
                              "loss": float(loss)}))
"""


def test_replicas_draw_their_own_augmentation_and_train():
    result = script_result(run_python(MIRRORED_SCRIPT))
    assert result["replicas"] == 2
    assert all(result["differ"]), result
    assert np.isfinite(result["loss"])


def test_resuming_compares_the_augmentation_too():
    old = config_lib.load("vanilla")
    new = config_lib.load("vanilla", overrides={"augment": True, "zoom": 0.2})
    assert train.config_changes(old, new) == ["augment.augment: False -> True",
                                              "augment.zoom: 0.1 -> 0.2"]
    before = config_lib.from_yaml_text("data:\n  image_size: 50\n", "old run's config.yaml")
    assert before.augment == config_lib.AugmentConfig()  # runs from before: augmentation off
