"""A finished run directory (local or gs://): its resolved config and a checkpoint, for the
entry points that use a trained model (evaluate, predict). TensorFlow is imported inside the
functions, so an entry point parses its flags and prints its help before TensorFlow starts."""
from __future__ import annotations

from trainer import config as config_lib
from trainer.config import Config
from trainer.errors import ConfigError

CHECKPOINT_NAMES = ("best", "last")


def read_config(model_dir: str) -> Config:
    """The run's config.yaml; a ConfigError naming --model_dir when there is none."""
    from trainer import storage
    if not model_dir:
        raise ConfigError("--model_dir is required: the run directory to use")
    path = storage.join(model_dir, "config.yaml")
    if not storage.exists(path):
        raise ConfigError(f"--model_dir {model_dir} holds no run (no config.yaml); "
                          "pass the folder that training wrote")
    return config_lib.from_yaml_text(storage.read_text(path), path)


def synthetic_warning(config: Config, model_dir: str) -> str | None:
    """The warning for a run trained on the built-in synthetic demo data (recorded in its
    config.yaml, or, for runs from before that, recognised by its data folder); else None."""
    from trainer import demo_data
    if not (config.data.synthetic or demo_data.is_demo_tree(config.data.data_dir)):
        return None
    return (f"{model_dir} was trained on the built-in SYNTHETIC demo data (drawn shapes, not "
            "X-rays): its outputs say nothing about real chest X-rays. Train on your own images "
            "with --data_dir")


def checkpoint_path(model_dir: str, checkpoint: str) -> str:
    """best | last -> RUN/checkpoints/NAME.keras; anything else is a .keras path."""
    from trainer import storage
    if checkpoint in CHECKPOINT_NAMES:
        return storage.join(model_dir, "checkpoints", f"{checkpoint}.keras")
    return checkpoint


def load_model(path: str):
    """A .keras checkpoint (local or gs://), with a one-line error if it cannot be read."""
    from trainer import checkpoints, storage
    if not storage.exists(path):
        raise ConfigError(f"--checkpoint: no such checkpoint: {path}")
    try:
        return checkpoints.load(path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"--checkpoint: cannot load {path}: "
                          f"{str(err).splitlines()[0][:200]}") from None


def check_model_fits(model, config: Config, path: str) -> None:
    """The checkpoint's input size and outputs must match the config's image size and classes."""
    _, height, width, _ = model.input_shape
    classes = model.output_shape[-1]
    size = config.data.image_size
    if (height, width) != (size, size) or classes != len(config.data.classes):
        raise ConfigError(f"{path} takes {height}x{width} images and has {classes} outputs, but "
                          f"the run's config says {size}x{size} and "
                          f"{len(config.data.classes)} classes")
