"""Random augmentation as Keras layers inside the model, after its uint8 input.

On the device and in the graph: the input pipeline stays as it is (cached uint8 batches, no
per-image Python), and every layer here is the identity unless called with training=True
(``fit``), so evaluation, prediction, Grad-CAM and the serving export see the images untouched.
Keras' own image layers augment when called without a training argument (``model(x)``);
the subclasses below take that to mean inference, like Dropout.
Random numbers come from ``tf.random.Generator`` state inside each layer (Keras'
``force_generator``), not from Python, so they work inside ``tf.function``, under
``tf.distribute`` (each replica draws its own stream) and under mixed precision (every layer
computes in float32 whatever the policy). The state is not a weight: models with and without
augmentation have the same weights.

The layers take and return pixel values in [0, 255]; the model's scaling layer follows them.
Order: zoom, stretch (the height alone zoomed), aspect (rows or columns cropped), shift and
rotation (each resamples once, bilinear), then brightness (Keras'), contrast and gamma (one
factor per image), blur, noise.
"""
from __future__ import annotations

import math

import tensorflow as tf

from trainer.config import AugmentConfig
from trainer.keras_api import keras

PACKAGE = "cxr"
MAX_VALUE = 255.0


class _OnlyWhenTraining:
    """Mixin for Keras' image layers: training=None (not told) means inference."""

    def call(self, inputs, training=None):
        return super().call(inputs, training=bool(training))


@keras.utils.register_keras_serializable(package=PACKAGE)
class RandomZoom(_OnlyWhenTraining, keras.layers.RandomZoom):
    """keras.layers.RandomZoom, active only when training."""


@keras.utils.register_keras_serializable(package=PACKAGE)
class RandomTranslation(_OnlyWhenTraining, keras.layers.RandomTranslation):
    """keras.layers.RandomTranslation, active only when training."""


@keras.utils.register_keras_serializable(package=PACKAGE)
class RandomRotation(_OnlyWhenTraining, keras.layers.RandomRotation):
    """keras.layers.RandomRotation, active only when training."""


@keras.utils.register_keras_serializable(package=PACKAGE)
class RandomBrightness(_OnlyWhenTraining, keras.layers.RandomBrightness):
    """keras.layers.RandomBrightness, active only when training."""


