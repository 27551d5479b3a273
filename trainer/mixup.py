"""Mixup: train on blends of two films, labelled in the same shares.

Zhang et al. (ICLR 2018). A model fitted on blends cannot score by one film's cue alone, and
in DomainBed (Gulrajani and Lopez-Paz, ICLR 2021) mixing films of different sources was among
the methods that held up best on a source never seen. ``--mixup=ALPHA`` blends each training
film with another film of its batch, in a share drawn from Beta(ALPHA, ALPHA) per film, and
blends its one-hot label and its weight in the same share. Only training batches are mixed.
"""
from __future__ import annotations

import tensorflow as tf


def draw(n: tf.Tensor, alpha: float, seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """For a batch of ``n`` films: each film's own share in [0, 1] (Beta(alpha, alpha)) and
    the index of its partner (a permutation of the batch); ``seed``: a stateless seed pair."""
    seeds = tf.random.experimental.stateless_split(seed, 3)
    a = tf.random.stateless_gamma([n], seeds[0], alpha)
    b = tf.random.stateless_gamma([n], seeds[1], alpha)
    partner = tf.random.experimental.stateless_shuffle(tf.range(n), seeds[2])
    return a / tf.maximum(a + b, 1e-12), partner


def mix(images: tf.Tensor, labels: tf.Tensor, weights: tf.Tensor, share: tf.Tensor,
        partner: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Each film blended with its partner's: ``share`` of its own pixels, label and weight and
    the rest of its partner's. The uint8 films every pipeline yields stay uint8 (rounded), so
    the model reads a blend as it reads any film."""
    def blend(values, shape):
        own = tf.reshape(share, shape)
        return own * values + (1.0 - own) * tf.gather(values, partner)

    pixels = blend(tf.cast(images, tf.float32), [-1, 1, 1, 1])
    pixels = tf.cast(tf.round(pixels), tf.uint8)  # a share of two 8-bit values stays in [0, 255]
    return pixels, blend(labels, [-1, 1]), blend(weights, [-1])


def mixed(batches: tf.data.Dataset, alpha: float, seed: int) -> tf.data.Dataset:
    """Training batches of (images, one-hot labels, weights) with every film blended with
    another of its batch (``mix``); new shares and partners every epoch, the same for a seed."""
    draws = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)

    def one_batch(batch, key):
        images, labels, weights = batch
        share, partner = draw(tf.shape(images)[0], alpha, tf.stack([key, tf.cast(seed, tf.int64)]))
        return mix(images, labels, weights, share, partner)

    return tf.data.Dataset.zip(batches, draws).map(one_batch,
                                                   num_parallel_calls=tf.data.AUTOTUNE)
