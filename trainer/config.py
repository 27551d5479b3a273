"""Typed experiment config: dataclass defaults < YAML file < flag overrides.

Everything here is plain Python (no TensorFlow), so a bad key, type or value is
reported in one line before TensorFlow starts.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import sys
import typing
from pathlib import Path
from typing import Any, Mapping

import yaml

from trainer.errors import ConfigError

TUTORIAL_CLASSES = ("COVID-19", "NORMAL", "Viral Pneumonia")
CONFIG_DIR_ENV = "CXR_CONFIG_DIR"


def _field(default: Any, help: str, choices: tuple[str, ...] | None = None,
           flag: bool = True) -> Any:
    """A config field carrying its flag help text, for enums its choices, and whether it is a
    flag (False: the trainer sets it and records it in config.yaml)."""
    meta = {"help": help, "choices": choices, "flag": flag}
    if isinstance(default, (list, tuple)):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass
class DataConfig:
    data_dir: str = _field("", "Training tree (one folder per class), local or gs://. "
                           "Empty: the tutorial's ./covid tree if present, else the built-in demo data.")
    test_dir: str = _field("", "Optional separate test tree of the same layout; "
                           "without it test_per_class images per class are held out.")
    classes: list = _field(TUTORIAL_CLASSES, "Class folder names in label order "
                           "(matched case-insensitively).")
    image_size: int = _field(50, "Images are resized to image_size x image_size.")
    validation_split: float = _field(0.2, "Fraction of the training tree held out for validation.")
    test_per_class: int = _field(40, "Images per class held out for testing when no test_dir is given.")
    seed: int = _field(28, "Seed of the split hash, the shuffle and the weight initialisation.")
    interpolation: str = _field("bilinear", "Resize method for enlargements (antialiased where "
                                "a side shrinks); shrinks average the pixels each output pixel "
                                "covers, except nearest, which samples.",
                                ("bilinear", "nearest", "bicubic", "area"))
    cache: str = _field("auto", "Cache decoded images in memory: auto (when the split fits in "
                        "cache_limit_mb), memory or none. Uncached, image files are shuffled "
                        "before decoding and images stream through.", ("auto", "memory", "none"))
    cache_limit_mb: int = _field(4096, "Memory budget for decoded images, in MiB, per split: the "
                                 "auto cache, and the shuffle buffer when uncached.")
    autotune: bool = _field(False, "tf.data's autotuner. Off, decoding runs on every core and "
                            "prefetch sizes itself; on, passes were held back to the tuner's next "
                            "period here (first epoch 10.3 s instead of 5.4 s; docs/benchmarks.md).")
    check: bool = _field(True, "Check every image before training (decode, size, duplicates, "
                         "leakage across splits).")
    on_bad_image: str = _field("fail", "Unreadable, empty or too small images: fail (listing them) "
                               "or skip (train without them).", ("fail", "skip"))
    on_leak: str = _field("fail", "The same image in two splits: fail or warn.", ("fail", "warn"))
    min_image_side: int = _field(32, "Images whose shorter side is below this many pixels are bad.")
    synthetic: bool = _field(False, "Set by the trainer: the data is its built-in SYNTHETIC demo "
                             "set (drawn shapes, not X-rays); evaluate and predict warn on such a "
                             "run.", flag=False)
    holdout_sources: list = _field((), "Sources (the 'source' column of DATA_DIR/manifest.csv) kept "
                                   "out of training and validation: all their images go to the "
                                   "test split, to measure accuracy on hospitals never seen.")
    group_by: str = _field("", "Patient grouping for the splits: a regular expression searched in "
                           "each file's path inside its class folder; the first capture group "
                           "that matches names the file's group (e.g. a patient), and a group's "
                           "images never fall in two splits. Files it does not match are their "
                           "own group. Empty: every file is its own group (the tutorial).")
    val_sources: list = _field((), "Sources (the 'source' column of DATA_DIR/manifest.csv) whose "
                               "images validate their classes (never trained on), so early "
                               "stopping and the best checkpoint are chosen on a source "
                               "training never saw; classes they lack are validated on "
                               "validation_split of their training images (0: not at all).")


@dataclasses.dataclass
class ModelConfig:
    architecture: str = _field("vanilla", "Model builder from the registry (see trainer/models.py).")
    weights: str = _field("none", "Base weights for transfer models: imagenet, none (trained "
                          "from scratch, with batch-normalisation momentum 0.9 in place of "
                          "Keras' 0.99), or a weights file path (local or gs://).")
    preprocess: str = _field("auto", "Input scaling inside the model: tutorial (x/255), inception "
                             "([-1, 1]), torch (x/255 less ImageNet's mean, over its standard "
                             "deviation, per channel: DenseNet), or auto (the architecture's own "
                             "with ImageNet weights, else tutorial).",
                             ("auto", "tutorial", "inception", "torch"))
    intensity: str = _field("none", "Per-image intensity normalisation inside the model (so "
                            "training, evaluation, prediction and serving share it): none, "
                            "equalize (histogram equalisation over 256 levels) or percentile "
                            "(clip to the image's percentile_low..percentile_high, stretch to "
                            "the full range).", ("none", "equalize", "percentile"))
    percentile_low: float = _field(1.0, "intensity=percentile: the percentile that becomes black.")
    percentile_high: float = _field(99.0, "intensity=percentile: the percentile that becomes "
                                    "white.")
    border_crop: float = _field(0.0, "Fraction of each side cut off inside the model, before "
                                "anything else (burnt-in markers and text sit at the edges): the "
                                "network sees image_size - 2 x round(image_size x border_crop) px.")
    lung_crop: bool = _field(False, "Crop every image to the lung field: the box that holds the "
                             "lungs of 95% of the training images' masks (CLASS/masks/, same "
                             "names) on each side, measured when training starts, recorded as "
                             "model.lung_box and resized back to image_size inside the model, so "
                             "evaluation, prediction and serving need no masks. Replaces "
                             "border_crop.")
    lung_margin: float = _field(0.05, "lung_crop: widen the lung field by this fraction of its "
                                "height and width on each side.")
    lung_box: list[float] = _field((), "Set by the trainer with lung_crop: the lung field's "
                                   "[top, left, bottom, right] as fractions of the image.",
                                   flag=False)
    chest_crop: bool = _field(False, "Crop each image to its own lung field, found in its pixels "
                              "(no masks: the darkest part of the film off its black surround), "
                              "and resize it back, inside the model after border_crop, so every "
                              "film is framed alike; an image where too little is found keeps "
                              "its frame (trainer/chest_crop.py).")
    chest_margin: float = _field(0.05, "chest_crop: widen each image's lung field by this "
                                 "fraction of its height and width on each side.")
    two_views: bool = _field(False, "Read each film twice, whole and cut by the chest crop "
                             "(chest_crop, chest_margin), with two copies of the architecture, "
                             "each trained on its own loss; the model predicts the mean of their "
                             "probabilities (trainer/two_views.py). Twice the work a step.")


@dataclasses.dataclass
class AugmentConfig:
    augment: bool = _field(False, "Random augmentation: layers inside the model after its input, "
                           "active in training only (identity in evaluation, prediction, serving); "
                           "the factors below choose them, 0 turns one off.")
    zoom: float = _field(0.1, "Random zoom in or out by up to this fraction (zooming in crops).")
    stretch: float = _field(0.0, "Random change of the aspect ratio: the height alone zoomed in "
                            "or out by up to this fraction (cxr3's Kermany films were squashed "
                            "to a square, its other sources cropped).")
    aspect: float = _field(0.0, "Random change of the aspect ratio by cropping: per image, up "
                           "to this fraction of the rows or of the columns (one or the other) "
                           "cut off, half from each end, and the rest resized back; nothing "
                           "filled in.")
    translate: float = _field(0.05, "Random shift by up to this fraction of the height and width.")
    rotate: float = _field(5.0, "Random rotation by up to this many degrees either way.")
    brightness: float = _field(0.1, "Random brightness shift by up to this fraction of the range.")
    contrast: float = _field(0.1, "Random contrast factor in [1 - contrast, 1 + contrast], per "
                             "image.")
    gamma: float = _field(0.1, "Random gamma in [1 - gamma, 1 + gamma], per image.")
    noise: float = _field(0.0, "Gaussian noise of this standard deviation (fraction of the range).")
    blur: float = _field(0.0, "Gaussian blur of this sigma in pixels, mixed in by a random "
                         "weight in [0, 1] per image.")
    fill_mode: str = _field("reflect", "How zoom, shift and rotation fill pixels from outside the "
                            "image.", ("reflect", "wrap", "constant", "nearest"))


@dataclasses.dataclass
class TrainConfig:
    batch_size: int = _field(250, "Batch size per replica.")
    epochs: int = _field(1000, "Maximum epochs (EarlyStopping usually ends training sooner).")
    learning_rate: float = _field(0.001, "Adam learning rate.")
    class_weights: str = _field("balanced", "balanced: sklearn weights from the training split; "
                                "none: unweighted.", ("balanced", "none"))
    val_class_weights: str = _field(
        "auto", "Weights of the validation images in val_loss, which early stopping and the "
        "best checkpoint follow with --monitor=loss: balanced (every class counts alike, "
        "from the validation split's own counts; the other val_ metrics still count every "
        "image alike), none (every image alike), or auto: balanced with --val_sources (their "
        "images make the split's class counts arbitrary), none otherwise.",
        ("auto", "balanced", "none"))
    monitor: str = _field("loss", "The validation figure early stopping, the best checkpoint "
                          "and lr_patience follow: loss (lowest; weighted by "
                          "--val_class_weights) or accuracy (highest; every image alike). "
                          "Without a validation split, the training figure.",
                          ("loss", "accuracy"))
    patience: int = _field(5, "EarlyStopping patience in epochs (on the --monitor figure).")
    start_from_epoch: int = _field(0, "Epochs trained before early stopping and the best "
                                   "checkpoint look at the --monitor figure (Keras's "
                                   "start_from_epoch), so a noisy first epoch cannot be kept; "
                                   "0: from the first. Must be below epochs.")
    min_delta: float = _field(0.01, "EarlyStopping minimum improvement of the --monitor figure "
                              "(0.01 of accuracy is a whole point).")
    lr_patience: int = _field(0, "Multiply the learning rate by lr_factor after this many epochs "
                              "without the --monitor figure improving by min_delta "
                              "(ReduceLROnPlateau); 0: off. Must be below patience.")
    lr_factor: float = _field(0.5, "Factor applied to the learning rate by lr_patience, in (0, 1).")
    consistency: float = _field(0.0, "Weight of a consistency loss: the Jensen-Shannon "
                                "divergence of each training image's predictions as it is and "
                                "under two draws of the augmentation (AugMix's), so that what "
                                "augmentation changes cannot change the class; 0: off. Needs "
                                "--augment; a step costs three forward passes.")
    consistency_fit: str = _field("augmented", "With --consistency, the prediction the "
                                  "cross-entropy is computed on: augmented (the first "
                                  "augmented view, as plain augmentation), clean (the image as "
                                  "it is, AugMix's own form) or both (the mean of the two).",
                                  ("augmented", "clean", "both"))
    layout_weights: float = _field(0.0, "Weight each training image by 1 / p, p the "
                                   "probability a logistic regression of its layout (row "
                                   "and column mean profiles) gives its own class, clipped "
                                   "at this value and averaged to 1 per class, so that the "
                                   "layout alone stops paying; 0: off, else at least 1.")
    mixup: float = _field(0.0, "Mixup: blend each training image with another of its batch "
                          "in a share drawn from Beta(mixup, mixup), and its label and weight "
                          "in the same share (trainer/mixup.py); 0: off. Validation and test "
                          "images are never blended.")
    backup_freq: str = _field("epoch", "Back up the training state (model_dir/backup) every "
                              "epoch, or every N steps (a number) for long epochs.")


@dataclasses.dataclass
class RuntimeConfig:
    strategy: str = _field("auto", "tf.distribute strategy.",
                           ("auto", "default", "one_device", "mirrored", "multi_worker"))
    mixed_precision: str = _field("none", "Mixed-precision policy.",
                                  ("none", "mixed_float16", "mixed_bfloat16"))
    jit_compile: bool = _field(False, "Compile the training step with XLA.")
    lr_scaling: str = _field("none", "Learning rate for several replicas: none (as given) or "
                             "linear (learning_rate x replicas).", ("none", "linear"))


@dataclasses.dataclass
class OutputConfig:
    model_dir: str = _field("", "Run directory, local or gs://. Default: ./runs/<model>-<timestamp>.")
    overwrite: bool = _field(False, "Replace a finished run in model_dir instead of refusing.")
    allow_config_change: bool = _field(False, "Resume an interrupted run in model_dir even though "
                                       "the config changed (the changes are logged).")


@dataclasses.dataclass
class Config:
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    runtime: RuntimeConfig = dataclasses.field(default_factory=RuntimeConfig)
    output: OutputConfig = dataclasses.field(default_factory=OutputConfig)


SECTIONS = tuple(f.name for f in dataclasses.fields(Config))


def leaf_fields() -> dict[str, tuple[str, dataclasses.Field]]:
    """Every overridable field by its flag name: name -> (section, field)."""
    leaves = {}
    for section in dataclasses.fields(Config):
        for leaf in dataclasses.fields(section.default_factory()):
            assert leaf.name not in leaves, f"duplicate config leaf {leaf.name}"
            leaves[leaf.name] = (section.name, leaf)
    return leaves


def flag_fields() -> dict[str, tuple[str, dataclasses.Field]]:
    """The leaves that are flags (all but those the trainer sets itself)."""
    return {name: entry for name, entry in leaf_fields().items() if entry[1].metadata["flag"]}


def field_type(section: str, name: str) -> type:
    """The declared type of config field ``section.name`` (int, float, bool, str, list (of
    strings) or list[float])."""
    hints = typing.get_type_hints(type(getattr(Config(), section)))
    return hints[name]


def _coerce(value: Any, kind: type, where: str) -> Any:
    """Checks a YAML or flag value against the field's type (ints pass as floats)."""
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif kind is str:
        ok = isinstance(value, str)
    elif kind == list[float]:
        ok = isinstance(value, list) and all(isinstance(v, (int, float)) and
                                             not isinstance(v, bool) for v in value)
        value = [float(v) for v in value] if ok else value
    else:  # list of strings
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    if not ok:
        raise ConfigError(f"{where} must be {_type_name(kind)}, got {value!r}")
    return value


