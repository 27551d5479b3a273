"""Chest crop: each film's lung field found in its pixels, cut out and resized back, so a film
framed tighter or looser reaches the network the same."""
from __future__ import annotations

import csv
import importlib
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from conftest import drawn_chest
from trainer import chest_crop, config as config_lib, models, runs
from trainer.keras_api import keras

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _gap(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference of two images' grey levels."""
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean())


def _boxes(*films) -> np.ndarray:
    return chest_crop.lung_boxes(tf.constant(np.stack(films), tf.float32)).numpy()


# --- the box follows the lungs ----------------------------------------------------------------

def _even(lungs):
    """A box made even about the image's middle, as lung_boxes makes its columns."""
    top, left, bottom, right = lungs
    return top, min(left, 1 - right), bottom, max(right, 1 - left)


@pytest.mark.parametrize("size, lungs, surround", [
    (50, (0.2, 0.15, 0.7, 0.85), True),      # a child's film: chest, neck and belly on black
    (50, (0.3, 0.3, 0.7, 0.7), True),        # the chest small in the film
    (44, (0.05, 0.1, 0.65, 0.6), True),      # off centre: the box is even about the middle
    (64, (0.1, 0.05, 0.9, 0.95), False),     # cropped to the chest: no surround
    (224, (0.25, 0.2, 0.8, 0.75), True),
])
def test_the_box_holds_the_drawn_lungs(size, lungs, surround):
    """Inside the lungs' box (made even), to a pixel and a half, and most of its height and
    width (the narrow tips of the drawn lungs may fall to the opening)."""
    top, left, bottom, right = _boxes(drawn_chest(size, lungs, surround))[0]
    want_top, want_left, want_bottom, want_right = _even(lungs)
    slack = 1.5 / size
    assert want_top - slack <= top and bottom <= want_bottom + slack
    assert want_left - slack <= left and right <= want_right + slack
    assert bottom - top >= 0.85 * (want_bottom - want_top)
    assert right - left >= 0.9 * (want_right - want_left)


def test_dark_tissue_over_the_shoulders_is_not_lung():
    """Dark bands from the film's edge into the top corners of the body (the thin tissue over
    a child's shoulders) do not stretch the box up to them."""
    film = drawn_chest(64, (0.35, 0.2, 0.8, 0.8))
    film[8:20, :18] = film[8:20, 46:] = 60
    top = _boxes(film)[0][0]
    assert top >= 0.35 - 1.5 / 64


@pytest.mark.parametrize("name, film", [
    ("flat grey", np.full((40, 40, 3), 128, np.uint8)),
    ("all black", np.zeros((40, 40, 3), np.uint8)),
    ("a speck", np.pad(np.zeros((2, 2, 3), np.uint8), ((19, 19), (19, 19), (0, 0)),
                       constant_values=200)),
])
def test_an_image_without_a_lung_field_keeps_its_frame(name, film):
    np.testing.assert_array_equal(_boxes(film)[0], [0, 0, 1, 1])
    cropped = chest_crop.ChestCrop(margin=0.05)(film[None]).numpy()[0]
    np.testing.assert_array_equal(cropped, film.astype(np.float32))


@pytest.mark.parametrize("boxes, margin, widened", [
    ([[0.2, 0.2, 0.6, 0.8]], 0.1, [[0.16, 0.14, 0.64, 0.86]]),
    ([[0.0, 0.1, 0.5, 1.0]], 0.2, [[0.0, 0.0, 0.6, 1.0]]),  # kept inside the image
    ([[0.3, 0.3, 0.7, 0.7]], 0.0, [[0.3, 0.3, 0.7, 0.7]]),
])
def test_widen(boxes, margin, widened):
    np.testing.assert_allclose(chest_crop.widen(tf.constant(boxes), margin).numpy(), widened,
                               atol=1e-6)


def test_uncrop_puts_a_map_back_on_its_box():
    """Grad-CAM's maps are of the crop: uncrop lays each on its own box, zero outside it."""
    boxes = tf.constant([[0.25, 0.25, 0.75, 0.75], [0.0, 0.0, 1.0, 1.0]])
    back = chest_crop.uncrop(tf.ones([2, 8, 8]), boxes, (16, 16)).numpy()
    np.testing.assert_allclose(back[0, 4:12, 4:12], 1.0, atol=1e-6)
    assert not back[0, :4].any() and not back[0, 12:].any()
    assert not back[0, :, :4].any() and not back[0, :, 12:].any()
    np.testing.assert_allclose(back[1], 1.0, atol=1e-6)


