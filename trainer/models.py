"""One registry of models: name -> builder, plus base-weight loading (imagenet / none / file).

Builders take uint8 pixels and scale them in their first layer (the tutorial's x/255, or
Keras' inception [-1, 1]), so training, evaluation and serving feed the same tensors and the
input pipeline never makes a float copy of an image. Keras is imported inside the builders
so that config validation can read the registry before TensorFlow starts.
"""
from __future__ import annotations

import dataclasses
import os
import socket
import ssl
import tempfile
import urllib.error
import urllib.parse
from typing import Callable

from trainer.config import ModelConfig
from trainer.errors import ConfigError

IMAGENET_NOTOP_FILE = "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5"


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    builder: Callable
    min_image_size: int
    base_weights: bool = False  # the builder loads --weights into a pretrained base


REGISTRY: dict[str, ModelSpec] = {}


def register(name: str, min_image_size: int, base_weights: bool = False) -> Callable:
    def add(builder: Callable) -> Callable:
        REGISTRY[name] = ModelSpec(builder, min_image_size, base_weights)
        return builder
    return add


def min_image_sizes() -> dict[str, int]:
    return {name: spec.min_image_size for name, spec in REGISTRY.items()}


def preprocess_mode(model: ModelConfig) -> str:
    """'auto' means Keras' inception scaling for ImageNet weights, the tutorial's otherwise."""
    if model.preprocess != "auto":
        return model.preprocess
    return "inception" if model.weights == "imagenet" else "tutorial"


def build(model: ModelConfig, image_size: int, n_classes: int):
    """Builds the configured model (call inside the strategy scope)."""
    if model.architecture not in REGISTRY:
        raise ConfigError(f"unknown model '{model.architecture}'; "
                          f"choose one of {', '.join(sorted(REGISTRY))}")
    return REGISTRY[model.architecture].builder(model, image_size, n_classes)


def _inputs_and_scaling(model: ModelConfig, image_size: int):
    """uint8 RGB pixels in, scaled floats out. The scaling computes in float32 even under a
    mixed-precision policy (the next layer casts), so its result does not depend on it."""
    from trainer.keras_api import keras
    inputs = keras.Input((image_size, image_size, 3), dtype="uint8", name="image")
    if preprocess_mode(model) == "inception":
        scaling = keras.layers.Rescaling(2 / 255, offset=-1.0, name="inception_scaling",
                                         dtype="float32")
    else:
        scaling = keras.layers.Rescaling(1 / 255, name="scaling", dtype="float32")
    return inputs, scaling(inputs)


def feed(model, pixels):
    """uint8 pixels as ``model`` takes them: unchanged for models that scale their own input,
    and as [0, 1] floats for a float input (checkpoints written before models took pixels,
    or a registered builder that does not)."""
    import tensorflow as tf
    from trainer import data
    if takes_pixels(model):
        return pixels
    return tf.cast(data.rescale(pixels), model.inputs[0].dtype)


def feed_dataset(model, ds):
    """A dataset of (uint8 images, labels) as ``model`` takes it (see ``feed``)."""
    if takes_pixels(model):
        return ds
    return ds.map(lambda images, labels: (feed(model, images), labels))


def takes_pixels(model) -> bool:
    """Whether the model's input is uint8 (it scales its own input, as built here)."""
    import tensorflow as tf
    return tf.as_dtype(model.inputs[0].dtype) == tf.uint8


def _classifier(x, n_classes: int):
    """The softmax output, in float32 even under a mixed-precision policy."""
    from trainer.keras_api import keras
    return keras.layers.Dense(n_classes, activation="softmax", dtype="float32",
                              name="probabilities")(x)


@register("vanilla", min_image_size=4)
def build_vanilla(model: ModelConfig, image_size: int, n_classes: int):
    """The tutorial's ConvNet: Conv(32, 3x3) -> MaxPool -> Dropout(0.5) -> Dense(256) -> softmax."""
    from trainer.keras_api import keras
    layers = keras.layers
    inputs, x = _inputs_and_scaling(model, image_size)
    x = layers.Conv2D(32, (3, 3), activation="relu", name="conv")(x)
    x = layers.MaxPooling2D((2, 2))(x)
    x = layers.Dropout(0.5)(x)
    x = layers.Flatten()(x)
    x = layers.Dense(256, activation="relu")(x)
    return keras.Model(inputs, _classifier(x, n_classes), name="vanilla")


