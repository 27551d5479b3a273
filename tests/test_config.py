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
    ("model:\n  lung_box: [0.1, a, 0.9, 0.9]\n", "model.lung_box must be a list of numbers"),
    ("model:\n  lung_box: 0.5\n", "model.lung_box must be a list of numbers"),
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
    ({"model": "resnet"}, "unknown model 'resnet' (--model): choose one of inception, robust, "
                          "robust-densenet, vanilla"),
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


# --- augmentation, intensity normalisation, border crop, splits (issue 15) -----------------

VALID_NEW_VALUES = [
    {}, {"augment": True}, {"augment": True, "zoom": 0.0, "rotate": 0.0, "translate": 0.0},
    {"augment": True, "zoom": 0.5, "translate": 0.3, "rotate": 180, "brightness": 1,
     "contrast": 0.9, "gamma": 0.9, "noise": 1, "blur": 10, "fill_mode": "constant"},
    {"augment": True, "zoom": 0, "translate": 0, "rotate": 0, "jit_compile": True},
    {"augment": False, "jit_compile": True},
    {"augment": True, "stretch": 0.3}, {"augment": True, "stretch": 0.99},
    {"augment": True, "aspect": 0.0}, {"augment": True, "aspect": 0.3},
    {"augment": True, "aspect": 0.49},
    {"intensity": "equalize"}, {"intensity": "percentile", "percentile_low": 0,
                                "percentile_high": 100},
    {"intensity": "percentile", "percentile_low": 2.5, "percentile_high": 97.5},
    {"border_crop": 0.0}, {"border_crop": 0.1}, {"border_crop": 0.24},
    {"model": "inception", "weights": "none", "image_size": 94, "border_crop": 0.1},  # 76 px
    {"architecture": "densenet121", "weights": "none", "image_size": 32},
    {"architecture": "small_cnn", "image_size": 16}, {"preprocess": "torch"},
    {"model": "robust"}, {"model": "robust-densenet", "weights": "none"},
    {"lung_crop": True}, {"lung_crop": True, "lung_margin": 0.0},
    {"lung_crop": True, "lung_margin": 0.49},
    {"model": "robust", "two_views": False, "lung_crop": True, "border_crop": 0.0},
    {"lr_patience": 0, "patience": 0}, {"lr_patience": 2}, {"lr_patience": 4, "patience": 5},
    {"lr_patience": 2, "lr_factor": 0.01}, {"lr_patience": 2, "lr_factor": 0.99},
    {"consistency": 0.0}, {"consistency": 0, "augment": False},
    {"augment": True, "consistency": 12.0},
    {"model": "robust", "two_views": False, "consistency": 0.5},
    {"model": "robust", "two_views": False, "consistency": 12.0, "consistency_fit": "clean"},
    {"model": "robust", "two_views": False, "consistency": 1.0, "consistency_fit": "both"},
    {"consistency_fit": "augmented"},
    {"layout_weights": 0.0}, {"layout_weights": 1.0}, {"model": "robust", "layout_weights": 10},
    {"monitor": "loss"}, {"monitor": "accuracy", "min_delta": 0.0},
    {"monitor": "accuracy", "lr_patience": 2}, {"start_from_epoch": 0},
    {"monitor": "accuracy", "start_from_epoch": 5}, {"epochs": 3, "start_from_epoch": 2},
    {"mixup": 0.0}, {"mixup": 0.2}, {"model": "robust", "mixup": 0.4},
    {"model": "robust", "mixup": 1.0, "layout_weights": 20},
    {"chest_crop": True}, {"model": "robust", "two_views": False, "chest_crop": True},
    {"chest_crop": True, "chest_margin": 0.0}, {"chest_crop": True, "chest_margin": 0.49},
    {"chest_crop": False, "jit_compile": True}, {"chest_crop": False, "lung_crop": True},
    {"two_views": True}, {"model": "robust", "two_views": True},
    {"two_views": True, "chest_margin": 0.2}, {"two_views": True, "consistency": 0.0},
    {"two_views": False, "consistency": 12.0, "augment": True},
]


@pytest.mark.parametrize("overrides", VALID_NEW_VALUES)
def test_valid_new_values(overrides):
    _validated(**overrides)