# --- films framed differently reach the network alike ---------------------------------------

def test_a_chest_framed_tighter_or_looser_is_cropped_alike():
    layer = chest_crop.ChestCrop(margin=0.05)
    framings = [(0.2, 0.15, 0.7, 0.85), (0.35, 0.3, 0.65, 0.7), (0.1, 0.2, 0.6, 0.8),
                (0.05, 0.05, 0.95, 0.95)]
    films = np.stack([drawn_chest(64, lungs, surround=i < 3, seed=i) for i, lungs in
                      enumerate(framings)]).astype(np.float32)
    cropped = layer(films).numpy()
    for i in range(1, len(films)):
        before, after = _gap(films[i], films[0]), _gap(cropped[i], cropped[0])
        assert after < before / 3, (i, before, after)


def test_the_model_crops_each_film_and_carries_the_layer(tmp_path):
    config = config_lib.ModelConfig(chest_crop=True, chest_margin=0.1, border_crop=0.05)
    model = models.build(config, 64, 3)
    layer = model.get_layer("chest_crop")
    assert layer.margin == 0.1 and layer.output.shape[1:] == (58, 58, 3)
    films = np.stack([drawn_chest(64, (0.3, 0.3, 0.7, 0.7)), drawn_chest(64, (0.15, 0.15, 0.85, 0.85))])
    before = keras.Model(model.input, model.get_layer("border_crop").output)(films).numpy()
    seen = keras.Model(model.input, layer.output)(films).numpy()
    assert _gap(seen[0], seen[1]) < _gap(before[0], before[1]) / 3  # both framed to the lungs
    path = tmp_path / "model.keras"
    model.save(path)
    again = runs.load_model(str(path))
    np.testing.assert_allclose(again(films).numpy(), model(films).numpy(), rtol=1e-5, atol=1e-6)


def test_the_crop_runs_in_a_dataset_fit():
    """fit() calls the layer on batches of unknown shape; the layer needs its sizes."""
    model = models.build(config_lib.ModelConfig(chest_crop=True), 32, 2)
    model.compile("adam", "sparse_categorical_crossentropy")
    films = np.stack([drawn_chest(32, (0.2, 0.2, 0.8, 0.8), seed=i) for i in range(4)])
    ds = tf.data.Dataset.from_tensor_slices((films, [0, 1, 0, 1])).batch(2)
    ds = ds.map(lambda x, y: (tf.reshape(x, tf.shape(x)), y))  # forget the static shape
    history = model.fit(ds, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


# --- on real films ----------------------------------------------------------------------------

def _real_films(cxr3: Path, per_source: int) -> tuple[list[np.ndarray], list[str]]:
    """The first ``per_source`` films of each cxr3 source, and their sources."""
    rows = list(csv.DictReader(open(cxr3 / "manifest.csv")))
    films, sources = [], []
    for source in sorted({r["source"] for r in rows}):
        picked = [r for r in rows if r["source"] == source][:per_source]
        films += [tf.io.decode_image(tf.io.read_file(str(cxr3 / r["relpath"])), channels=3).numpy()
                  for r in picked]
        sources += [source] * len(picked)
    return films, sources


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    inter = (np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
             * np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None))
    area = lambda box: (box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def test_on_real_films_the_box_moves_with_a_zoom(cxr3, monkeypatch):
    """A real film zoomed (its middle 3/4, as bench/framing_probe.py reframes it) gets the box
    of the film as it was, mapped into the zoomed frame; and the box is not the whole film
    (which would fail this: the whole zoomed film is 56% of the whole film). On Kermany's
    children, framed with neck, arms and belly, the box leaves out the top and the bottom."""
    monkeypatch.syspath_prepend(str(BENCH))
    framing_probe = importlib.import_module("framing_probe")
    probe = importlib.import_module("chest_crop_probe")
    films, sources = _real_films(cxr3, per_source=15)
    as_is = _boxes(*framing_probe.decoded(films, 50).numpy())
    zoomed = _boxes(*framing_probe.decoded([framing_probe.reframe(f, "zoomed") for f in films],
                                           50).numpy())
    assert np.median(_iou(zoomed, probe.expected(as_is, "zoomed"))) > 0.8
    assert np.median((as_is[:, 2] - as_is[:, 0]) * (as_is[:, 3] - as_is[:, 1])) < 0.85
    kermany = as_is[np.array(sources) == "kermany"]
    assert np.median(kermany[:, 0]) > 0.1 and np.median(kermany[:, 2]) < 0.9