def _type_name(kind: type) -> str:
    return {bool: "true or false", int: "an integer", float: "a number",
            str: "a string", list[float]: "a list of numbers"}.get(kind, "a list of strings")


def _unknown(key: str, known: typing.Iterable[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"{where}: unknown key {key!r}{hint}")


def from_dict(raw: Mapping[str, Any], source: str, base: Config | None = None) -> Config:
    """Applies a nested {section: {key: value}} mapping on top of ``base``."""
    config = base or Config()
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: expected a mapping of sections {list(SECTIONS)}")
    for section, values in raw.items():
        if section not in SECTIONS:
            raise _unknown(str(section), SECTIONS, source)
        if not isinstance(values, Mapping):
            raise ConfigError(f"{source}: section {section!r} must be a mapping of keys")
        target = getattr(config, section)
        names = [f.name for f in dataclasses.fields(target)]
        for key, value in values.items():
            if key not in names:
                raise _unknown(f"{section}.{key}", [f"{section}.{n}" for n in names], source)
            kind = field_type(section, key)
            setattr(target, key, _coerce(value, kind, f"{source}: {section}.{key}"))
    return config


def config_dir() -> Path:
    """Where ``--model=NAME`` looks for NAME.yaml (env, source tree, or install prefix)."""
    candidates = [os.environ.get(CONFIG_DIR_ENV, ""),
                  str(Path(__file__).resolve().parent.parent / "configs"),
                  os.path.join(sys.prefix, "share", "covid-cxr-trainer", "configs")]
    for candidate in candidates:
        if candidate and Path(candidate, "vanilla.yaml").is_file():
            return Path(candidate)
    raise ConfigError("cannot find the configs folder; set "
                      f"{CONFIG_DIR_ENV} or pass --config=PATH")


def available_experiments() -> list[str]:
    return sorted(p.stem for p in config_dir().glob("*.yaml"))


def read_yaml(path: str) -> Any:
    """Reads a YAML file (local or gs://) into Python objects, with a one-line error."""
    try:
        if path.startswith("gs://"):
            from trainer import storage  # TensorFlow only for bucket paths.
            text = storage.read_text(path)
        else:
            text = Path(path).read_text()
        return yaml.safe_load(text) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{line} is not valid YAML ({getattr(err, 'problem', err)})") from None


def experiment_path(model: str | None, config_path: str | None) -> str:
    """The YAML that ``--model`` or ``--config`` names (vanilla when neither)."""
    if model and config_path:
        raise ConfigError("pass either --model=NAME or --config=PATH, not both")
    if config_path:
        return config_path
    name = model or "vanilla"
    path = config_dir() / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown model '{name}' (--model): choose one of "
                          f"{', '.join(available_experiments())}, or pass --config=PATH")
    return str(path)


