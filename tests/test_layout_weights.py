"""--layout_weights: films whose layout points to another class count more, the weights reach
the training batches (from folders and from prepared shards) beside the class weights, and a
whole run trains with them."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from conftest import layout_film
from trainer import config as config_lib, data, layout_weights, prepare, train
from trainer.errors import DataError

CLASSES = ["A", "B"]


@pytest.mark.parametrize("own, labels, clip, expected", [
    ([0.5, 0.5], [0, 0], 10, [1.0, 1.0]),
    ([0.9, 0.1], [0, 0], 10, [0.2, 1.8]),  # 1/0.9 and 1/0.1, over their mean
    ([0.5, 0.01], [0, 0], 5, [2 / 3.5, 5 / 3.5]),  # 1/0.01 clipped at 5
    ([0.5, 0.25, 0.5, 0.5], [0, 0, 1, 1], 10, [2 / 3, 4 / 3, 1.0, 1.0]),  # per class
    ([1.0, 1.0, 0.2], [1, 1, 1], 1, [1.0, 1.0, 1.0]),  # clip 1: every weight equal
])
def test_inverse_propensity(own, labels, clip, expected):
    got = layout_weights.inverse_propensity(np.array(own), np.array(labels), clip)
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_profiles_are_column_then_row_means():
    image = np.zeros((1, 4, 4, 3), np.float32)
    image[0, 0, :, :] = 8.0  # the first row bright
    np.testing.assert_allclose(layout_weights.profiles(image)[0], [2, 2, 2, 2, 8, 0, 0, 0])


def _tree(root: Path, typical: int = 16, swapped: int = 2) -> Path:
    """Class A films have their dark band high and class B low, except ``swapped`` films of
    each class ('swapped-' in the name), laid out like the other class."""
    rng = np.random.default_rng(0)
    for label in CLASSES:
        (root / label).mkdir(parents=True)
        for i in range(typical + swapped):
            odd = i >= typical
            film = layout_film(rng, (label == "A") != odd)
            name = f"{'swapped-' if odd else ''}{i}.png"
            (root / label / name).write_bytes(tf.io.encode_png(film[..., np.newaxis]).numpy())
    return root


def _data_config(root: Path, **overrides) -> config_lib.DataConfig:
    return dataclasses.replace(config_lib.load("vanilla").data, data_dir=str(root),
                               **{"classes": CLASSES, "image_size": 32, **overrides})


def test_films_laid_out_like_the_other_class_weigh_most(tmp_path):
    config = _data_config(_tree(tmp_path))
    examples = data.list_examples(config.data_dir, CLASSES)
    weights = layout_weights.film_weights(examples, config, clip=10.0)
    assert weights.shape == (len(examples),) and weights.dtype == np.float32
    labels = np.array([e.label for e in examples])
    swapped = np.array(["swapped-" in e.relpath for e in examples])
    for label in (0, 1):
        mine = labels == label
        assert weights[mine].mean() == pytest.approx(1.0, rel=1e-5)
        assert weights[mine & swapped].min() > weights[mine & ~swapped].max()
    assert weights.max() / weights.min() <= 10.0 + 1e-4


def test_layout_is_judged_within_each_source(tmp_path):
    """Source k holds both classes (laid out apart, two films of each swapped); source x holds
    class A alone, laid out like B. x's layout is its source's: its films weigh alike."""
    root = _tree(tmp_path)
    rng = np.random.default_rng(1)
    rows = [(f"{label}/{path.name}", "k") for label in CLASSES
            for path in sorted((root / label).iterdir())]
    for i in range(6):
        film = layout_film(rng, high=False)
        (root / "A" / f"x-{i}.png").write_bytes(tf.io.encode_png(film[..., np.newaxis]).numpy())
        rows.append((f"A/x-{i}.png", "x"))
    (root / "manifest.csv").write_text("relpath,label,source\n" + "".join(
        f"{rel},{rel.split('/')[0]},{source}\n" for rel, source in rows))
    config = _data_config(root)
    examples = data.list_examples(config.data_dir, CLASSES)
    weights = layout_weights.film_weights(examples, config, clip=10.0)
    from_x = np.array(["x-" in e.relpath for e in examples])
    swapped = np.array(["swapped-" in e.relpath for e in examples])
    labels = np.array([e.label for e in examples])
    assert np.ptp(weights[from_x]) < 1e-6
    for label in (0, 1):
        mine = (labels == label) & ~from_x
        assert weights[mine & swapped].min() > weights[mine & ~swapped].max()
    assert weights[labels == 0].mean() == pytest.approx(1.0, rel=1e-5)


def test_a_class_with_one_image_in_a_source_weighs_one(tmp_path):
    """Class C has a single film: it cannot be held out of fold, so it keeps weight 1 and
    the layout model is fitted on A and B alone."""
    root = _tree(tmp_path)
    (root / "C").mkdir()
    film = layout_film(np.random.default_rng(2), high=True)
    (root / "C" / "only.png").write_bytes(tf.io.encode_png(film[..., np.newaxis]).numpy())
    config = _data_config(root, classes=CLASSES + ["C"])
    examples = data.list_examples(config.data_dir, CLASSES + ["C"])
    weights = layout_weights.film_weights(examples, config, clip=10.0)
    labels = np.array([e.label for e in examples])
    assert weights[labels == 2].tolist() == [1.0]
    swapped = np.array(["swapped-" in e.relpath for e in examples])
    mine = labels == 0
    assert weights[mine & swapped].min() > weights[mine & ~swapped].max()


@pytest.mark.parametrize("counts", [[5, 0], [5, 1]])
def test_too_few_images_of_a_class_is_refused(tmp_path, counts):
    examples = [data.Example(f"{i}.png", f"{c}/{i}.png", c) for c, n in enumerate(counts)
                for i in range(n)]
    with pytest.raises(DataError, match="of each of two classes or more within one source"):
        layout_weights.film_weights(examples, _data_config(tmp_path), clip=10.0)


def _elements(ds) -> list[tuple[int, float]]:
    """(label, weight) of every element of batched (image, one-hot, weight) data."""
    out = []
    for images, onehot, weights in ds:
        assert images.dtype == tf.uint8
        out += list(zip(onehot.numpy().argmax(axis=1).tolist(), weights.numpy().tolist()))
    return out


def test_weights_travel_with_their_images_from_folders(tmp_path):
    config = _data_config(_tree(tmp_path, typical=6, swapped=0))
    examples = data.list_examples(config.data_dir, CLASSES)
    weights = np.array([100 * e.label + i for i, e in enumerate(examples)], np.float32)
    in_order = _elements(data.make_dataset(examples, config, 5, training=False, weights=weights))
    assert in_order == [(e.label, float(w)) for e, w in zip(examples, weights)]
    shuffled = _elements(data.make_dataset(examples, config, 5, training=True, weights=weights))
    assert sorted(shuffled) == sorted(in_order)
    assert all(label == int(weight) // 100 for label, weight in shuffled)


def test_weights_travel_with_their_images_from_prepared_shards(tmp_path):
    config = config_lib.load("vanilla", overrides={
        "data_dir": str(_tree(tmp_path / "data", typical=8, swapped=0)), "classes": CLASSES,
        "image_size": 16, "test_per_class": 2, "validation_split": 0.25})
    prepare.prepare(config, config.data.data_dir, str(tmp_path / "prepared"), max_side=48,
                    shard_mb=1)
    shards = dataclasses.replace(config.data, data_dir=str(tmp_path / "prepared"))
    examples = data.make_splits(shards).train
    assert examples and examples[0].prepared
    weights = np.array([100 * e.label + i for i, e in enumerate(examples)], np.float32)
    in_order = _elements(data.make_dataset(examples, shards, 4, training=False, weights=weights))
    assert in_order == [(e.label, float(w)) for e, w in zip(examples, weights)]
    shuffled = _elements(data.make_dataset(examples, shards, 4, training=True, weights=weights))
    assert sorted(shuffled) == sorted(in_order)


def test_sample_weights_are_layout_weights_times_class_weights(tiny_config):
    config = dataclasses.replace(
        tiny_config, train=dataclasses.replace(tiny_config.train, layout_weights=5.0))
    splits = data.make_splits(config.data)
    classes = data.class_weights([e.label for e in splits.train], len(splits.classes))
    films = layout_weights.film_weights(splits.train, config.data, 5.0)
    got = train.sample_weights(splits, config, classes)
    np.testing.assert_allclose(got, films * [classes[e.label] for e in splits.train], rtol=1e-6)
    np.testing.assert_allclose(train.sample_weights(splits, config, None), films, rtol=1e-6)
    assert train.sample_weights(splits, tiny_config, classes) is None  # off by default


def test_a_run_trains_with_layout_weights(tiny_config, caplog):
    config = dataclasses.replace(
        tiny_config, train=dataclasses.replace(tiny_config.train, layout_weights=10.0,
                                               epochs=2))
    with caplog.at_level("INFO"):
        results = train.run(config)
    assert results["test"]["accuracy"] >= 0
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("layout weights (clip 10; within all)") for line in lines), lines
    history = (Path(config.output.model_dir) / "history.csv").read_text().splitlines()
    assert len(history) == 3 and "loss" in history[0]
