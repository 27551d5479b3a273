"""One registry of models: name -> builder, plus base-weight loading (imagenet / none / file).

Builders take uint8 pixels and scale them in a float32 layer (the tutorial's x/255, Keras'
inception [-1, 1], or torch-style ImageNet mean/std), so training, evaluation and serving feed
the same tensors and the input pipeline never makes a float copy of an image. Before the
scaling, when configured: the border crop, the intensity normalisation (intensity.py) and the
training-only augmentation (augment.py), all on [0, 255] pixel values, so every consumer of
the model gets them. Keras is imported inside the builders so that config validation can read
the registry before TensorFlow starts.
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

from trainer.config import AugmentConfig, ModelConfig, border_pixels
from trainer.errors import ConfigError

KERAS_WEIGHTS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/"
IMAGENET_NOTOP_FILE = "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5"
# ImageNet statistics for torch-style preprocessing (keras.applications.densenet.preprocess_input)
TORCH_MEAN = (0.485, 0.456, 0.406)
TORCH_STD = (0.229, 0.224, 0.225)
# Batch normalisation of the layers this project trains from scratch. Keras' default, 0.99,
# makes the moving statistics lag training by about a hundred steps, and a cxr3 epoch is 8 to
# 80 steps: validation then sees other activations than training and can sit at one class until
# early stopping ends the run, keeping an untrained checkpoint.
BATCH_NORM_MOMENTUM = 0.9


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    builder: Callable
    min_image_size: int
    # What preprocess=auto means with ImageNet weights (inception's [-1, 1] unless the
    # architecture says otherwise, as before DenseNet joined).
    imagenet_preprocess: str = "inception"
    imagenet_weights: str = ""  # Keras' no-top ImageNet weights: their path under KERAS_WEIGHTS_URL


REGISTRY: dict[str, ModelSpec] = {}


def register(name: str, min_image_size: int, imagenet_preprocess: str = "inception",
             imagenet_weights: str = "") -> Callable:
    def add(builder: Callable) -> Callable:
        REGISTRY[name] = ModelSpec(builder, min_image_size, imagenet_preprocess, imagenet_weights)
        return builder
    return add


def min_image_sizes() -> dict[str, int]:
    return {name: spec.min_image_size for name, spec in REGISTRY.items()}


def preprocess_mode(model: ModelConfig) -> str:
    """'auto' means the architecture's ImageNet scaling (inception's [-1, 1], DenseNet's torch
    mean/std) with ImageNet weights, the tutorial's x/255 otherwise."""
    if model.preprocess != "auto":
        return model.preprocess
    if model.weights != "imagenet":
        return "tutorial"
    spec = REGISTRY.get(model.architecture)
    return spec.imagenet_preprocess if spec else "inception"


def build(model: ModelConfig, image_size: int, n_classes: int,
          augment: AugmentConfig | None = None):
    """Builds the configured model (call inside the strategy scope)."""
    if model.architecture not in REGISTRY:
        raise ConfigError(f"unknown model '{model.architecture}'; "
                          f"choose one of {', '.join(sorted(REGISTRY))}")
    builder = REGISTRY[model.architecture].builder
    if model.two_views:
        from trainer import two_views
        return two_views.build(builder, model, image_size, n_classes, augment or AugmentConfig())
    return builder(model, image_size, n_classes, augment or AugmentConfig())


def _scaling_layer(model: ModelConfig):
    from trainer.keras_api import keras
    mode = preprocess_mode(model)
    if mode == "inception":
        return keras.layers.Rescaling(2 / 255, offset=-1.0, name="inception_scaling",
                                      dtype="float32")
    if mode == "torch":  # (x / 255 - mean) / std per channel, as one affine map
        return keras.layers.Rescaling([1 / (255 * s) for s in TORCH_STD],
                                      offset=[-m / s for m, s in zip(TORCH_MEAN, TORCH_STD)],
                                      name="torch_scaling", dtype="float32")
    return keras.layers.Rescaling(1 / 255, name="scaling", dtype="float32")


