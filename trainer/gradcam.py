"""Grad-CAM heatmaps: where a model looks for its decision.

The heatmap is the ReLU of the last convolution's feature maps weighted by the class score's
gradient, upsampled to the input's size. The class score is the logit before the softmax, so a
confident prediction still has gradients.

By default the weights are element-wise (HiResCAM, Draelos & Carin 2020): gradient times
activation at each position, summed over channels. For a global-pooling head (InceptionV3)
this equals Grad-CAM (Selvaraju et al. 2017) up to a constant, because the gradient is the same
at every position; for the vanilla ConvNet's Flatten -> Dense head, Grad-CAM's spatially averaged
gradients cancel out (the head weighs every position differently) while HiResCAM stays
faithful. ``method="gradcam"`` gives the original averaging.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from trainer.keras_api import keras


def _output(layer):
    """The layer's output in its model's graph (a nested model's own node is its only one)."""
    return layer.get_output_at(len(layer.inbound_nodes) - 1)


def last_conv_layer(model):
    """The last top-level layer with a 4-D output that is a convolution or a nested model (a
    convolutional base such as InceptionV3)."""
    for layer in reversed(model.layers):
        is_conv = isinstance(layer, keras.Model) or "Conv" in type(layer).__name__
        if is_conv and len(_output(layer).shape) == 4:
            return layer
    raise ValueError(f"model {model.name} has no convolution layer for Grad-CAM")


def _grad_model(model, layer):
    """input -> (feature maps, logits input); the last layer if it is a softmax Dense."""
    final = model.layers[-1]
    softmax_dense = isinstance(final, keras.layers.Dense) and \
        getattr(final.activation, "__name__", "") == "softmax"
    head = final.input if softmax_dense else model.output
    return keras.Model(model.inputs, [_output(layer), head]), (final if softmax_dense else None)


METHODS = ("hirescam", "gradcam")


def input_window(model) -> tuple[tuple[int, int], tuple[int, int]]:
    """Pixels the model cuts off its input before the network ((top, bottom), (left, right)):
    its border or lung-field crop, so that a heatmap lands on the part of the image it
    explains."""
    crops = [layer.cropping for layer in model.layers
             if isinstance(layer, keras.layers.Cropping2D)]
    return crops[0] if crops else ((0, 0), (0, 0))


def _chest_boxes(model, images) -> tf.Tensor | None:
    """Each image's box cut by the model's chest crop (fractions of the crop's input), or
    None for a model without one."""
    from trainer.chest_crop import ChestCrop
    layers = [layer for layer in model.layers if isinstance(layer, ChestCrop)]
    if not layers:
        return None
    before = keras.Model(model.inputs, layers[0].input)
    return layers[0].boxes(before(images, training=False))


def _onto_input(cam: tf.Tensor, size: tf.Tensor, window, boxes=None) -> tf.Tensor:
    """[N, h, w] maps resized onto the window of [N, H, W] inputs (onto each image's chest
    box within it, given ``boxes``), zero outside it."""
    from trainer import chest_crop
    (top, bottom), (left, right) = window
    inner = size - [top + bottom, left + right]
    if boxes is None:
        inside = tf.image.resize(cam[..., None], inner, method="bilinear")[..., 0]
    else:
        inside = chest_crop.uncrop(cam, boxes, inner)
    return tf.pad(inside, [[0, 0], [top, bottom], [left, right]])


def heatmaps(model, images: np.ndarray, class_indices=None, layer=None,
             method: str = "hirescam") -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM maps in [0, 1] of shape [N, H, W] (the input's size; zero where the model
    crops the input away, and placed on each image's own box under a chest crop), and the
    probabilities.

    ``class_indices`` chooses the explained class per image (default: the predicted one). A
    two-view model's map is the mean of its towers' maps for the class the pair predicts.
    """
    from trainer import two_views
    pair = two_views.towers(model)
    if pair is not None:
        probs = model(tf.convert_to_tensor(images), training=False).numpy()
        chosen = probs.argmax(axis=1) if class_indices is None else class_indices
        cams = [heatmaps(tower, images, chosen, method=method)[0] for tower in pair]
        return _scaled_to_peak(tf.constant(np.mean(cams, axis=0))).numpy(), probs
    layer = layer or last_conv_layer(model)
    grad_model, dense = _grad_model(model, layer)
    x = tf.convert_to_tensor(images)
    with tf.GradientTape() as tape:
        features, head = grad_model(x, training=False)
        features = tf.cast(features, tf.float32)
        tape.watch(features)
        head = tf.cast(head, tf.float32)
        logits = tf.matmul(head, tf.cast(dense.kernel, tf.float32)) + \
            tf.cast(dense.bias, tf.float32) if dense is not None else head
        probs = tf.nn.softmax(logits) if dense is not None else head
        chosen = tf.argmax(probs, axis=1, output_type=tf.int32) if class_indices is None else \
            tf.convert_to_tensor(class_indices, tf.int32)
        score = tf.gather(logits, chosen, batch_dims=1)
    grads = tape.gradient(score, features)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    weights = grads if method == "hirescam" else tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(weights * features, axis=-1))
    cam = _onto_input(cam, tf.shape(x)[1:3], input_window(model), _chest_boxes(model, x))
    return _scaled_to_peak(cam).numpy(), probs.numpy()


def _scaled_to_peak(cam: tf.Tensor) -> tf.Tensor:
    """[N, H, W] maps divided by each one's peak, so each spans [0, 1] (an empty map stays 0)."""
    return tf.math.divide_no_nan(cam, tf.reduce_max(cam, axis=(1, 2), keepdims=True))
