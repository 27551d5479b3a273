"""Per-image intensity normalisation and the border crop, inside the model: the layers against
numpy, and one implementation across training, evaluate, predict and the serving export."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainer import config as config_lib, export, intensity, models, runs, two_views
from trainer.keras_api import keras


def _gray(array: np.ndarray) -> np.ndarray:
    """[B, H, W] levels -> [B, H, W, 3] uint8, the way an X-ray stored as RGB looks."""
    return np.repeat(np.asarray(array, np.uint8)[..., None], 3, axis=-1)


def _equalized(image: np.ndarray) -> np.ndarray:
    """Textbook histogram equalisation of one 8-bit grey image (float, not rounded)."""
    cdf = np.cumsum(np.bincount(image.ravel(), minlength=256))
    cdf_min = cdf[cdf > 0].min()
    return (cdf - cdf_min) / max(image.size - cdf_min, 1) * 255.0


def _stretched(image: np.ndarray, low: float, high: float) -> np.ndarray:
    lo, hi = np.percentile(image, [low, high], method="inverted_cdf")
    return np.clip((image.astype(np.float64) - lo) / max(hi - lo, 1), 0, 1) * 255.0


RNG = np.random.default_rng(0)
IMAGES = {  # name -> a batch of two grey 20x20 images
    "random": RNG.integers(0, 256, (2, 20, 20)),
    "narrow_range": RNG.integers(90, 130, (2, 20, 20)),
    "two_levels": np.stack([np.tile([10, 200], (20, 10))] * 2),
    "constant": np.full((2, 20, 20), 77),
    "gradient": np.stack([np.tile(np.arange(20) * 13, (20, 1)), np.tile(np.arange(20), (20, 1))]),
}


@pytest.mark.parametrize("name", IMAGES)
def test_equalization_is_the_textbook_one(name):
    batch = _gray(IMAGES[name])
    out = intensity.HistogramEqualization()(batch).numpy()
    assert out.dtype == np.float32 and out.shape == batch.shape
    for image, result in zip(batch[..., 0], out):
        expected = _equalized(image)[image]
        for channel in range(3):
            np.testing.assert_allclose(result[..., channel], expected, atol=1e-3)


@pytest.mark.parametrize("name", IMAGES)
@pytest.mark.parametrize("low, high", [(1, 99), (0, 100), (5, 95), (50, 60)])
def test_percentile_stretch_matches_numpy(name, low, high):
    batch = _gray(IMAGES[name])
    out = intensity.PercentileNormalization(low, high)(batch).numpy()
    for image, result in zip(batch[..., 0], out):
        np.testing.assert_allclose(result[..., 0], _stretched(image, low, high), atol=1e-3)


@pytest.mark.parametrize("layer", [intensity.HistogramEqualization(),
                                   intensity.PercentileNormalization(0, 100)])
def test_normalisation_removes_a_change_of_exposure(layer):
    """The point of it: a darker, flatter copy of an image normalises to the same picture."""
    image = RNG.integers(0, 128, (1, 32, 32)) * 2  # even levels, so halving is exact
    darker = image // 2 + 20
    np.testing.assert_allclose(layer(_gray(image)).numpy(), layer(_gray(darker)).numpy(),
                               atol=1e-3)


def test_normalisation_computes_in_float32_under_mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = models.build(config_lib.ModelConfig(intensity="equalize", border_crop=0.1), 20, 3)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert model.get_layer("equalize").compute_dtype == "float32"
    assert model.get_layer("border_crop").output.shape[1:] == (16, 16, 3)
    assert model.get_layer("conv").compute_dtype == "bfloat16"


@pytest.mark.parametrize("size, fraction, side", [(50, 0.0, 50), (50, 0.05, 44), (50, 0.1, 40),
                                                  (224, 0.05, 202), (96, 0.05, 86),
                                                  (16, 0.2, 10), (16, 0.01, 16)])
def test_border_crop_cuts_each_side(size, fraction, side):
    config = config_lib.load("vanilla", overrides={"image_size": size, "border_crop": fraction})
    assert config_lib.network_size(config) == side
    model = models.build(config.model, size, 3)
    assert model.input_shape == (None, size, size, 3)  # serving takes the full image
    first = model.layers[1]
    assert first.output.shape[1] == side
    assert (first.name == "border_crop") == (side != size)


def test_border_crop_keeps_the_centre():
    model = models.build(config_lib.ModelConfig(border_crop=0.2), 10, 3)
    pixels = np.arange(100, dtype=np.uint8).reshape(1, 10, 10, 1).repeat(3, axis=-1)
    cropped = keras.Model(model.input, model.get_layer("border_crop").output)(pixels).numpy()
    np.testing.assert_array_equal(cropped, pixels[:, 2:8, 2:8])


# --- one implementation from training to serving ------------------------------------------

def _encoded(seed: int) -> bytes:
    """A grey PNG whose exposure differs by seed (what the normalisation should absorb)."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 100, (40, 40)) + 40 * seed
    buf = io.BytesIO()
    Image.fromarray(image.astype(np.uint8), "L").save(buf, format="PNG")
    return buf.getvalue()


