"""--two_views: the whole film and its chest crop, each through its own network, averaged."""
import numpy as np
import pytest
import tensorflow as tf

from conftest import drawn_chest
from trainer import chest_crop, models, two_views
from trainer.config import ModelConfig
from trainer.keras_api import keras


def _films(n: int, size: int = 48) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.stack([drawn_chest(size, (0.2, 0.15, 0.8, 0.85), seed=int(rng.integers(1 << 30)))
                     for _ in range(n)])


def _chest_crops(model) -> list[str]:
    return [layer.name for layer in model.layers if isinstance(layer, chest_crop.ChestCrop)]


@pytest.mark.parametrize("architecture, size", [("vanilla", 48), ("small_cnn", 48)])
def test_one_input_two_towers_and_the_mean_of_their_probabilities(architecture, size):
    model = models.build(ModelConfig(architecture=architecture, weights="none", two_views=True,
                                     border_crop=0.05), size, 3)
    whole, chest = two_views.towers(model)
    assert (whole.name, chest.name) == ("whole", "chest")
    assert not _chest_crops(whole) and _chest_crops(chest) == ["chest_crop"]
    assert [type(layer) for layer in whole.layers if layer.name != "chest_crop"] == \
        [type(layer) for layer in chest.layers if layer.name != "chest_crop"]
    assert model.input.dtype == tf.uint8 and model.output_shape == (None, 3)
    films = _films(4, size)
    np.testing.assert_allclose(model(films).numpy(), (whole(films) + chest(films)).numpy() / 2,
                               rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("config", [ModelConfig(), ModelConfig(chest_crop=True)])
def test_other_models_have_no_towers_and_train_as_before(config):
    model = models.build(config, 32, 3)
    step = model.train_step
    two_views.use(model)
    assert two_views.towers(model) is None and model.train_step == step


def test_each_tower_is_fitted_on_its_own_loss():
    """A tower's gradient does not change when the other tower changes (a loss on the mean
    prediction would tie them), and the loss is the mean of the towers' own losses."""
    model = models.build(ModelConfig(two_views=True), 48, 3)
    model.compile(loss="categorical_crossentropy")
    whole, chest = two_views.towers(model)
    films = _films(6)
    labels = tf.constant(keras.utils.to_categorical([0, 1, 2, 0, 1, 2], 3))

    def whole_gradients():
        with tf.GradientTape() as tape:
            value, _ = two_views.loss(model, films, labels, training=False)
        return value, tape.gradient(value, whole.trainable_variables)

    value, before = whole_gradients()
    alone = [float(keras.losses.categorical_crossentropy(labels, tower(films)).numpy().mean())
             for tower in (whole, chest)]
    assert float(value) == pytest.approx(np.mean(alone), rel=1e-5)
    for variable in chest.trainable_variables:
        variable.assign(variable * 3.0 + 0.1)
    _, after = whole_gradients()
    for first, second in zip(before, after):
        np.testing.assert_allclose(first.numpy(), second.numpy(), rtol=1e-5, atol=1e-7)