def _inputs_and_scaling(model: ModelConfig, image_size: int, augment: AugmentConfig):
    """uint8 RGB pixels in, scaled floats out: lung-field or border crop, chest crop, intensity
    normalisation and augmentation (each only when configured; all on [0, 255] values), then
    the scaling. Every one computes in float32 even under a mixed-precision policy (the next
    layer casts), so its result does not depend on it. With none configured the graph is
    input -> scaling."""
    from trainer import augment as augment_lib, chest_crop, intensity, lung_field
    from trainer.keras_api import keras
    inputs = keras.Input((image_size, image_size, 3), dtype="uint8", name="image")
    x = inputs
    crop = border_pixels(image_size, model.border_crop)
    if crop:
        x = keras.layers.Cropping2D(crop, name="border_crop", dtype="float32")(x)
    for layer in lung_field.crop_layers(model.lung_box, image_size):
        x = layer(x)
    if model.chest_crop:
        x = chest_crop.ChestCrop(model.chest_margin, name="chest_crop")(x)
    normalization = intensity.normalization_layer(model.intensity, model.percentile_low,
                                                  model.percentile_high)
    if normalization is not None:
        x = normalization(x)
    for layer in augment_lib.layers(augment):
        x = layer(x)
    return inputs, _scaling_layer(model)(x)


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
    """A dataset of (uint8 images, labels[, weights]) as ``model`` takes it (see ``feed``)."""
    if takes_pixels(model):
        return ds
    return ds.map(lambda images, labels, *weights: (feed(model, images), labels, *weights))


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
def build_vanilla(model: ModelConfig, image_size: int, n_classes: int, augment: AugmentConfig):
    """The tutorial's ConvNet: Conv(32, 3x3) -> MaxPool -> Dropout(0.5) -> Dense(256) -> softmax."""
    from trainer.keras_api import keras
    layers = keras.layers
    inputs, x = _inputs_and_scaling(model, image_size, augment)
    x = layers.Conv2D(32, (3, 3), activation="relu", name="conv")(x)
    x = layers.MaxPooling2D((2, 2))(x)
    x = layers.Dropout(0.5)(x)
    x = layers.Flatten()(x)
    x = layers.Dense(256, activation="relu")(x)
    return keras.Model(inputs, _classifier(x, n_classes), name="vanilla")


@register("small_cnn", min_image_size=16)
def build_small_cnn(model: ModelConfig, image_size: int, n_classes: int, augment: AugmentConfig):
    """Four blocks of Conv(3x3, no bias) -> BatchNorm -> ReLU -> MaxPool (16, 32, 64, 128
    filters), global average pooling, Dropout(0.3), softmax: about 100k weights, so it trains
    on a CPU at 96-128 px. Batch normalisation at BATCH_NORM_MOMENTUM, not Keras' 0.99."""
    from trainer.keras_api import keras
    layers = keras.layers
    inputs, x = _inputs_and_scaling(model, image_size, augment)
    for i, filters in enumerate((16, 32, 64, 128)):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"conv{i + 1}")(x)
        x = layers.BatchNormalization(momentum=BATCH_NORM_MOMENTUM, name=f"bn{i + 1}")(x)
        x = layers.ReLU(name=f"relu{i + 1}")(x)
        x = layers.MaxPooling2D(2, name=f"pool{i + 1}")(x)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(0.3)(x)
    return keras.Model(inputs, _classifier(x, n_classes), name="small_cnn")


def _head(x):
    """The tutorial's transfer head: GAP -> Flatten -> Dense 200-100-50 (ReLU), Dropout 0.5 each."""
    from trainer.keras_api import keras
    layers = keras.layers
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Flatten()(x)
    for units in (200, 100, 50):
        x = layers.Dense(units, activation="relu")(x)
        x = layers.Dropout(0.5)(x)
    return x