INVALID_NEW_VALUES = [
    ({"zoom": -0.1}, "augment.zoom (--zoom) must be in [0, 1), got -0.1"),
    ({"zoom": 1.0}, "augment.zoom (--zoom) must be in [0, 1)"),
    ({"stretch": -0.1}, "augment.stretch (--stretch) must be in [0, 1), got -0.1"),
    ({"lr_patience": -1}, "train.lr_patience (--lr_patience) must be 0 or more, got -1"),
    ({"lr_patience": 5}, "train.lr_patience (--lr_patience) must be below --patience (5), or "
                         "early stopping ends training first, got 5"),
    ({"lr_patience": 1, "patience": 0}, "must be below --patience (0)"),
    ({"lr_factor": 1.0}, "train.lr_factor (--lr_factor) must be in (0, 1), got 1.0"),
    ({"lr_factor": 0.0}, "train.lr_factor (--lr_factor) must be in (0, 1), got 0.0"),
    ({"lr_factor": -0.5}, "train.lr_factor (--lr_factor) must be in (0, 1)"),
    ({"augment": True, "consistency": -1.0},
     "train.consistency (--consistency) must be 0 or more, got -1.0"),
    ({"consistency": 12.0}, "train.consistency (--consistency) needs --augment (it compares "
                            "augmented views of each image), got 12.0"),
    ({"model": "vanilla", "consistency": 1.0}, "needs --augment"),
    ({"model": "robust", "consistency_fit": "clean"}, "train.consistency_fit "
     "(--consistency_fit) applies only with --consistency above 0, got clean"),
    ({"model": "robust", "two_views": False, "consistency": 1.0, "consistency_fit": "mean"},
     "train.consistency_fit (--consistency_fit) must be one of augmented, clean, both, "
     "got 'mean'"),
    ({"layout_weights": 0.5}, "train.layout_weights (--layout_weights) must be 0 (off) or at "
                              "least 1 (a clip below 1 would flatten every weight), got 0.5"),
    ({"layout_weights": -2.0}, "train.layout_weights (--layout_weights) must be 0 (off) or at "
                               "least 1"),
    ({"mixup": -0.2}, "train.mixup (--mixup) must be 0 (off) or more, got -0.2"),
    ({"start_from_epoch": -1}, "train.start_from_epoch (--start_from_epoch) must be 0 or more "
                               "and below --epochs (1000), or no epoch is kept, got -1"),
    ({"epochs": 3, "start_from_epoch": 3}, "must be 0 or more and below --epochs (3)"),
    ({"monitor": "auc"}, "train.monitor (--monitor) must be one of loss, accuracy, got 'auc'"),
    ({"monitor": "val_loss"}, "train.monitor (--monitor) must be one of loss, accuracy, got "
                              "'val_loss'"),
    ({"stretch": 1.0}, "augment.stretch (--stretch) must be in [0, 1)"),
    ({"aspect": -0.1}, "augment.aspect (--aspect) must be in [0, 0.5), got -0.1"),
    ({"aspect": 0.5}, "augment.aspect (--aspect) must be in [0, 0.5), got 0.5"),
    ({"augment": True, "zoom": 0, "translate": 0, "rotate": 0, "aspect": 0.2,
      "jit_compile": True}, "drop --jit_compile or set --aspect=0"),
    ({"augment": True, "zoom": 0, "translate": 0, "rotate": 0, "stretch": 0.2,
      "jit_compile": True}, "drop --jit_compile or set --stretch=0"),
    ({"translate": 1.5}, "augment.translate (--translate) must be in [0, 1)"),
    ({"rotate": -5}, "augment.rotate (--rotate) must be in [0, 180] degrees"),
    ({"rotate": 181}, "augment.rotate (--rotate) must be in [0, 180] degrees"),
    ({"brightness": 1.1}, "augment.brightness (--brightness) must be in [0, 1]"),
    ({"contrast": 1.0}, "augment.contrast (--contrast) must be in [0, 1)"),
    ({"gamma": 1.0}, "augment.gamma (--gamma) must be in [0, 1)"),
    ({"gamma": -0.2}, "augment.gamma (--gamma) must be in [0, 1)"),
    ({"noise": -0.01}, "augment.noise (--noise) must be in [0, 1]"),
    ({"blur": 11}, "augment.blur (--blur) must be in [0, 10] pixels"),
    ({"fill_mode": "mirror"}, "augment.fill_mode (--fill_mode) must be one of reflect, wrap, "
                              "constant, nearest, got 'mirror'"),
    ({"augment": True, "jit_compile": True}, "runtime.jit_compile (--jit_compile) cannot "
                                             "compile the geometric augmentation"),
    ({"augment": True, "zoom": 0, "translate": 0, "jit_compile": True},
     "drop --jit_compile or set --rotate=0"),
    ({"augment": "yes"}, "--augment must be true or false, got 'yes'"),
    ({"intensity": "clahe"}, "model.intensity (--intensity) must be one of none, equalize, "
                             "percentile, got 'clahe'"),
    ({"percentile_low": -1}, "model.percentile_low (--percentile_low) must be in [0, 100)"),
    ({"percentile_low": 100}, "model.percentile_low (--percentile_low) must be in [0, 100)"),
    ({"percentile_low": 50, "percentile_high": 50},
     "model.percentile_high (--percentile_high) must be above percentile_low and at most 100"),
    ({"percentile_high": 101}, "model.percentile_high (--percentile_high) must be above"),
    ({"border_crop": -0.1}, "model.border_crop (--border_crop) must be in [0, 0.25), got -0.1"),
    ({"border_crop": 0.25}, "model.border_crop (--border_crop) must be in [0, 0.25)"),
    ({"model": "inception", "weights": "none", "image_size": 80, "border_crop": 0.1},
     "model.border_crop (--border_crop) 0.1 leaves 64 px of the 80 px images, below the 75 px "
     "inception needs"),
    ({"architecture": "densenet121", "weights": "none", "image_size": 31},
     "data.image_size (--image_size) must be at least 32 for densenet121, got 31"),
    ({"preprocess": "caffe"}, "model.preprocess (--preprocess) must be one of auto, tutorial, "
                              "inception, torch"),
    ({"group_by": "IM-\\d+"}, "data.group_by (--group_by) needs a capture group"),
    ({"group_by": "(person"}, "data.group_by (--group_by) is not a valid regular expression"),
    ({"val_sources": ["x"], "holdout_sources": ["x"]}, "both name x"),
    ({"val_sources": "x"}, "--val_sources must be a list of strings"),
    ({"model": "robust", "architecture": "resnet"}, "unknown model 'resnet'"),
    ({"lung_margin": 0.5}, "model.lung_margin (--lung_margin) must be in [0, 0.5), got 0.5"),
    ({"lung_margin": -0.1}, "model.lung_margin (--lung_margin) must be in [0, 0.5)"),
    ({"lung_crop": True, "border_crop": 0.05},
     "model.border_crop (--border_crop) must be 0 with --lung_crop"),
    ({"model": "robust", "lung_crop": True}, "must be 0 with --lung_crop"),
    ({"chest_margin": 0.5}, "model.chest_margin (--chest_margin) must be in [0, 0.5), got 0.5"),
    ({"chest_crop": True, "chest_margin": -0.01}, "model.chest_margin (--chest_margin) must be in "
                                                   "[0, 0.5)"),
    ({"chest_crop": True, "lung_crop": True}, "model.chest_crop (--chest_crop) cannot be combined "
                                              "with --lung_crop"),
    ({"chest_crop": True, "jit_compile": True}, "model.chest_crop (--chest_crop) cannot run under "
                                                "--jit_compile"),
    ({"two_views": True, "chest_crop": True}, "model.two_views (--two_views) already reads each "
                                              "film cut by the chest crop"),
    ({"two_views": True, "lung_crop": True}, "model.two_views (--two_views) cannot be combined "
                                             "with --lung_crop"),
    ({"two_views": True, "jit_compile": True}, "model.two_views (--two_views) cannot run under "
                                               "--jit_compile"),
    ({"model": "robust", "chest_crop": True}, "leave --chest_crop off, or add --notwo_views"),
    ({"model": "robust", "lung_crop": True, "border_crop": 0.0},
     "model.two_views (--two_views) cannot be combined with --lung_crop (one crop frames the "
     "lungs: the chest crop per image, or one box from the masks); add --notwo_views"),
    ({"model": "robust", "two_views": True, "consistency": 12.0},
     "model.two_views (--two_views) cannot be combined with --consistency"),
    ({"two_views": True, "chest_margin": 0.5}, "model.chest_margin (--chest_margin) must be in "
                                               "[0, 0.5)"),
]


