"""Every registered model builds, takes the configured weights and trains one step."""
from __future__ import annotations

import dataclasses
import os
import socket
import ssl
import subprocess
import sys
import urllib.error

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
    x = np.random.default_rng(0).integers(0, 256, (4, size, size, 3), dtype=np.uint8)
    y = keras.utils.to_categorical([0, 1, 2, 0], 3)
    before = [w.numpy().copy() for w in model.trainable_weights]
    logs = model.fit(x, y, batch_size=4, epochs=1, verbose=0).history
    assert np.isfinite(logs["loss"][0])
    assert any(not np.array_equal(b, w.numpy()) for b, w in zip(before, model.trainable_weights))


def test_vanilla_is_the_tutorial_convnet():
    model = models.build(_model_config("vanilla", preprocess="tutorial"), 50, 3)
    assert model.input_shape == (None, 50, 50, 3) and model.output_shape == (None, 3)
    kinds = [type(layer).__name__ for layer in model.layers[2:]]
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


def test_densenet121_head_and_one_step_at_32px():
    model = models.build(_model_config("densenet121", weights="none"), 32, 3)
    assert model.output_shape == (None, 3)
    units = [layer.units for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    assert units == [200, 100, 50, 3]
    base = model.get_layer("densenet121")
    assert base.trainable and base.count_params() == 7_037_504  # DenseNet-121 without its top
    _train_one_step(model, 32)


def test_densenet121_loads_a_weights_file(tmp_path):
    source = models.build(_model_config("densenet121", weights="none"), 32, 3)
    path = str(tmp_path / "densenet121_notop.h5")
    source.get_layer("densenet121").save_weights(path)
    model = models.build(_model_config("densenet121", weights=path), 48, 3)  # other size
    theirs, ours = source.get_layer("densenet121").weights, model.get_layer("densenet121").weights
    assert len(theirs) == len(ours) > 0
    for a, b in zip(theirs, ours):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    fresh = models.build(_model_config("densenet121", weights="none"), 32, 3)
    assert not np.array_equal(fresh.get_layer("densenet121").weights[0].numpy(),
                              theirs[0].numpy())  # the file, not the seed, made them equal


def test_densenet121_border_crop_shrinks_the_base_input():
    model = models.build(_model_config("densenet121", weights="none", border_crop=0.1), 40, 3)
    assert model.input_shape == (None, 40, 40, 3)
    assert model.get_layer("densenet121").input_shape == (None, 32, 32, 3)


def test_small_cnn_and_one_step_at_32px():
    model = models.build(_model_config("small_cnn"), 32, 3)
    convs = [layer.filters for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert convs == [16, 32, 64, 128]
    assert model.count_params() < 120_000
    _train_one_step(model, 32)


def _first_batch_norm(model):
    """The first BatchNormalization of ``model``, inside its base if it has one, and a function
    from the model's input to that layer's input."""
    for i, layer in enumerate(model.layers):
        if isinstance(layer, keras.layers.BatchNormalization):
            return layer, keras.Model(model.input, layer.input)
        if isinstance(layer, keras.Model):  # a keras.applications base
            bn = next(inner for inner in layer.layers
                      if isinstance(inner, keras.layers.BatchNormalization))
            before_base = keras.Model(model.input, model.layers[i - 1].output)
            in_base = keras.Model(layer.input, bn.input)
            return bn, lambda x: in_base(before_base(x))
    raise AssertionError(f"{model.name} has no batch normalisation")


@pytest.mark.parametrize("architecture, size", [
    ("small_cnn", 32), ("inception", 75), ("densenet121", 32)])
def test_batch_norm_trained_from_scratch_catches_up_within_an_epoch_of_steps(architecture, size):
    """A recipe's epoch is 8 to 80 steps on cxr3: after 10 the moving mean of the first batch
    normalisation must be over half of the way to the data's, or inference (validation, early
    stopping, the kept checkpoint) sees other activations than training. At Keras' default
    momentum 0.99 it is 10% of the way, and validation sat at one class (small_cnn at 128 px,
    InceptionV3 at 84 px, both without pretrained weights)."""
    model = models.build(_model_config(architecture, weights="none"), size, 3)
    train.compile_model(model, config_lib.Config())
    x = np.full((40, size, size, 3), 200, np.uint8)
    y = keras.utils.to_categorical(np.arange(40) % 3, 3)
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    bn, to_bn = _first_batch_norm(model)
    data_mean = np.asarray(to_bn(x[:4])).mean(axis=(0, 1, 2))
    moving_mean = bn.moving_mean.numpy()
    assert np.abs(moving_mean - data_mean).sum() < 0.5 * np.abs(data_mean).sum()


def test_pretrained_base_keeps_keras_batch_norm_momentum(tmp_path):
    """Weights from a file (or ImageNet) bring statistics that start right: only a base trained
    from scratch gets models.BATCH_NORM_MOMENTUM, and a saved checkpoint keeps it."""
    path = str(tmp_path / "base.h5")
    keras.applications.InceptionV3(include_top=False, weights=None,
                                   input_shape=(75, 75, 3)).save_weights(path)

    def momenta(model):
        return {layer.momentum for layer in model.get_layer("inception_v3").layers
                if isinstance(layer, keras.layers.BatchNormalization)}

    assert momenta(models.build(_model_config("inception", weights=path), 75, 3)) == {0.99}
    scratch = models.build(_model_config("inception", weights="none"), 75, 3)
    assert momenta(scratch) == {models.BATCH_NORM_MOMENTUM}
    scratch.save(tmp_path / "scratch.keras")
    assert momenta(keras.models.load_model(tmp_path / "scratch.keras", compile=False)) == \
        {models.BATCH_NORM_MOMENTUM}


@pytest.mark.parametrize("architecture", ["inception", "densenet121"])
def test_bad_weights_file_is_a_clear_error(tmp_path, architecture):
    path = tmp_path / "garbage.h5"
    path.write_bytes(b"not an hdf5 file")
    with pytest.raises(ConfigError, match=f"--weights: cannot load {path}"):
        models.build(_model_config(architecture, weights=str(path)), 75, 3)


@pytest.mark.parametrize("architecture, preprocess, weights, expected", [
    ("inception", "auto", "imagenet", "inception"), ("inception", "auto", "none", "tutorial"),
    ("inception", "auto", "/w.h5", "tutorial"), ("inception", "tutorial", "imagenet", "tutorial"),
    ("inception", "inception", "none", "inception"), ("inception", "torch", "none", "torch"),
    ("densenet121", "auto", "imagenet", "torch"), ("densenet121", "auto", "none", "tutorial"),
    ("densenet121", "auto", "/w.h5", "tutorial"), ("densenet121", "inception", "imagenet",
                                                   "inception"),
    ("vanilla", "auto", "imagenet", "inception"),  # as before DenseNet joined
])
def test_preprocess_mode(architecture, preprocess, weights, expected):
    assert models.preprocess_mode(_model_config(architecture, preprocess=preprocess,
                                                weights=weights)) == expected


SCALINGS = [  # preprocess, the scaling layer, what pixels 0, 51, 255 become (R, G, B)
    ("tutorial", "scaling", [0.0, 0.2, 1.0]),
    ("inception", "inception_scaling", [-1.0, -0.6, 1.0]),
    ("torch", "torch_scaling", [-0.485 / 0.229, (0.2 - 0.456) / 0.224, (1 - 0.406) / 0.225]),
]


def test_torch_scaling_is_keras_densenet_preprocessing():
    pixels = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    model = models.build(_model_config("vanilla", preprocess="torch"), 8, 3)
    scaled = keras.Model(model.input, model.get_layer("torch_scaling").output)(pixels).numpy()
    expected = keras.applications.densenet.preprocess_input(pixels.astype(np.float32))
    np.testing.assert_allclose(scaled, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preprocess, layer, expected", SCALINGS)
@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_models_take_uint8_pixels_and_scale_them_in_float32(preprocess, layer, expected, policy):
    keras.mixed_precision.set_global_policy(policy)
    try:
        model = models.build(_model_config("vanilla", preprocess=preprocess), 8, 3)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert model.input.dtype == "uint8"
    scaling = keras.Model(model.input, model.get_layer(layer).output)
    out = scaling(np.array([[[[0, 51, 255]] * 8] * 8], np.uint8))
    assert out.dtype == "float32"
    np.testing.assert_allclose(out.numpy()[0, 0, 0], expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("architecture, filename", [
    ("inception", "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    ("densenet121", "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5")])
def test_imagenet_offline_is_a_clear_error(monkeypatch, tmp_path, architecture, filename):
    asked = []
    monkeypatch.setenv("HOME", str(tmp_path))  # no cached weights

    def offline(name, url, **kwargs):
        asked.append((name, url))
        raise OSError("network unreachable")

    monkeypatch.setattr(keras.utils, "get_file", offline)
    with pytest.raises(ConfigError, match=f"cannot download the ImageNet weights .* Download "
                                          f"{filename} elsewhere and pass --weights=PATH"):
        models.build(_model_config(architecture, weights="imagenet"), 75, 3)
    folder = {"inception": "inception_v3", "densenet121": "densenet"}[architecture]
    assert asked == [(filename, f"{models.KERAS_WEIGHTS_URL}{folder}/{filename}")]


def _raised_from(context: BaseException) -> Exception:
    """An exception raised while handling ``context``, as Keras' get_file raises its own."""
    try:
        try:
            raise context
        except BaseException:
            raise Exception("URL fetch failure on https://storage.googleapis.com/x.h5")
    except Exception as err:
        return err


@pytest.mark.parametrize("error, cause", [
    (_raised_from(urllib.error.URLError(socket.gaierror(-2, "Name or service not known"))),
     "DNS lookup failed ([Errno -2] Name or service not known)"),
    (_raised_from(urllib.error.URLError(ConnectionRefusedError(111, "Connection refused"))),
     "connection refused ([Errno 111] Connection refused)"),
    (_raised_from(urllib.error.URLError(TimeoutError("timed out"))),
     "connection timed out (timed out)"),
    (_raised_from(urllib.error.URLError(ssl.SSLError(1, "CERTIFICATE_VERIFY_FAILED"))),
     "TLS error (CERTIFICATE_VERIFY_FAILED)"),
    (_raised_from(urllib.error.HTTPError("https://x", 403, "Forbidden", {}, None)),
     "HTTP 403 Forbidden"),
    (OSError("network unreachable"), "OSError: network unreachable"),
])
def test_network_cause_names_the_real_failure(error, cause):
    assert models.network_cause(error) == cause


@pytest.mark.parametrize("architecture, weights, error", [
    ("vanilla", "imagenet", None),      # no pretrained base: nothing to fetch
    ("inception", "none", None),
    ("inception", "/no/such/base.h5", "--weights: no such weights file: /no/such/base.h5"),
    ("densenet121", "none", None),
    ("densenet121", "/no/such/base.h5", "--weights: no such weights file: /no/such/base.h5"),
])
def test_base_weights_are_resolved_before_the_run(architecture, weights, error):
    config = _model_config(architecture, weights=weights)
    if error is None:
        models.resolve_base_weights(config)
    else:
        with pytest.raises(ConfigError, match=error):
            models.resolve_base_weights(config)


def test_imagenet_offline_fails_before_anything_is_written(demo_tree, tmp_path):
    """A failed download names its cause and leaves no run directory, so the retry with
    --weights=none and the same --model_dir starts cleanly. The download goes to a proxy on
    loopback that refuses connections: no network is used."""
    refusing = socket.socket()
    refusing.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
    proxy = f"http://127.0.0.1:{refusing.getsockname()[1]}"
    home = tmp_path / "home"  # no cached ImageNet weights
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "https_proxy")}
    env.update(HOME=str(home), https_proxy=proxy, HTTPS_PROXY=proxy)
    run = tmp_path / "run"
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "trainer.task", "--model=inception", f"--data_dir={demo_tree}",
             f"--model_dir={run}", "--image_size=75", "--epochs=1"],
            env=env, capture_output=True, text=True, timeout=300)
    finally:
        refusing.close()
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr
    assert "cannot download the ImageNet weights from storage.googleapis.com: connection " \
        "refused" in errors[0] and "--weights=none" in errors[0]
    assert not run.exists()
    assert "checking" not in proc.stderr  # failed before the data check


def test_registry_lists_every_model():
    assert models.min_image_sizes() == {"vanilla": 4, "small_cnn": 16, "inception": 75,
                                        "densenet121": 32}


def _float_input_vanilla(size: int):
    """The vanilla model as built before models took uint8 pixels: float [0, 1] input, no
    scaling layer (checkpoints and backups of older runs hold this graph)."""
    layers = keras.layers
    inputs = keras.Input((size, size, 3), name="image")
    x = layers.Conv2D(32, (3, 3), activation="relu", name="conv")(inputs)
    x = layers.Flatten()(layers.Dropout(0.5)(layers.MaxPooling2D((2, 2))(x)))
    x = layers.Dense(256, activation="relu")(x)
    return keras.Model(inputs, layers.Dense(3, activation="softmax", name="probabilities")(x))


PIXELS = np.array([[[[0, 51, 255]] * 4] * 4], np.uint8)
FEEDS = [  # model input dtype -> what models.feed hands it for PIXELS
    ("uint8", PIXELS),
    ("float32", PIXELS / np.float32(255)),
    ("float16", (PIXELS / np.float32(255)).astype(np.float16)),
]


@pytest.mark.parametrize("dtype, expected", FEEDS)
def test_feed_gives_each_model_the_input_it_was_built_for(dtype, expected):
    import tensorflow as tf
    model = keras.Sequential([keras.Input((4, 4, 3), dtype=dtype), keras.layers.Flatten()])
    fed = models.feed(model, PIXELS)
    assert tf.as_dtype(fed.dtype).name == dtype
    np.testing.assert_array_equal(np.asarray(fed), expected)
    ds = models.feed_dataset(model, tf.data.Dataset.from_tensors((PIXELS, [1.0])))
    np.testing.assert_array_equal(next(iter(ds))[0].numpy(), expected)
    weighted = models.feed_dataset(model, tf.data.Dataset.from_tensors((PIXELS, [1.0], 0.5)))
    images, _, weight = next(iter(weighted))  # sample weights (--layout_weights) pass through
    np.testing.assert_array_equal(images.numpy(), expected)
    assert float(weight) == 0.5


def test_backup_of_a_float_input_model_resumes_into_the_pixel_model(tmp_path):
    """An interrupted run backed up before models took pixels resumes with every weight and
    the optimizer state: the checkpoint matches layers with weights in order, and the new
    weightless scaling layer takes none of them."""
    x = np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    y = keras.utils.to_categorical(np.arange(8) % 3, 3)
    old = _float_input_vanilla(16)
    train.compile_model(old, config_lib.Config())
    backup = keras.callbacks.BackupAndRestore(str(tmp_path), delete_checkpoint=False)
    old.fit(x / np.float32(255), y, epochs=1, verbose=0, callbacks=[backup])
    new = models.build(_model_config("vanilla", preprocess="tutorial"), 16, 3)
    train.compile_model(new, config_lib.Config())
    new.fit(x, y, epochs=1, verbose=0, callbacks=[keras.callbacks.BackupAndRestore(str(tmp_path))])
    assert len(new.weights) == len(old.weights)
    for before, after in zip(old.weights, new.weights):
        np.testing.assert_array_equal(before.numpy(), after.numpy())
    assert int(new.optimizer.iterations) == int(old.optimizer.iterations) == 1
    np.testing.assert_allclose(new.predict(x, verbose=0),
                               old.predict(x / np.float32(255), verbose=0), rtol=1e-5, atol=1e-6)