@register("inception", min_image_size=75, base_weights=True)
def build_inception(model: ModelConfig, image_size: int, n_classes: int):
    """InceptionV3 base (trainable) + the tutorial's head 200-100-50 with dropout 0.5."""
    from trainer.keras_api import keras
    layers = keras.layers
    inputs, x = _inputs_and_scaling(model, image_size)
    base = keras.applications.InceptionV3(include_top=False, weights=None,
                                          input_shape=(image_size, image_size, 3))
    load_base_weights(base, model.weights)
    x = base(x)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Flatten()(x)
    for units in (200, 100, 50):
        x = layers.Dense(units, activation="relu")(x)
        x = layers.Dropout(0.5)(x)
    return keras.Model(inputs, _classifier(x, n_classes), name="inception")


def resolve_base_weights(model: ModelConfig) -> None:
    """Makes sure the base weights can be had, before the run writes anything: the ImageNet
    file in Keras' cache (downloaded now if missing), or the given weights file exists."""
    spec = REGISTRY.get(model.architecture)
    if spec is None or not spec.base_weights or model.weights == "none":
        return
    if model.weights == "imagenet":
        _imagenet_file()
        return
    from trainer import storage
    if not storage.exists(model.weights):
        raise ConfigError(f"--weights: no such weights file: {model.weights}")


def load_base_weights(base, weights: str) -> None:
    """Loads 'imagenet' (Keras' cache or download), nothing for 'none', or a file (local/gs://)."""
    if weights == "none":
        return
    if weights == "imagenet":
        weights = _imagenet_file()
    try:
        with _local_copy(weights) as local:
            base.load_weights(local)
    except (OSError, ValueError) as err:
        raise ConfigError(f"--weights: cannot load {weights} into the {base.name} base: "
                          f"{str(err).splitlines()[0][:200]}") from None


def _imagenet_file() -> str:
    """Keras' cached ImageNet weights for the InceptionV3 base, downloading them if needed."""
    from trainer.keras_api import keras
    cached = os.path.join(os.path.expanduser("~"), ".keras", "models", IMAGENET_NOTOP_FILE)
    if os.path.isfile(cached):
        return cached
    url = ("https://storage.googleapis.com/tensorflow/keras-applications/inception_v3/"
           + IMAGENET_NOTOP_FILE)
    try:
        return keras.utils.get_file(IMAGENET_NOTOP_FILE, url, cache_subdir="models")
    except Exception as err:  # any network failure: the message below says what to do
        raise ConfigError(
            f"--weights=imagenet: cannot download the ImageNet weights from "
            f"{urllib.parse.urlsplit(url).hostname}: {network_cause(err)}; this machine may be "
            f"offline. Download {IMAGENET_NOTOP_FILE} elsewhere and pass --weights=PATH (local "
            f"or gs://) or put it in ~/.keras/models/, or train from scratch with "
            f"--weights=none") from None


def network_cause(err: BaseException) -> str:
    """The failure underneath a download error, in words: 'DNS lookup failed ([Errno -2] Name
    or service not known)', 'connection refused (...)', 'HTTP 403 Forbidden', ...
    (Keras' get_file raises a bare Exception with the URLError as its context.)"""
    seen, chain = err, []
    while seen is not None and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    for error in chain:
        if isinstance(error, urllib.error.HTTPError):
            return f"HTTP {error.code} {error.reason}"
        if isinstance(error, urllib.error.URLError):
            reason = error.reason
            kinds = [(socket.gaierror, "DNS lookup failed"), (ssl.SSLError, "TLS error"),
                     (ConnectionRefusedError, "connection refused"),
                     (TimeoutError, "connection timed out"), (OSError, "connection error")]
            what = next((words for kind, words in kinds if isinstance(reason, kind)),
                        "network error")
            return f"{what} ({reason})"
    first = str(err).splitlines()[0][:200] if str(err) else ""
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


class _local_copy:
    """A local path for a weights file: itself, or a temporary copy of a gs:// object."""

    def __init__(self, path: str):
        self.path, self.tmp = path, None

    def __enter__(self) -> str:
        if "://" not in self.path:
            if not os.path.isfile(self.path):
                raise OSError(f"no such file: {self.path}")
            return self.path
        from trainer import storage
        suffix = os.path.splitext(self.path)[1] or ".h5"
        fd, self.tmp = tempfile.mkstemp(suffix=suffix)
        with os.fdopen(fd, "wb") as f:
            f.write(storage.read_bytes(self.path))
        return self.tmp

    def __exit__(self, *exc) -> None:
        if self.tmp:
            os.remove(self.tmp)
