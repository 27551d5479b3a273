"""absl flags for every config field, defined in one place and shared by the entry points."""
from __future__ import annotations

import sys

from absl import flags

from trainer import config as config_lib
from trainer.errors import ExitStatus

FLAGS = flags.FLAGS

_DEFINERS = {bool: flags.DEFINE_boolean, int: flags.DEFINE_integer,
             float: flags.DEFINE_float, str: flags.DEFINE_string}


def define_config_flags() -> None:
    """One flag per config leaf (default None = 'not set', so YAML values stand)."""
    if "model" in FLAGS:
        return
    flags.DEFINE_string("model", None, "Experiment name: configs/NAME.yaml (vanilla, inception, "
                        "robust, robust-densenet).")
    flags.DEFINE_string("config", None, "Path of a YAML config (local or gs://) instead of --model.")
    for name, (section, leaf) in config_lib.leaf_fields().items():
        kind = config_lib.field_type(section, name)
        choices = leaf.metadata.get("choices")
        help_text = f"[{section}] {leaf.metadata['help']}"
        if choices:
            help_text += f" One of: {', '.join(choices)}."
        _DEFINERS.get(kind, flags.DEFINE_list)(name, None, help_text)


def define_checkpoint_flag() -> None:
    """--checkpoint, shared by the commands that read a finished run (evaluate, predict)."""
    if "checkpoint" not in FLAGS:
        flags.DEFINE_string("checkpoint", "best", "Checkpoint of the run: best, last, or a .keras "
                            "path (local or gs://).")


def overrides() -> dict:
    """The config fields set on the command line."""
    return {name: FLAGS[name].value for name in config_lib.leaf_fields()}


def parse_or_exit(argv: list[str]) -> list[str]:
    """absl's parser, with one error line and exit status 2 instead of a usage dump.

    ``--help`` lists the trainer's flags (defined here, not in the main module) and exits 0.
    """
    if any(arg in ("-h", "--help", "-?") for arg in argv[1:]):
        usage = (sys.modules["__main__"].__doc__ or "").strip()
        print(f"{usage}\n\n{FLAGS.module_help(__name__)}")
        sys.exit(ExitStatus.OK)
    try:
        return FLAGS(argv)
    except flags.Error as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(ExitStatus.USAGE)
