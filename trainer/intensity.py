"""Per-image intensity normalisation as Keras layers inside the model.

Scanners, exposure and each hospital's processing give the same anatomy different grey levels;
a model can learn those instead of the disease. Normalising every image on its own, inside the
model, means training, ``trainer.evaluate``, ``trainer.predict`` and the serving export run
the same code on the same pixels, and a .keras checkpoint carries it (the layers are
registered, so ``keras.models.load_model`` needs no custom_objects once this module is
imported; ``trainer.checkpoints`` imports it).

Both layers read pixel values in [0, 255] (the model's uint8 input, any dtype) and return
float32 in [0, 255], so the model's scaling layer after them is unchanged. They work on the
image's luminance (the mean of its channels: the grey value of an X-ray stored as RGB) over
256 levels, and map every channel through the same curve.
"""
from __future__ import annotations

import tensorflow as tf

from trainer.keras_api import keras

LEVELS = 256
PACKAGE = "cxr"


def _levels(images: tf.Tensor) -> tf.Tensor:
    """float [B, H, W, C] in [0, 255] -> int32 [B, H*W]: each pixel's luminance level."""
    gray = tf.reduce_mean(images, axis=-1)
    levels = tf.cast(tf.clip_by_value(tf.floor(gray + 0.5), 0, LEVELS - 1), tf.int32)
    return tf.reshape(levels, [tf.shape(images)[0], -1])


def _cdf(levels: tf.Tensor, weights: tf.Tensor | None = None) -> tf.Tensor:
    """int32 [B, N] levels -> float32 [B, 256]: how many pixels of each image (or how much of
    their ``weights`` [B, N]) are <= each level. One segment sum over the batch (no per-image
    loop; runs on CPU, GPU and under XLA)."""
    batch = tf.shape(levels)[0]
    rows = tf.range(batch)[:, None] * LEVELS
    counts = tf.math.unsorted_segment_sum(
        tf.ones_like(levels, tf.float32) if weights is None else weights, levels + rows,
        batch * LEVELS)
    return tf.cumsum(tf.reshape(counts, [batch, LEVELS]), axis=1)


def level_cdf(images: tf.Tensor, where: tf.Tensor | None = None) -> tf.Tensor:
    """float [B, H, W, C] in [0, 255] -> float32 [B, 256]: each image's luminance cdf, over
    the pixels where ``where`` [B, H, W, 1] is 1 if given."""
    weights = None if where is None else tf.reshape(where, [tf.shape(images)[0], -1])
    return _cdf(_levels(images), weights)


def percentile_level(cdf: tf.Tensor, percentile: float) -> tf.Tensor:
    """[B, 1]: the smallest level whose cdf reaches percentile% of the pixels (at least one;
    counts are whole, so the share is rounded up, past float32's error in n x share)."""
    n = cdf[:, -1:]
    share = tf.maximum(tf.math.ceil(n * (percentile / 100.0) - 1e-3), 1.0)
    below = tf.reduce_sum(tf.cast(cdf < share, tf.float32), axis=1, keepdims=True)
    return tf.minimum(below, LEVELS - 1.0)


def _apply_curve(images: tf.Tensor, curve: tf.Tensor) -> tf.Tensor:
    """Maps every channel of each image through its curve [B, 256], with linear interpolation
    between levels (channels that are not integers, or differ from the luminance, stay smooth)."""
    x = tf.clip_by_value(images, 0.0, LEVELS - 1.0)
    low = tf.floor(x)
    frac = x - low
    shape = tf.shape(x)
    flat = tf.reshape(tf.cast(low, tf.int32), [shape[0], -1])
    below = tf.gather(curve, flat, batch_dims=1)
    above = tf.gather(curve, tf.minimum(flat + 1, LEVELS - 1), batch_dims=1)
    frac = tf.reshape(frac, [shape[0], -1])
    out = tf.reshape(below + frac * (above - below), shape)
    out.set_shape(images.shape)  # the reshape to a dynamic shape forgot the static one
    return out


@keras.utils.register_keras_serializable(package=PACKAGE)
class HistogramEqualization(keras.layers.Layer):
    """Histogram equalisation of each image over 256 levels: level v becomes
    255 (cdf(v) - cdf_min) / (n - cdf_min), cdf_min the count of the darkest level present."""

    def __init__(self, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)

    def call(self, inputs):
        images = tf.cast(inputs, tf.float32)
        cdf = level_cdf(images)
        n = cdf[:, -1:]
        cdf_min = tf.reduce_min(tf.where(cdf > 0, cdf, n), axis=1, keepdims=True)
        curve = tf.maximum(cdf - cdf_min, 0.0) / tf.maximum(n - cdf_min, 1.0) * (LEVELS - 1)
        return _apply_curve(images, curve)


@keras.utils.register_keras_serializable(package=PACKAGE)
class PercentileNormalization(keras.layers.Layer):
    """Clips each image to its ``low``..``high`` percentile of luminance and stretches that to
    [0, 255] (percentiles as numpy's ``inverted_cdf``: the smallest level reaching the share)."""

    def __init__(self, low: float = 1.0, high: float = 99.0, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.low, self.high = float(low), float(high)

    def call(self, inputs):
        images = tf.cast(inputs, tf.float32)
        cdf = level_cdf(images)
        lo = percentile_level(cdf, self.low)
        hi = percentile_level(cdf, self.high)
        scale = (LEVELS - 1) / tf.maximum(hi - lo, 1.0)
        return tf.clip_by_value((images - lo[:, :, None, None]) * scale[:, :, None, None],
                                0.0, LEVELS - 1.0)

    def get_config(self):
        return {**super().get_config(), "low": self.low, "high": self.high}


def normalization_layer(mode: str, low: float = 1.0, high: float = 99.0):
    """The layer for ``model.intensity`` (None for 'none')."""
    if mode == "none":
        return None
    if mode == "equalize":
        return HistogramEqualization(name="equalize")
    if mode == "percentile":
        return PercentileNormalization(low, high, name="percentile_normalization")
    raise ValueError(f"unknown intensity normalisation {mode!r}")