@pytest.mark.parametrize("overrides, message", INVALID_NEW_VALUES)
def test_invalid_new_values(overrides, message):
    with pytest.raises(ConfigError) as err:
        _validated(**overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["robust", "robust-densenet"])
def test_named_recipes_resolve_and_ship(name):
    """--model=NAME finds configs/NAME.yaml, and setup.py installs it for non-editable installs."""
    import re
    from pathlib import Path
    assert config_lib.experiment_path(name, None).endswith(f"configs/{name}.yaml")
    assert name in config_lib.available_experiments()
    setup = (Path(__file__).resolve().parents[1] / "setup.py").read_text()
    shipped = re.findall(r'"(configs/[^"]+\.yaml)"', setup)
    assert sorted(shipped) == sorted(f"configs/{p.name}"
                                     for p in config_lib.config_dir().glob("*.yaml"))


def test_robust_recipe():
    config = _validated(model="robust")
    assert (config.model.architecture, config.data.image_size) == ("vanilla", 50)
    assert config.augment.augment and config.model.intensity == "equalize"
    assert config.model.border_crop == 0.05 and config.train.class_weights == "balanced"
    assert config.data.group_by == r"(person\d+)_|IM-(\d+)-"
    assert (config.augment.aspect, config.augment.stretch) == (0.3, 0.0)
    assert config.model.two_views and not config.model.chest_crop
    densenet = config_lib.load("robust-densenet")
    assert (densenet.augment.aspect, densenet.augment.stretch) == (0.3, 0.0)
    assert (densenet.model.architecture, densenet.data.image_size, densenet.model.weights) == \
        ("densenet121", 224, "imagenet")
