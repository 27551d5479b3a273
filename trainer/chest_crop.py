"""Chest crop: each image cut to its own lung field, found in its pixels, and resized back.

cxr3's classes differ in framing (how much of the film the chest fills), and a model learns
that in place of the lungs (docs/generalisation.md). Cropping every film to its lungs frames
them alike. Without masks the lungs are found from the pixels alone: the film's black
surround (pixels below ``BLACK`` joined to the edge) is set aside; the darkest
``DARK_PERCENTILE`` % of the rest, opened, is the dark field; the parts of it that reach the
edge or the surround near the top (the thin tissue over the shoulders) are dropped; the box
holds the rest but ``TRIM`` of it on each side, made even about the film's middle. An image
where this finds too little keeps its whole frame (so does a film cropped through the lung
tops: it is already framed to the chest). The box is widened by a margin, cut out and
resized back, inside the model, so training, evaluation, prediction and serving crop alike.
Not a segmentation: a box that moves with the chest.
"""
from __future__ import annotations

import tensorflow as tf

from trainer import intensity
from trainer.keras_api import keras

BLACK = 40.0  # grey level below which pixels joined to the edge are the film's surround
DARK_PERCENTILE = 40.0  # the darkest share of the film off its surround taken for lung
SHOULDERS = 0.3  # the top share of the image where dark tissue reaching the edge is not lung
TRIM = 0.02  # share of the lung mask left outside the box on each side (stray pixels)
MIN_AREA = 0.02  # a lung mask smaller than this share of the image is not trusted
MIN_SIDE = 0.25  # nor is a box shorter or narrower than this share of the image


def _dilate(mask: tf.Tensor, size: int) -> tf.Tensor:
    return tf.nn.max_pool2d(mask, size, 1, "SAME")


def _erode(mask: tf.Tensor, size: int) -> tf.Tensor:
    return -tf.nn.max_pool2d(-mask, size, 1, "SAME")


def _edge(shape) -> tf.Tensor:
    """float [1, H, W, 1]: 1 on the image's outermost rows and columns."""
    height, width = shape[0], shape[1]
    inner = tf.ones([height - 2, width - 2, 1])
    return tf.pad(1 - inner, [[1, 1], [1, 1], [0, 0]], constant_values=1.0)[None]


def _fill(seeds: tf.Tensor, within: tf.Tensor) -> tf.Tensor:
    """float [B, H, W, 1] 0/1: the pixels of ``within`` joined to ``seeds`` through ``within``
    (a flood fill by 3x3 max-pools, to convergence)."""
    def spread(_, region):
        grown = _dilate(region, 3) * within
        return tf.reduce_any(grown != region), grown

    _, filled = tf.while_loop(lambda changed, _: changed, spread,
                              (tf.constant(True), seeds * within),
                              maximum_iterations=within.shape[1] * within.shape[2])
    return filled


def surround(gray: tf.Tensor, grow: int) -> tf.Tensor:
    """float [B, H, W, 1] 0/1: pixels below BLACK joined to the edge through such pixels (the
    film's black surround), grown by ``grow`` px past its soft rim."""
    black = tf.cast(gray < BLACK, tf.float32)
    return _dilate(_fill(_edge(gray.shape[1:]), black), grow)


def dark_field(gray: tf.Tensor, outside: tf.Tensor, grow: int) -> tf.Tensor:
    """float [B, H, W, 1] 0/1: the darkest DARK_PERCENTILE % of the film off its surround
    (``outside``), after a 3x3 mean, opened by ``grow`` px (thin rims and specks go)."""
    body = 1 - outside
    cdf = intensity.level_cdf(gray, where=body)
    dark_level = intensity.percentile_level(cdf, DARK_PERCENTILE)[:, :, None, None]
    dark = tf.cast(tf.nn.avg_pool2d(gray, 3, 1, "SAME") < dark_level, tf.float32) * body
    return _dilate(_erode(dark, grow), grow)


def lung_mask(gray: tf.Tensor) -> tf.Tensor:
    """float [B, H, W, 1] 0/1: the film's dark field less the parts whose core reaches the
    edge or the surround in the top SHOULDERS of the image: the thin tissue over the
    shoulders and neck is as dark as lung, but lungs lie inside the chest. Cores (the field
    eroded by a tenth of the image) part where the two touch through a thin band."""
    size = gray.shape[1]
    grow, cut = max(3, round(size / 25) | 1), max(3, round(size / 10) | 1)  # 3, 5 px at 50
    outside = surround(gray, grow)
    dark = dark_field(gray, outside, grow)
    upper = tf.cast(tf.range(size) < int(size * SHOULDERS), tf.float32)[None, :, None, None]
    reach = _dilate(tf.maximum(_edge(gray.shape[1:]), outside), cut) * upper
    core = _erode(dark, cut)
    return _dilate(core - _fill(reach, core), cut) * dark


