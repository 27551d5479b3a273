"""Film weights against the layout shortcut (--layout_weights).

Where the classes differ in how their films are laid out (in cxr3, a linear model of each
Kermany film's row and column mean profiles tells normal from viral pneumonia in 85% of later
and unseen films: bench/geometry_probe.py), a model can score well by the layout and fail
where it changes. Each training film is weighted by 1 / p, p the probability that a logistic
regression of its layout gives its own class (fitted out of fold on the training split, so a
film does not judge itself) and, where the data names sources, within the film's own
source; clipped and averaged to 1 within each class. Films whose layout points to another
class then count more, and the layout alone no longer pays: inverse propensity weighting,
with the layout as the confounder.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf
from absl import logging

from trainer.config import DataConfig
from trainer.errors import DataError

FOLDS = 5
REGULARISATION = 0.1  # LogisticRegression's C: a smooth layout model, weights that do not explode


def equalised(pixels: tf.Tensor) -> tf.Tensor:
    """uint8 [N, S, S, C] -> float32, each image histogram-equalised (trainer.intensity): the
    layout, whatever the exposure."""
    from trainer import intensity
    return intensity.normalization_layer("equalize")(tf.cast(pixels, tf.float32))


def profiles(images) -> np.ndarray:
    """[N, S, S, C] images -> [N, 2S]: each image's column means, then its row means (first
    channel): where the dark lungs and the bright mediastinum and diaphragm lie, next to
    nothing of the texture."""
    gray = np.asarray(images)[..., 0]
    return np.concatenate([gray.mean(axis=1), gray.mean(axis=2)], axis=1)


def layout_model():
    """An unfitted classifier of ``profiles``: standardised, then a logistic regression."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    return make_pipeline(StandardScaler(), LogisticRegression(C=REGULARISATION, max_iter=5000))


def own_class_probability(layout: np.ndarray, labels: np.ndarray, seed: int) -> np.ndarray:
    """Per film, the out-of-fold probability ``layout_model`` gives its own class (label)."""
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    smallest = np.bincount(labels)[np.unique(labels)].min()
    folds = StratifiedKFold(min(FOLDS, smallest), shuffle=True, random_state=seed)
    probabilities = cross_val_predict(layout_model(), layout, labels, cv=folds,
                                      method="predict_proba")
    columns = np.searchsorted(np.unique(labels), labels)  # predict_proba: present classes only
    return probabilities[np.arange(len(labels)), columns]


def inverse_propensity(own: np.ndarray, labels: np.ndarray, clip: float) -> np.ndarray:
    """min(1 / p, clip) per film, then scaled to mean 1 within each class (class balance is
    left to --class_weights)."""
    weights = np.minimum(1.0 / np.maximum(own, 1e-12), clip)
    for label in np.unique(labels):
        weights[labels == label] /= weights[labels == label].mean()
    return weights.astype(np.float32)


def _fittable(rows: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The ``rows`` (one source's) whose class has at least two images among them (one per
    fold each way), if two classes or more do; none otherwise."""
    counts = np.bincount(labels[rows])
    kept = rows[counts[labels[rows]] >= 2]
    return kept if len(np.unique(labels[kept])) >= 2 else kept[:0]


def film_weights(examples: list, data: DataConfig, clip: float) -> np.ndarray:
    """The weight of each training example (``examples``, in order), from its film's layout
    at data.image_size, judged within its own source where the data names sources (the
    layout of a source that holds one class is that source's, for --holdout_sources and
    --val_sources to test; within a source, it must not tell the class). Films of a source
    that does not hold two classes of two films or more, and of a class with one film in its
    source, weigh 1."""
    from trainer import data as data_lib
    labels = np.array([e.label for e in examples])
    found = data_lib.read_sources(data.data_dir, examples) or ["all"] * len(examples)
    groups = {name: _fittable(np.flatnonzero([s == name for s in found]), labels)
              for name in sorted(set(found))}
    groups = {name: rows for name, rows in groups.items() if len(rows)}
    if not groups:
        raise DataError("--layout_weights needs at least two training images of each of two "
                        "classes or more within one source, to fit the layout model out of "
                        "fold")
    logging.info("layout weights: reading the layout of %d training images", len(examples))
    batches = data_lib.make_dataset(examples, data, batch_size=256, training=False)
    layout = np.concatenate([profiles(equalised(images)) for images, _ in batches])
    own = np.ones(len(examples))
    for rows in groups.values():
        own[rows] = own_class_probability(layout[rows], labels[rows], data.seed)
    weights = inverse_propensity(own, labels, clip)
    logging.info("layout weights (clip %g; within %s): median %.2f, 90th percentile %.2f, "
                 "largest %.2f; effective number of images %.0f of %d", clip,
                 ", ".join(groups), np.median(weights), np.percentile(weights, 90),
                 weights.max(), weights.sum() ** 2 / (weights ** 2).sum(), len(weights))
    return weights
