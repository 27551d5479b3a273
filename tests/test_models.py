"""Both registered models build, take the configured weights and train one step."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from trainer import config as config_lib, models, train
from trainer.errors import ConfigError
from trainer.keras_api import keras


def _model_config(architecture, **changes):
    return dataclasses.replace(config_lib.ModelConfig(architecture=architecture), **changes)


def _train_one_step(model, size):
    config = config_lib.Config()
    train.compile_model(model, config)
    x = np.random.default_rng(0).random((4, size, size, 3), dtype=np.float32)
    y = keras.utils.to_categorical([0, 1, 2, 0], 3)
    before = [w.numpy().copy() for w in model.trainable_weights]
    logs = model.fit(x, y, batch_size=4, epochs=1, verbose=0).history
    assert np.isfinite(logs["loss"][0])
    assert any(not np.array_equal(b, w.numpy()) for b, w in zip(before, model.trainable_weights))


def test_vanilla_is_the_tutorial_convnet():
    model = models.build(_model_config("vanilla", preprocess="tutorial"), 50, 3)
    assert model.input_shape == (None, 50, 50, 3) and model.output_shape == (None, 3)
    kinds = [type(layer).__name__ for layer in model.layers[1:]]
    assert kinds == ["Conv2D", "MaxPooling2D", "Dropout", "Flatten", "Dense", "Dense"]
    conv, dense = model.get_layer("conv"), model.layers[-2]
    assert conv.filters == 32 and conv.kernel_size == (3, 3) and dense.units == 256
    assert model.count_params() == 896 + (24 * 24 * 32) * 256 + 256 + 256 * 3 + 3
    _train_one_step(model, 50)


def test_inception_head_and_one_step_at_75px():
    model = models.build(_model_config("inception", weights="none"), 75, 3)
    assert model.output_shape == (None, 3)
    units = [layer.units for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    assert units == [200, 100, 50, 3]
    dropouts = [layer.rate for layer in model.layers if isinstance(layer, keras.layers.Dropout)]
    assert dropouts == [0.5, 0.5, 0.5]
    assert model.get_layer("inception_v3").trainable
    _train_one_step(model, 75)


def test_inception_loads_a_weights_file(tmp_path):
    source = keras.applications.InceptionV3(include_top=False, weights=None, input_shape=(75, 75, 3))
    path = str(tmp_path / "base.h5")
    source.save_weights(path)
    model = models.build(_model_config("inception", weights=path), 99, 3)  # other size, same weights
    base = model.get_layer("inception_v3")
    for theirs, ours in zip(source.weights, base.weights):
        np.testing.assert_array_equal(theirs.numpy(), ours.numpy())
    _train_one_step(model, 99)


def test_bad_weights_file_is_a_clear_error(tmp_path):
    path = tmp_path / "garbage.h5"
    path.write_bytes(b"not an hdf5 file")
    with pytest.raises(ConfigError, match=f"--weights: cannot load {path}"):
        models.build(_model_config("inception", weights=str(path)), 75, 3)


@pytest.mark.parametrize("preprocess, weights, expected", [
    ("auto", "imagenet", "inception"), ("auto", "none", "tutorial"), ("auto", "/w.h5", "tutorial"),
    ("tutorial", "imagenet", "tutorial"), ("inception", "none", "inception"),
])
def test_preprocess_mode(preprocess, weights, expected):
    assert models.preprocess_mode(_model_config("inception", preprocess=preprocess,
                                                weights=weights)) == expected


def test_inception_scaling_maps_unit_range_to_minus_one_one():
    model = models.build(_model_config("vanilla", preprocess="inception"), 8, 3)
    scaling = keras.Model(model.input, model.get_layer("inception_scaling").output)
    out = scaling(np.array([[[[0.0, 0.5, 1.0]] * 8] * 8], np.float32)).numpy()
    np.testing.assert_allclose(out[0, 0, 0], [-1.0, 0.0, 1.0])


def test_imagenet_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))  # no cached weights
    monkeypatch.setattr(keras.utils, "get_file",
                        lambda *a, **k: (_ for _ in ()).throw(OSError("network unreachable")))
    with pytest.raises(ConfigError, match="cannot download the ImageNet weights .* --weights=PATH"):
        models.build(_model_config("inception", weights="imagenet"), 75, 3)


def test_registry_lists_both_models():
    assert models.min_image_sizes() == {"vanilla": 4, "inception": 75}
