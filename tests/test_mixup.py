"""--mixup: each training film blended with a partner of its batch, labels and weights in the
same shares; new blends every epoch, repeatable from the seed; validation never blended; a
whole run trains with it."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from trainer import data, distribute, mixup, models, train

N = 6  # films in the test batch, each of its own class, so a label names its film


def _batch() -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    rng = np.random.default_rng(0)
    images = tf.constant(rng.integers(0, 256, (N, 4, 4, 3)), tf.uint8)
    return images, tf.eye(N), tf.constant(np.arange(1, N + 1), tf.float32)


@pytest.mark.parametrize("share, partner", [
    ([1.0] * N, [1, 2, 3, 4, 5, 0]),  # all its own: unchanged
    ([0.0] * N, [1, 2, 3, 4, 5, 0]),  # all the partner's
    ([0.25, 0.5, 0.9, 0.1, 0.6, 0.3], [5, 4, 3, 2, 1, 0]),
    ([0.7, 0.2, 0.5, 0.5, 0.0, 1.0], [0, 1, 2, 3, 4, 5]),  # a film with itself: unchanged
])
def test_mix_blends_pixels_labels_and_weights_in_one_share(share, partner):
    images, labels, weights = _batch()
    got_images, got_labels, got_weights = mixup.mix(
        images, labels, weights, tf.constant(share), tf.constant(partner))
    own = np.array(share)
    pixels = images.numpy().astype(np.float64)
    expected = np.round(own[:, None, None, None] * pixels
                        + (1 - own[:, None, None, None]) * pixels[partner])
    assert got_images.dtype == tf.uint8
    # within one grey level: float32 arithmetic may round a half the other way
    np.testing.assert_allclose(got_images.numpy().astype(np.float64), expected, atol=1)
    expected_labels = own[:, None] * np.eye(N) + (1 - own[:, None]) * np.eye(N)[partner]
    np.testing.assert_allclose(got_labels.numpy(), expected_labels, atol=1e-6)
    np.testing.assert_allclose(got_weights.numpy(), own * np.arange(1, N + 1)
                               + (1 - own) * (np.array(partner) + 1), rtol=1e-6)


@pytest.mark.parametrize("alpha", [0.2, 1.0, 8.0])
def test_draw_gives_shares_in_the_unit_interval_and_a_permutation(alpha):
    share, partner = mixup.draw(tf.constant(500), alpha, tf.constant([3, 28], tf.int64))
    assert np.all((share.numpy() >= 0) & (share.numpy() <= 1))
    assert sorted(partner.numpy()) == list(range(500))
    # Beta(a, a) has mean 1/2 and variance 1 / (4 (2a + 1)): small a near 0 or 1, large near 1/2
    assert abs(share.numpy().mean() - 0.5) < 0.06
    np.testing.assert_allclose(share.numpy().var(), 1 / (4 * (2 * alpha + 1)), rtol=0.25)


def _epochs(alpha: float, seed: int, epochs: int = 2) -> list[list[np.ndarray]]:
    """The mixed labels of ``epochs`` passes over two batches of the test films."""
    images, labels, weights = _batch()
    batches = tf.data.Dataset.from_tensor_slices((images, labels, weights)).batch(N // 2)
    ds = mixup.mixed(batches, alpha, seed)
    return [[y.numpy() for _, y, _ in ds] for _ in range(epochs)]


def test_every_film_is_blended_with_a_film_of_its_own_batch():
    epochs = _epochs(0.4, seed=1)
    for epoch in epochs:
        for index, batch_labels in enumerate(epoch):
            films = range(index * N // 2, (index + 1) * N // 2)
            np.testing.assert_allclose(batch_labels.sum(axis=1), 1.0, rtol=1e-6)
            others = np.delete(batch_labels, list(films), axis=1)
            assert np.all(others == 0), "a partner came from another batch"
    assert any(not np.all(np.isin(b, [0.0, 1.0])) for b in epochs[0]), "no film was blended"


def test_blends_repeat_for_a_seed_and_change_every_epoch():
    first, second = _epochs(0.4, seed=7)
    again, _ = _epochs(0.4, seed=7)
    other, _ = _epochs(0.4, seed=8)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(first, second))
    assert any(not np.array_equal(a, b) for a, b in zip(first, other))


def _with_mixup(config, alpha: float, **train_overrides):
    return dataclasses.replace(config, train=dataclasses.replace(
        config.train, mixup=alpha, **train_overrides))


def test_mixup_carries_class_weights_per_image(tiny_config):
    config = _with_mixup(tiny_config, 0.2)
    splits = data.make_splits(config.data)
    classes = data.class_weights([e.label for e in splits.train], len(splits.classes))
    np.testing.assert_allclose(train.sample_weights(splits, config, classes),
                               [classes[e.label] for e in splits.train], rtol=1e-6)
    np.testing.assert_array_equal(train.sample_weights(splits, config, None),
                                  np.ones(len(splits.train)))


def test_only_training_batches_are_blended(tiny_config):
    config = _with_mixup(tiny_config, 0.4)
    splits = data.make_splits(config.data)
    model = models.build(config.model, config.data.image_size, len(splits.classes),
                         config.augment)
    strategy = distribute.make_strategy("default")
    me = distribute.Role()  # one process, no TF_CONFIG
    weights = np.ones(len(splits.train), np.float32)
    train_ds, val_ds, _ = train.fit_inputs(model, splits, config, strategy, me, weights)
    train_labels = np.concatenate([y.numpy() for _, y, _ in train_ds])
    val_labels = np.concatenate([y.numpy() for _, y in val_ds])
    assert not np.all(np.isin(train_labels, [0.0, 1.0]))
    assert np.all(np.isin(val_labels, [0.0, 1.0]))


def test_a_run_trains_with_mixup(tiny_config, caplog):
    config = _with_mixup(tiny_config, 0.4, epochs=2)
    with caplog.at_level("INFO"):
        results = train.run(config)
    assert 0 <= results["test"]["accuracy"] <= 1
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("mixup: each training image blended") for line in lines), lines
    recorded = (Path(config.output.model_dir) / "config.yaml").read_text()
    assert "mixup: 0.4" in recorded
