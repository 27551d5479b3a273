"""``python -m trainer.task``: train a chest X-ray classifier.

Flags -> Config -> train.run(config). Config problems are reported before TensorFlow is
imported; any TrainerError ends the process with one line and its exit status (see
trainer/errors.py). Every config key is a flag; YAML < flags.
"""
from __future__ import annotations

import os

from absl import logging

from trainer import cli, config as config_lib, demo_data, flags as trainer_flags, helptext, \
    models

TUTORIAL_TRAIN_DIR = os.path.join("covid", "COVID-19 Radiography Database")
TUTORIAL_TEST_DIR = os.path.join("covid", "COVID-19 Radiography Database Test")

trainer_flags.define_config_flags()

USAGE = helptext.Usage(
    ("python -m trainer.task [--model=vanilla|inception | --config=FILE] [--FLAG=VALUE ...]",
     "python -m trainer.task --model=vanilla --data_dir=/data/cxr --epochs=20",
     "python -m trainer.task --model=inception --help    (this help, with inception's defaults)"),
    ("model", "config", *config_lib.flag_fields()))


def resolve_default_data(config: config_lib.Config) -> config_lib.Config:
    """No --data_dir: the tutorial's ./covid tree if it exists, else the synthetic demo set."""
    data = config.data
    if data.data_dir:
        return config
    if os.path.isdir(TUTORIAL_TRAIN_DIR):
        data.data_dir = TUTORIAL_TRAIN_DIR
        if not data.test_dir and os.path.isdir(TUTORIAL_TEST_DIR):
            data.test_dir = TUTORIAL_TEST_DIR
        logging.info("no --data_dir: using the tutorial's tree %s", data.data_dir)
        return config
    data.data_dir = str(demo_data.ensure_demo_dataset())
    logging.warning("no --data_dir and no ./%s: training on the built-in SYNTHETIC demo data "
                    "in %s (drawn shapes, not medical images)", TUTORIAL_TRAIN_DIR, data.data_dir)
    return config


def build_config() -> config_lib.Config:
    flags = trainer_flags.FLAGS
    config = config_lib.load(flags.model, flags.config, trainer_flags.overrides())
    config = config_lib.validate(config, models.min_image_sizes())
    config = resolve_default_data(config)
    config.data.synthetic = demo_data.is_demo_tree(config.data.data_dir)  # recorded in config.yaml
    if not config.output.model_dir:
        from trainer.train import default_model_dir
        config.output.model_dir = default_model_dir(config.model.architecture)
    return config


def train_from_flags(argv: list[str]) -> None:
    config = build_config()
    from trainer import train  # TensorFlow starts here, after the config is known good.
    models.resolve_base_weights(config.model)  # a download that fails leaves no run behind
    train.run(config)
    if config.data.synthetic:
        logging.warning("these metrics are on the SYNTHETIC demo data (drawn shapes, not "
                        "X-rays); evaluate and predict on %s will say so", config.output.model_dir)


def run() -> None:
    cli.run(train_from_flags, usage=USAGE)


if __name__ == "__main__":
    run()