def _transfer(application, name: str, model: ModelConfig, image_size: int, n_classes: int,
              augment: AugmentConfig):
    """A keras.applications base (trainable, weights from ``model.weights``) + the head."""
    from trainer.keras_api import keras
    inputs, x = _inputs_and_scaling(model, image_size, augment)
    side = x.shape[1]  # image_size less the border crop
    base = application(include_top=False, weights=None, input_shape=(side, side, 3))
    load_base_weights(base, model.weights, REGISTRY[name].imagenet_weights)
    if model.weights == "none":
        _batch_norm_from_scratch(base)
    x = _head(base(x))
    return keras.Model(inputs, _classifier(x, n_classes), name=name)


def _batch_norm_from_scratch(base) -> None:
    """A base trained from scratch gets BATCH_NORM_MOMENTUM in every batch normalisation (an
    InceptionV3 at 84 px on cxr3 stayed at one class for 5 epochs at 0.99 and stopped there).
    Pretrained bases keep Keras' 0.99: their statistics start right."""
    from trainer.keras_api import keras
    for layer in base.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = BATCH_NORM_MOMENTUM


@register("inception", min_image_size=75, imagenet_preprocess="inception",
          imagenet_weights=f"inception_v3/{IMAGENET_NOTOP_FILE}")
def build_inception(model: ModelConfig, image_size: int, n_classes: int, augment: AugmentConfig):
    """InceptionV3 base (trainable) + the tutorial's head 200-100-50 with dropout 0.5."""
    from trainer.keras_api import keras
    return _transfer(keras.applications.InceptionV3, "inception", model, image_size, n_classes,
                     augment)


@register("densenet121", min_image_size=32, imagenet_preprocess="torch",
          imagenet_weights="densenet/densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5")
def build_densenet121(model: ModelConfig, image_size: int, n_classes: int,
                      augment: AugmentConfig):
    """DenseNet-121 base (trainable; Chowdhury et al. used DenseNet on this task) + the same
    head as the inception model."""
    from trainer.keras_api import keras
    return _transfer(keras.applications.DenseNet121, "densenet121", model, image_size,
                     n_classes, augment)


def resolve_base_weights(model: ModelConfig) -> None:
    """Makes sure the base weights can be had, before the run writes anything: the ImageNet
    file in Keras' cache (downloaded now if missing), or the given weights file exists."""
    spec = REGISTRY.get(model.architecture)
    if spec is None or not spec.imagenet_weights or model.weights == "none":
        return
    if model.weights == "imagenet":
        _imagenet_file(spec.imagenet_weights)
        return
    from trainer import storage
    if not storage.exists(model.weights):
        raise ConfigError(f"--weights: no such weights file: {model.weights}")


def load_base_weights(base, weights: str,
                      imagenet_weights: str = f"inception_v3/{IMAGENET_NOTOP_FILE}") -> None:
    """Loads 'imagenet' (Keras' cache or download), nothing for 'none', or a file (local/gs://)."""
    if weights == "none":
        return
    if weights == "imagenet":
        weights = _imagenet_file(imagenet_weights)
    try:
        with _local_copy(weights) as local:
            base.load_weights(local)
    except (OSError, ValueError) as err:
        raise ConfigError(f"--weights: cannot load {weights} into the {base.name} base: "
                          f"{str(err).splitlines()[0][:200]}") from None


def _imagenet_file(imagenet_weights: str) -> str:
    """Keras' cached no-top ImageNet weights (``folder/file`` under KERAS_WEIGHTS_URL),
    downloading them if needed."""
    from trainer.keras_api import keras
    filename = os.path.basename(imagenet_weights)
    cached = os.path.join(os.path.expanduser("~"), ".keras", "models", filename)
    if os.path.isfile(cached):
        return cached
    url = KERAS_WEIGHTS_URL + imagenet_weights
    try:
        return keras.utils.get_file(filename, url, cache_subdir="models")
    except Exception as err:  # any network failure: the message below says what to do
        raise ConfigError(
            f"--weights=imagenet: cannot download the ImageNet weights from "
            f"{urllib.parse.urlsplit(url).hostname}: {network_cause(err)}; this machine may be "
            f"offline. Download {filename} elsewhere and pass --weights=PATH (local "
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