def load(model: str | None = None, config_path: str | None = None,
         overrides: Mapping[str, Any] | None = None) -> Config:
    """Defaults < YAML < overrides (flag name -> value; None means not set)."""
    path = experiment_path(model, config_path)
    config = from_dict(read_yaml(path), path)
    leaves = flag_fields()
    for name, value in (overrides or {}).items():
        if value is None:
            continue
        if name not in leaves:
            raise _unknown(name, leaves, "flags")
        section, leaf = leaves[name]
        kind = field_type(section, name)
        setattr(getattr(config, section), name, _coerce(value, kind, f"--{name}"))
    return config


def check_choices(config: Config) -> None:
    for name, (section, leaf) in leaf_fields().items():
        choices = leaf.metadata.get("choices")
        value = getattr(getattr(config, section), name)
        if choices and value not in choices:
            raise ConfigError(f"{section}.{name} (--{name}) must be one of "
                              f"{', '.join(choices)}, got '{value}'")


def border_pixels(image_size: int, border_crop: float) -> int:
    """Pixels cut off each side by ``border_crop`` (rounded half up)."""
    return int(image_size * border_crop + 0.5)


def network_size(config: Config) -> int:
    """The side of the images the network proper sees: image_size less the border crop."""
    size = config.data.image_size
    return size - 2 * border_pixels(size, config.model.border_crop)