INPUT_RECIPES = {  # what the model does to its input before the network, one trained run each
    "equalize": {"intensity": "equalize", "border_crop": 0.1},
    "percentile": {"intensity": "percentile", "border_crop": 0.1},
    "lung-crop": {"intensity": "percentile", "lung_crop": True},
    "chest-crop": {"intensity": "equalize", "border_crop": 0.1, "chest_crop": True},
    "two-views": {"intensity": "equalize", "border_crop": 0.1, "two_views": True},
}


@pytest.fixture(scope="module", params=sorted(INPUT_RECIPES))
def normalised_run(request, tmp_path_factory) -> Path:
    """A tiny trained vanilla run with normalisation, a border or lung-field crop, and
    augmentation on (the lung crop on the database layout, whose masks it measures)."""
    from trainer import demo_data, train
    root = tmp_path_factory.mktemp(f"intensity-{request.param}")
    recipe = INPUT_RECIPES[request.param]
    classes = list(config_lib.TUTORIAL_CLASSES)
    if recipe.get("lung_crop"):
        classes = ["COVID", "Normal", "Viral Pneumonia"]
        demo_data.generate_database(root / "data", 16, seed=3, classes=classes, sheets=False)
    else:
        demo_data.generate(root / "data", images_per_class=16, seed=3)
    config = config_lib.load("vanilla", overrides={
        "data_dir": str(root / "data"), "classes": classes, "image_size": 20,
        "test_per_class": 4, "batch_size": 16, "epochs": 2, "model_dir": str(root / "run"),
        "augment": True, "blur": 1.0, **recipe})
    train.run(config)
    return root / "run"


def test_the_run_records_and_the_checkpoint_carries_the_normalisation(normalised_run):
    config = runs.read_config(str(normalised_run))
    assert config.model.intensity in ("equalize", "percentile") and config.augment.augment
    assert (config.model.border_crop, bool(config.model.lung_box)) in ((0.1, False), (0.0, True))
    model = runs.load_model(str(normalised_run / "checkpoints" / "best.keras"))
    for network in two_views.towers(model) or [model]:  # each tower normalises on its own
        kinds = {type(layer) for layer in network.layers}
        assert kinds & {intensity.HistogramEqualization, intensity.PercentileNormalization}
        names = {layer.name for layer in network.layers}
        assert ("lung_crop" in names) == bool(config.model.lung_box)
        assert ("chest_crop" in names) == (config.model.chest_crop or network.name == "chest")
    assert (two_views.towers(model) is not None) == config.model.two_views


def test_train_evaluate_predict_and_export_agree(normalised_run, tmp_path):
    from trainer import evaluate, predict
    paths = []
    for seed in range(4):
        paths.append(tmp_path / f"scan{seed}.png")
        paths[-1].write_bytes(_encoded(seed))
    model = runs.load_model(str(normalised_run / "checkpoints" / "best.keras"))
    config = runs.read_config(str(normalised_run))
    results, errors = predict.predict_files(model, [str(p) for p in paths],
                                            config.data.image_size, config.data.interpolation)
    assert not errors
    served = export.load_signature(str(normalised_run / "export"))(
        image_bytes=np.array([p.read_bytes() for p in paths], dtype=object))
    np.testing.assert_allclose(served["probabilities"].numpy(), [p for _, p in results],
                               rtol=1e-5, atol=1e-6)
    _, again = evaluate.evaluate(evaluate.Options(str(normalised_run)))
    trained = json.loads((normalised_run / "metrics.json").read_text())
    assert again["confusion_matrix"] == trained["confusion_matrix"]
    assert again["test"]["loss"] == pytest.approx(trained["test"]["loss"], rel=1e-5)
