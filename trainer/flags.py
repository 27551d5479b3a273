"""absl flags for every config field, defined in one place and shared by the entry points."""
from __future__ import annotations

import os
import sys

from absl import flags

from trainer import config as config_lib
from trainer.errors import ConfigError, ExitStatus

FLAGS = flags.FLAGS

_DEFINERS = {bool: flags.DEFINE_boolean, int: flags.DEFINE_integer,
             float: flags.DEFINE_float, str: flags.DEFINE_string}


def define_config_flags() -> None:
    """One flag per config leaf (default None = 'not set', so YAML values stand)."""
    if "model" in FLAGS:
        return
    flags.DEFINE_string("model", None, "Recipe: configs/NAME.yaml (vanilla, inception, robust, "
                        "robust-densenet); vanilla when neither --model nor --config is given.")
    flags.DEFINE_string("config", None, "A YAML config of the same shape (local or gs://) "
                        "instead of --model.")
    for name, (section, leaf) in config_lib.flag_fields().items():
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
    return {name: FLAGS[name].value for name in config_lib.flag_fields()}


HELP_ARGS = ("-h", "-?", "--help", "--helpshort", "--helpfull")


def parse_or_exit(argv: list[str], usage=None) -> list[str]:
    """absl's parser, with one error line and exit status 2 instead of a usage dump.

    ``--help`` (and -h, --helpshort, --helpfull) prints ``usage`` (a helptext.Usage) with
    the defaults of the --model/--config given beside it, and exits 0.
    """
    wanted = [arg for arg in argv[1:] if arg in HELP_ARGS]
    try:
        rest = FLAGS([argv[0]] + [arg for arg in argv[1:] if arg not in HELP_ARGS])
    except flags.Error as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(ExitStatus.USAGE)
    if not wanted:
        return rest
    from trainer import helptext
    try:
        text = helptext.render(usage) if usage else FLAGS.module_help(__name__)
    except ConfigError as err:  # e.g. --model=NAME of no recipe
        print(f"error: {err}", file=sys.stderr)
        sys.exit(ExitStatus.USAGE)
    try:
        print(text)
        if "--helpfull" in wanted:
            print(f"\n{helptext.render_absl()}")
        sys.stdout.flush()
    except BrokenPipeError:  # e.g. piped into head: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(ExitStatus.OK)
