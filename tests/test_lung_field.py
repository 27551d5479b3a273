"""Lung-field crop: the box measured on masks, its validation, and the model's crop."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainer import config as config_lib, demo_data, lung_field, models
from trainer.data import Example
from trainer.errors import ConfigError, DataError
from trainer.keras_api import keras


def _mask(shape, rows=None, cols=None) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    if rows:
        mask[rows[0]:rows[1], cols[0]:cols[1]] = True
    return mask


@pytest.mark.parametrize("mask, box", [
    (_mask((10, 10), (0, 10), (0, 10)), (0.0, 0.0, 1.0, 1.0)),
    (_mask((10, 20), (2, 8), (5, 15)), (0.2, 0.25, 0.8, 0.75)),
    (_mask((4, 4), (3, 4), (0, 1)), (0.75, 0.0, 1.0, 0.25)),
    (_mask((10, 10)), None),
])
def test_mask_box(mask, box):
    assert lung_field.mask_box(mask) == box


def test_field_box_widens_by_the_margin_and_clips():
    assert lung_field.field_box([(0.2, 0.1, 0.8, 0.5)] * 3, margin=0.1) == [0.14, 0.06, 0.86, 0.54]
    assert lung_field.field_box([(0.0, 0.05, 0.95, 1.0)], margin=0.2) == [0.0, 0.0, 1.0, 1.0]


def test_field_box_ignores_a_few_wrong_masks():
    boxes = [(0.2, 0.2, 0.8, 0.8)] * 98 + [(0.0, 0.0, 1.0, 1.0)] * 2
    assert lung_field.field_box(boxes, margin=0.0) == [0.2, 0.2, 0.8, 0.8]


@pytest.mark.parametrize("box, size, crop", [
    ((0.0, 0.0, 1.0, 1.0), 50, ((0, 0), (0, 0))),
    ((0.1, 0.2, 0.9, 0.8), 50, ((5, 5), (10, 10))),
    ((0.13, 0.09, 0.93, 0.93), 20, ((2, 1), (1, 1))),  # rounded outwards: lungs stay in
])
def test_pixel_crop(box, size, crop):
    assert lung_field.pixel_crop(box, size) == crop


@pytest.mark.parametrize("box", [[0.5, 0.0, 0.4, 1.0], [0.0, 0.0, 1.0], [0.0, 0.6, 1.0, 0.6],
                                 [-0.1, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.1]])
def test_invalid_lung_boxes(box):
    config = config_lib.load("vanilla")
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, lung_box=box))
    with pytest.raises(ConfigError, match=r"model.lung_box must be \[top, left, bottom, right\]"):
        config_lib.validate(config, models.min_image_sizes())


# --- measuring the lung field on a tree's masks ----------------------------------------------

def _examples(tree: Path, classes) -> list[Example]:
    from trainer import data
    return data.list_examples(str(tree), list(classes))


def test_measured_box_holds_the_masks_lungs(tmp_path):
    classes = ("COVID", "Normal", "Viral Pneumonia")
    tree = demo_data.generate_database(tmp_path / "db", images_per_class=20, seed=1,
                                       classes=classes, sheets=False)
    examples = _examples(tree, classes)
    box = lung_field.measure(examples, classes, margin=0.0)
    inside = [lung_field.mask_box(lung_field.read_mask(e.mask)) for e in examples]
    held = [b for b in inside if box[0] <= b[0] and box[1] <= b[1] and b[2] <= box[2]
            and b[3] <= box[3]]
    assert 0 < box[0] < box[2] < 1 and 0 < box[1] < box[3] < 1
    assert len(held) >= 0.85 * len(inside)  # each side holds 95% of the masks


def test_no_masks_is_refused_naming_the_flag(tmp_path):
    demo_data.generate(tmp_path / "flat", images_per_class=3)
    examples = _examples(tmp_path / "flat", config_lib.TUTORIAL_CLASSES)
    with pytest.raises(DataError, match="--lung_crop needs lung masks: none of the training"):
        lung_field.measure(examples, config_lib.TUTORIAL_CLASSES, 0.05)


@pytest.mark.parametrize("content, message", [
    (np.zeros((8, 8), np.uint8), "all 2 lung masks are empty"),
    (None, "cannot read the lung mask"),
])
def test_bad_masks_are_refused(tmp_path, content, message):
    paths = [tmp_path / f"m{i}.png" for i in range(2)]
    for path in paths:
        if content is None:
            path.write_bytes(b"not a png")
        else:
            Image.fromarray(content).save(path)
    examples = [Example(str(p), p.name, 0, mask=str(p)) for p in paths]
    with pytest.raises(DataError, match=message) as err:
        lung_field.measure(examples, ["A"], 0.05)
    assert str(paths[0]) in str(err.value)


# --- the model crops the box ------------------------------------------------------------------

def test_the_model_does_not_see_outside_the_lung_field():
    box = [0.2, 0.1, 0.8, 0.9]
    model = models.build(config_lib.ModelConfig(lung_box=box), 20, 3)
    assert model.get_layer("lung_resize").output.shape[1:] == (20, 20, 3)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (2, 20, 20, 3), dtype=np.uint8)
    changed = rng.integers(0, 256, (2, 20, 20, 3), dtype=np.uint8)
    changed[:, 4:16, 2:18] = pixels[:, 4:16, 2:18]  # same lung field, other surroundings
    np.testing.assert_allclose(model(pixels).numpy(), model(changed).numpy(), rtol=1e-6)
    seen = keras.Model(model.input, model.get_layer("lung_resize").output)
    changed[:, 10, 10] = 255 - changed[:, 10, 10]  # a pixel inside it does count
    assert not np.array_equal(seen(pixels).numpy(), seen(changed).numpy())


def test_a_prepared_data_dir_measures_the_same_box_as_its_tree(tmp_path):
    from trainer import data, prepare
    classes = ["COVID", "Normal", "Viral Pneumonia"]
    tree = demo_data.generate_database(tmp_path / "db", images_per_class=12, seed=2,
                                       classes=tuple(classes), sheets=False)
    config = config_lib.load("vanilla", overrides={
        "data_dir": str(tree), "classes": classes, "test_per_class": 3, "lung_crop": True})
    prepare.prepare(config, str(tree), str(tmp_path / "prepared"), max_side=64, shard_mb=1)
    boxes = []
    for data_dir in (str(tree), str(tmp_path / "prepared")):
        setting = dataclasses.replace(config, data=dataclasses.replace(config.data,
                                                                       data_dir=data_dir))
        boxes.append(lung_field.with_box(setting, data.make_splits(setting.data).train)
                     .model.lung_box)
    assert boxes[0] == boxes[1] and len(boxes[0]) == 4