def _span(profile: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """[B, N] mass per row (or column) -> the first and past-the-last index, as fractions of N,
    that leave TRIM of the mass outside on each side."""
    share = tf.cumsum(profile, axis=1) / tf.maximum(tf.reduce_sum(profile, 1, keepdims=True), 1e-6)
    n = tf.cast(tf.shape(profile)[1], tf.float32)
    first = tf.reduce_sum(tf.cast(share < TRIM, tf.float32), axis=1)
    last = tf.reduce_sum(tf.cast(share < 1 - TRIM, tf.float32), axis=1)
    return first / n, (last + 1) / n


def lung_boxes(images: tf.Tensor) -> tf.Tensor:
    """float [B, H, W, C] pixels in [0, 255] -> [B, 4] (top, left, bottom, right) fractions of
    the image (bottom and right exclusive): the rows of each image's lung mask, and its columns
    made even about the image's middle; the whole image where too little was found."""
    gray = tf.reduce_mean(tf.cast(images, tf.float32), axis=-1, keepdims=True)
    mask = lung_mask(gray)
    top, bottom = _span(tf.reduce_sum(mask, axis=[2, 3]))
    left, right = _span(tf.reduce_sum(mask, axis=[1, 3]))
    # Even about the film's middle: a lung lost to an opacity comes back as its twin's mirror.
    left, right = tf.minimum(left, 1 - right), tf.maximum(right, 1 - left)
    found = ((tf.reduce_mean(mask, axis=[1, 2, 3]) >= MIN_AREA)
             & (bottom - top >= MIN_SIDE) & (right - left >= MIN_SIDE))
    boxes = tf.stack([top, left, bottom, right], axis=1)
    whole = tf.constant([[0.0, 0.0, 1.0, 1.0]])
    return tf.where(found[:, None], boxes, whole)


def widen(boxes: tf.Tensor, margin: float) -> tf.Tensor:
    """[B, 4] boxes grown by ``margin`` of their height and width on each side, kept inside the
    image."""
    top, left, bottom, right = tf.unstack(boxes, axis=1)
    grow_y, grow_x = margin * (bottom - top), margin * (right - left)
    grown = tf.stack([top - grow_y, left - grow_x, bottom + grow_y, right + grow_x], axis=1)
    return tf.clip_by_value(grown, 0.0, 1.0)


def crop(images: tf.Tensor, boxes: tf.Tensor) -> tf.Tensor:
    """Each image's box cut out and resized (bilinear) to the image's own size. Box sides are
    pixel edges; CropAndResize counts pixel centres, hence the half-pixel shift."""
    height, width = images.shape[1], images.shape[2]
    top, left, bottom, right = tf.unstack(boxes, axis=1)
    centres = tf.stack([(top * height - 0.5) / (height - 1), (left * width - 0.5) / (width - 1),
                        (bottom * height - 0.5) / (height - 1),
                        (right * width - 0.5) / (width - 1)], axis=1)
    centres = tf.clip_by_value(centres, 0.0, 1.0)
    index = tf.range(tf.shape(images)[0])
    return tf.image.crop_and_resize(images, centres, index, (height, width))


def uncrop(maps: tf.Tensor, boxes: tf.Tensor, size) -> tf.Tensor:
    """[N, h, w] maps of each image's cropped box -> [N, H, W] (``size``) maps of the whole
    image: each resized onto its box (bilinear), zero outside it. The inverse of ``crop``,
    for heatmaps computed on what the network saw."""
    top, left, bottom, right = tf.unstack(boxes, axis=1)
    height, width = tf.maximum(bottom - top, 1e-6), tf.maximum(right - left, 1e-6)
    inverse = tf.stack([-top / height, -left / width, (1 - top) / height, (1 - left) / width],
                       axis=1)
    index = tf.range(tf.shape(maps)[0])
    return tf.image.crop_and_resize(maps[..., None], inverse, index, size)[..., 0]


@keras.utils.register_keras_serializable(package=intensity.PACKAGE)
class ChestCrop(keras.layers.Layer):
    """Crops each image to its own lung field (``lung_boxes``, widened by ``margin``) and
    resizes it back: pixel values in [0, 255] in, float32 in [0, 255] out, same size."""

    def __init__(self, margin: float = 0.05, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.margin = float(margin)

    def build(self, input_shape):
        self.size = tuple(input_shape[1:3])  # the model's input is square and of known size
        super().build(input_shape)

    def call(self, inputs):
        # Keras may call with a batch of unknown shape (fit on a dataset); the sizes are needed
        # as numbers (pool sizes, the edge, the output).
        images = tf.ensure_shape(tf.cast(inputs, tf.float32), [None, *self.size, None])
        return crop(images, self.boxes(images))

    def boxes(self, images) -> tf.Tensor:
        """[B, 4] the boxes this layer cuts from ``images`` (its input), margin included."""
        return widen(tf.stop_gradient(lung_boxes(tf.cast(images, tf.float32))), self.margin)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "margin": self.margin}
