"""Config loading: defaults < YAML < flags, and every invalid case fails with one clear line."""
from __future__ import annotations

import dataclasses

import pytest

from trainer import config as config_lib, models
from trainer.errors import ConfigError


def _validated(**overrides):
    config = config_lib.load(overrides.pop("model", "vanilla"), overrides.pop("config", None),
                             overrides)
    return config_lib.validate(config, models.min_image_sizes())


def test_yaml_reproduces_the_tutorial_recipes():
    vanilla = config_lib.load("vanilla")
    assert (vanilla.data.image_size, vanilla.train.batch_size, vanilla.train.epochs) == (50, 250, 1000)
    assert vanilla.data.classes == ["COVID-19", "NORMAL", "Viral Pneumonia"]
    assert (vanilla.data.validation_split, vanilla.data.test_per_class, vanilla.data.seed) == (0.2, 40, 28)
    assert (vanilla.train.patience, vanilla.train.min_delta, vanilla.train.learning_rate) == (5, 0.01, 1e-3)
    inception = config_lib.load("inception")
    assert (inception.data.image_size, inception.train.batch_size) == (256, 15)
    assert (inception.model.architecture, inception.model.weights) == ("inception", "imagenet")


@pytest.mark.parametrize("overrides, section, key, expected", [
    ({}, "train", "batch_size", 250),                                   # YAML beats default
    ({"batch_size": 8}, "train", "batch_size", 8),                      # flag beats YAML
    ({"epochs": 2}, "train", "epochs", 2),
    ({"image_size": 64}, "data", "image_size", 64),
    ({"learning_rate": 0.01}, "train", "learning_rate", 0.01),
    ({"learning_rate": 1}, "train", "learning_rate", 1.0),             # int accepted as float
    ({"validation_split": 0.1}, "data", "validation_split", 0.1),
    ({"test_per_class": 0}, "data", "test_per_class", 0),
    ({"seed": 7}, "data", "seed", 7),
    ({"weights": "none"}, "model", "weights", "none"),
    ({"classes": ["a", "b"]}, "data", "classes", ["a", "b"]),
    ({"model_dir": "gs://b/r"}, "output", "model_dir", "gs://b/r"),
    ({"batch_size": None}, "train", "batch_size", 250),                 # unset flag: YAML stands
])
def test_precedence(overrides, section, key, expected):
    config = config_lib.load("vanilla", overrides=overrides)
    assert getattr(getattr(config, section), key) == expected


def test_config_file_and_defaults(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("train:\n  epochs: 3\n")
    config = config_lib.load(config_path=str(path), overrides={"epochs": 4, "batch_size": 2})
    assert config.train.epochs == 4 and config.train.batch_size == 2
    assert config.data.image_size == config_lib.DataConfig().image_size  # dataclass default


def test_round_trip_through_yaml():
    config = config_lib.load("inception", overrides={"epochs": 3})
    again = config_lib.from_yaml_text(config_lib.to_yaml(config), "config.yaml")
    assert dataclasses.asdict(again) == dataclasses.asdict(config)


INVALID_YAML = [
    ("train:\n  epoch: 3\n", "unknown key 'train.epoch' (did you mean 'train.epochs'?)"),
    ("trian:\n  epochs: 3\n", "unknown key 'trian' (did you mean 'train'?)"),
    ("train:\n  epochs: ten\n", "train.epochs must be an integer, got 'ten'"),
    ("train:\n  epochs: 2.5\n", "train.epochs must be an integer"),
    ("train:\n  epochs: true\n", "train.epochs must be an integer"),
    ("data:\n  classes: COVID-19\n", "data.classes must be a list of strings"),
    ("output:\n  overwrite: 1\n", "output.overwrite must be true or false"),
    ("train: 3\n", "section 'train' must be a mapping"),
    ("- a\n- b\n", "expected a mapping of sections"),
    ("train:\n  epochs: [1\n", "is not valid YAML"),
]


@pytest.mark.parametrize("text, message", INVALID_YAML)
def test_invalid_yaml(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=None) as err:
        config_lib.load(config_path=str(path))
    assert message in str(err.value)
    assert str(path) in str(err.value)


INVALID_VALUES = [
    ({"epochs": 0}, "train.epochs (--epochs) must be at least 1, got 0"),
    ({"batch_size": 0}, "train.batch_size (--batch_size) must be at least 1, got 0"),
    ({"learning_rate": 0.0}, "train.learning_rate (--learning_rate) must be positive"),
    ({"validation_split": 1.0}, "data.validation_split (--validation_split) must be in [0, 1)"),
    ({"validation_split": -0.1}, "data.validation_split"),
    ({"test_per_class": -1}, "data.test_per_class (--test_per_class) must be 0 or more"),
    ({"patience": -1}, "train.patience"),
    ({"classes": ["only"]}, "needs at least two class names"),
    ({"classes": ["a", "A"]}, "has a name twice"),
    ({"model": "inception", "image_size": 74, "weights": "none"},
     "data.image_size (--image_size) must be at least 75 for inception, got 74"),
    ({"architecture": "resnet"}, "unknown model 'resnet'"),
    ({"data_dir": "/no/such/dir"}, "--data_dir: no such directory: /no/such/dir"),
    ({"test_dir": "/no/such/test"}, "--test_dir: no such directory: /no/such/test"),
    ({"weights": "/no/such.h5"}, "--weights: expected imagenet, none or a weights file"),
    ({"cache": "disk"}, "data.cache (--cache) must be one of auto, memory, none, got 'disk'"),
    ({"strategy": "tpu"}, "runtime.strategy (--strategy) must be one of"),
    ({"preprocess": "vgg"}, "model.preprocess (--preprocess) must be one of"),
    ({"class_weights": "auto"}, "train.class_weights (--class_weights) must be one of"),
    ({"model": "resnet"}, "unknown model 'resnet' (--model): choose one of inception, vanilla"),
    ({"model": "vanilla", "config": "x.yaml"}, "pass either --model=NAME or --config=PATH"),
    ({"model": None, "config": "/no/such.yaml"}, "config file not found: /no/such.yaml"),
    ({"epochs": "3"}, "--epochs must be an integer, got '3'"),
    ({"not_a_flag": 1}, "flags: unknown key 'not_a_flag'"),
]


@pytest.mark.parametrize("overrides, message", INVALID_VALUES)
def test_invalid_values(overrides, message):
    with pytest.raises(ConfigError) as err:
        _validated(**overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_every_leaf_is_a_unique_flag_name():
    leaves = config_lib.leaf_fields()
    assert {"batch_size", "epochs", "image_size", "learning_rate", "data_dir", "test_dir",
            "model_dir", "weights", "validation_split", "test_per_class", "seed"} <= set(leaves)
    for name, (_, leaf) in leaves.items():
        assert leaf.metadata["help"], name