class _PerImageRandom(keras.__internal__.layers.BaseRandomLayer):
    """A float32 random layer that draws one number per image in training, identity otherwise."""

    def __init__(self, factor: float, seed: int | None = None, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(seed=seed, force_generator=True, **kwargs)
        self.factor, self.seed = float(factor), seed

    def _per_image(self, images: tf.Tensor, low: float, high: float) -> tf.Tensor:
        """[B, 1, 1, 1] uniform draws in [low, high)."""
        return self._random_generator.random_uniform(
            [tf.shape(images)[0], 1, 1, 1], minval=low, maxval=high, dtype=tf.float32)

    def call(self, inputs, training=None):
        images = tf.cast(inputs, tf.float32)
        if not training:
            return images
        return self._augment(images)

    def get_config(self):
        return {**super().get_config(), "factor": self.factor, "seed": self.seed}


@keras.utils.register_keras_serializable(package=PACKAGE)
class RandomImageContrast(_PerImageRandom):
    """(x - mean) * c + mean with c in [1 - factor, 1 + factor] drawn per image (Keras'
    RandomContrast draws one factor per batch), clipped to [0, 255]."""

    def _augment(self, images):
        c = self._per_image(images, 1.0 - self.factor, 1.0 + self.factor)
        mean = tf.reduce_mean(images, axis=[1, 2, 3], keepdims=True)
        return tf.clip_by_value((images - mean) * c + mean, 0.0, MAX_VALUE)


@keras.utils.register_keras_serializable(package=PACKAGE)
class RandomGamma(_PerImageRandom):
    """255 (x / 255) ** g with g in [1 - factor, 1 + factor] drawn per image."""

    def _augment(self, images):
        g = self._per_image(images, 1.0 - self.factor, 1.0 + self.factor)
        unit = tf.clip_by_value(images / MAX_VALUE, 0.0, 1.0)
        return MAX_VALUE * tf.pow(unit, g)


@keras.utils.register_keras_serializable(package=PACKAGE)
class RandomAspectCrop(_PerImageRandom):
    """Per image, a fraction f in [0, factor) of the rows or of the columns (one or the other,
    at random) cut off, half from each end, and the rest resized back: the aspect ratio changed
    by up to 1 / (1 - factor) either way with nothing filled in, as a film framed or squashed
    differently would look (bilinear)."""

    def _augment(self, images):
        cut = self._per_image(images, 0.0, self.factor)[:, 0, 0, 0]
        rows = self._per_image(images, 0.0, 1.0)[:, 0, 0, 0] < 0.5
        half_rows = tf.where(rows, cut / 2, 0.0)
        half_cols = tf.where(rows, 0.0, cut / 2)
        boxes = tf.stack([half_rows, half_cols, 1.0 - half_rows, 1.0 - half_cols], axis=1)
        size = tf.shape(images)[1:3]
        indices = tf.range(tf.shape(images)[0])
        cropped = tf.image.crop_and_resize(images, boxes, indices, size)
        return tf.clip_by_value(cropped, 0.0, MAX_VALUE)


@keras.utils.register_keras_serializable(package=PACKAGE)
class RandomGaussianBlur(_PerImageRandom):
    """A Gaussian blur of sigma ``factor`` pixels (separable, symmetric edges), mixed into each
    image by a weight drawn in [0, 1): from sharp to fully blurred."""

    def build(self, input_shape):
        super().build(input_shape)
        _, height, width, self._channels = input_shape
        self._radius = min(math.ceil(3 * self.factor), height - 1, width - 1)

    def _augment(self, images):
        radius, channels = self._radius, self._channels
        x = tf.range(-radius, radius + 1, dtype=tf.float32)
        kernel = tf.exp(-0.5 * (x / self.factor) ** 2)
        kernel /= tf.reduce_sum(kernel)
        rows = tf.tile(tf.reshape(kernel, [-1, 1, 1, 1]), [1, 1, channels, 1])
        cols = tf.reshape(rows, [1, -1, channels, 1])
        padded = tf.pad(images, [[0, 0], [radius, radius], [radius, radius], [0, 0]], "SYMMETRIC")
        blurred = tf.nn.depthwise_conv2d(padded, rows, [1, 1, 1, 1], "VALID")
        blurred = tf.nn.depthwise_conv2d(blurred, cols, [1, 1, 1, 1], "VALID")
        weight = self._per_image(images, 0.0, 1.0)
        return images + weight * (blurred - images)


def layers(config: AugmentConfig) -> list:
    """The augmentation layers ``config`` asks for, in order (empty when augment is off).

    Seeds are left to Keras, which draws them from the seeded Python generator
    (``keras.utils.set_random_seed(data.seed)`` before the model is built), so a run is
    repeatable from its seed."""
    if not config.augment:
        return []
    f32 = {"dtype": "float32"}
    geometry = {"fill_mode": config.fill_mode, "interpolation": "bilinear", **f32}
    chosen = []
    if config.zoom:
        chosen.append(RandomZoom((-config.zoom, config.zoom), name="augment_zoom", **geometry))
    if config.stretch:
        chosen.append(RandomZoom((-config.stretch, config.stretch), width_factor=0.0,
                                 name="augment_stretch", **geometry))
    if config.aspect:
        chosen.append(RandomAspectCrop(config.aspect, name="augment_aspect"))
    if config.translate:
        chosen.append(RandomTranslation(config.translate, config.translate,
                                           name="augment_translate", **geometry))
    if config.rotate:
        chosen.append(RandomRotation(config.rotate / 360.0, name="augment_rotate", **geometry))
    if config.brightness:
        chosen.append(RandomBrightness(config.brightness, value_range=(0, MAX_VALUE),
                                          name="augment_brightness", **f32))
    if config.contrast:
        chosen.append(RandomImageContrast(config.contrast, name="augment_contrast"))
    if config.gamma:
        chosen.append(RandomGamma(config.gamma, name="augment_gamma"))
    if config.blur:
        chosen.append(RandomGaussianBlur(config.blur, name="augment_blur"))
    if config.noise:
        chosen.append(keras.layers.GaussianNoise(config.noise * MAX_VALUE, rng_type="stateful",
                                                 name="augment_noise", **f32))
    return chosen