def _is_box(box) -> bool:
    """Whether ``box`` is four fractions [top, left, bottom, right] of a non-empty box."""
    try:
        top, left, bottom, right = (float(v) for v in box)
    except (TypeError, ValueError):
        return False
    return 0 <= top < bottom <= 1 and 0 <= left < right <= 1


def _regex_problem(pattern: str) -> str | None:
    """Why ``pattern`` cannot name groups (not a regular expression, no capture group), or None."""
    try:
        compiled = re.compile(pattern)
    except re.error as err:
        return f"is not a valid regular expression ({err})"
    if compiled.groups < 1:
        return "needs a capture group, e.g. 'person(\\d+)_', whose text names the group"
    return None


def validate(config: Config, min_image_sizes: Mapping[str, int]) -> Config:
    """Rejects impossible values with one line naming the key and flag.

    ``min_image_sizes`` maps each registered architecture to its smallest input.
    """
    check_choices(config)
    data, model, train, aug = config.data, config.model, config.train, config.augment
    # the chest crop runs alone or in the second network of two views: one set of rules
    per_film = "model.two_views" if model.two_views else "model.chest_crop"
    no_two_views = "; add --notwo_views" if model.two_views else ""
    rules = [
        (train.epochs >= 1, "train.epochs", "must be at least 1"),
        (train.batch_size >= 1, "train.batch_size", "must be at least 1"),
        (train.learning_rate > 0, "train.learning_rate", "must be positive"),
        (train.patience >= 0, "train.patience", "must be 0 or more"),
        (0 <= train.start_from_epoch < train.epochs, "train.start_from_epoch",
         f"must be 0 or more and below --epochs ({train.epochs}), or no epoch is kept"),
        (train.min_delta >= 0, "train.min_delta", "must be 0 or more"),
        (train.lr_patience >= 0, "train.lr_patience", "must be 0 or more"),
        (train.lr_patience == 0 or train.lr_patience < train.patience, "train.lr_patience",
         f"must be below --patience ({train.patience}), or early stopping ends training first"),
        (0 < train.lr_factor < 1, "train.lr_factor", "must be in (0, 1)"),
        (train.consistency >= 0, "train.consistency", "must be 0 or more"),
        (not train.consistency or aug.augment, "train.consistency",
         "needs --augment (it compares augmented views of each image)"),
        (train.consistency_fit == "augmented" or train.consistency, "train.consistency_fit",
         "applies only with --consistency above 0"),
        (train.layout_weights == 0 or train.layout_weights >= 1, "train.layout_weights",
         "must be 0 (off) or at least 1 (a clip below 1 would flatten every weight)"),
        (train.mixup >= 0, "train.mixup", "must be 0 (off) or more"),
        (train.backup_freq == "epoch" or (train.backup_freq.isdigit()
                                          and int(train.backup_freq) >= 1),
         "train.backup_freq", "must be epoch or a positive number of steps"),
        (0 <= data.validation_split < 1,
         "data.validation_split", "must be in [0, 1)"),
        (data.test_per_class >= 0, "data.test_per_class", "must be 0 or more"),
        (data.min_image_side >= 1, "data.min_image_side", "must be at least 1"),
        (data.cache_limit_mb >= 0, "data.cache_limit_mb", "must be 0 or more"),
        (len(data.classes) >= 2, "data.classes", "needs at least two class names"),
        (len({c.lower() for c in data.classes}) == len(data.classes),
         "data.classes", "has a name twice (names are matched case-insensitively)"),
        (0 <= model.border_crop < 0.25, "model.border_crop", "must be in [0, 0.25)"),
        (0 <= model.lung_margin < 0.5, "model.lung_margin", "must be in [0, 0.5)"),
        (not (model.lung_crop and model.border_crop), "model.border_crop",
         "must be 0 with --lung_crop (the lung field already leaves the borders out)"),
        (0 <= model.chest_margin < 0.5, "model.chest_margin", "must be in [0, 0.5)"),
        (not (model.two_views and model.chest_crop), "model.two_views",
         "already reads each film cut by the chest crop in one of its two networks; leave "
         "--chest_crop off, or add --notwo_views for the chest crop alone"),
        (not ((model.chest_crop or model.two_views) and model.lung_crop), per_film,
         "cannot be combined with --lung_crop (one crop frames the lungs: the chest crop per "
         f"image, or one box from the masks){no_two_views}"),
        (not ((model.chest_crop or model.two_views) and config.runtime.jit_compile), per_film,
         "cannot run under --jit_compile (XLA has no CropAndResize kernel for the chest crop)"),
        (not (model.two_views and train.consistency), "model.two_views",
         "cannot be combined with --consistency (each replaces the training step)"),
        (0 <= model.percentile_low < 100, "model.percentile_low", "must be in [0, 100)"),
        (model.percentile_low < model.percentile_high <= 100, "model.percentile_high",
         "must be above percentile_low and at most 100"),
        (0 <= aug.zoom < 1, "augment.zoom", "must be in [0, 1)"),
        (0 <= aug.stretch < 1, "augment.stretch", "must be in [0, 1)"),
        (0 <= aug.aspect < 0.5, "augment.aspect", "must be in [0, 0.5)"),
        (0 <= aug.translate < 1, "augment.translate", "must be in [0, 1)"),
        (0 <= aug.rotate <= 180, "augment.rotate", "must be in [0, 180] degrees"),
        (0 <= aug.brightness <= 1, "augment.brightness", "must be in [0, 1]"),
        (0 <= aug.contrast < 1, "augment.contrast", "must be in [0, 1)"),
        (0 <= aug.gamma < 1, "augment.gamma", "must be in [0, 1)"),
        (0 <= aug.noise <= 1, "augment.noise", "must be in [0, 1]"),
        (0 <= aug.blur <= 10, "augment.blur", "must be in [0, 10] pixels"),
    ]
    for ok, key, requirement in rules:
        if not ok:
            section, name = key.split(".")
            value = getattr(getattr(config, section), name)
            raise ConfigError(f"{key} (--{name}) {requirement}, got {value}")
    if model.lung_box and not _is_box(model.lung_box):
        raise ConfigError(f"model.lung_box must be [top, left, bottom, right] fractions with "
                          f"0 <= top < bottom <= 1 and 0 <= left < right <= 1, got "
                          f"{model.lung_box}")
    if model.architecture not in min_image_sizes:
        raise ConfigError(f"model.architecture: unknown model '{model.architecture}'; "
                          f"choose one of {', '.join(sorted(min_image_sizes))}")
    smallest = min_image_sizes[model.architecture]
    if data.image_size < smallest:
        raise ConfigError(f"data.image_size (--image_size) must be at least {smallest} for "
                          f"{model.architecture}, got {data.image_size}")
    if network_size(config) < smallest:
        raise ConfigError(f"model.border_crop (--border_crop) {model.border_crop} leaves "
                          f"{network_size(config)} px of the {data.image_size} px images, below "
                          f"the {smallest} px {model.architecture} needs; lower --border_crop "
                          "or raise --image_size")
    problem = data.group_by and _regex_problem(data.group_by)
    if problem:
        raise ConfigError(f"data.group_by (--group_by) {problem}, got {data.group_by!r}")
    geometry = [f"--{k}" for k in ("zoom", "stretch", "aspect", "translate", "rotate")
                if getattr(aug, k)]
    if aug.augment and geometry and config.runtime.jit_compile:
        raise ConfigError(f"runtime.jit_compile (--jit_compile) cannot compile the geometric "
                          f"augmentation of --augment (XLA has no ImageProjectiveTransformV3 or "
                          f"CropAndResize kernel); drop --jit_compile or set "
                          f"{'=0 '.join(geometry)}=0")
    both = sorted(set(data.val_sources) & set(data.holdout_sources))
    if both:
        raise ConfigError(f"data.val_sources (--val_sources) and data.holdout_sources "
                          f"(--holdout_sources) both name {', '.join(both)}: a source is "
                          "either validated on or held out for testing")
    for flag, path in (("data_dir", data.data_dir), ("test_dir", data.test_dir)):
        if path and not path.startswith("gs://") and not os.path.isdir(path):
            raise ConfigError(f"--{flag}: no such directory: {path}")
    weights = model.weights
    if weights not in ("imagenet", "none") and not weights.startswith("gs://") \
            and not os.path.isfile(weights):
        raise ConfigError(f"--weights: expected imagenet, none or a weights file; "
                          f"no such file: {weights}")
    return config


def to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def to_yaml(config: Config) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def from_yaml_text(text: str, source: str) -> Config:
    """Parses a resolved config (e.g. a run's config.yaml)."""
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: is not valid YAML ({err})") from None
    return from_dict(raw, source)
