"""The edge every entry point shares: logging set-up, absl flag parsing, and turning a
TrainerError into one ``error:`` line on stderr and its exit status."""
from __future__ import annotations

import functools
import logging as py_logging
import os
import sys
from typing import Callable

from absl import app, logging

from trainer import flags as trainer_flags, tf_log
from trainer.errors import ExitStatus, TrainerError


class _QuietTensorFlow(py_logging.Filter):
    """Drops TensorFlow's own INFO chatter (e.g. one line per checkpoint) from the absl log."""

    def filter(self, record: py_logging.LogRecord) -> bool:
        return record.levelno >= py_logging.WARNING or \
            f"{os.sep}tensorflow{os.sep}" not in record.pathname


def setup_logging(verbosity: int = logging.INFO) -> None:
    logging.set_verbosity(verbosity)
    logging.get_absl_handler().addFilter(_QuietTensorFlow())  # also what the tensorflow logger sends


def guarded(body: Callable[[list[str]], int | None], positional: bool = False,
            verbosity: int = logging.INFO) -> Callable[[list[str]], int]:
    """An absl ``main`` that runs ``body(argv)`` and maps TrainerError to its exit status."""
    def main(argv: list[str]) -> int:
        if not positional and len(argv) > 1:
            print(f"error: unexpected arguments: {' '.join(argv[1:])}", file=sys.stderr)
            return ExitStatus.USAGE
        setup_logging(verbosity)
        try:
            status = body(argv)
        except TrainerError as err:
            print(f"error: {err}", file=sys.stderr)
            return err.exit_status
        return ExitStatus.OK if status is None else status
    return main


def run(body: Callable[[list[str]], int | None], usage=None, **options) -> None:
    """Parses the flags (one error line, exit 2 on bad ones; ``--help`` prints ``usage``, a
    helptext.Usage) and runs ``body``, with TensorFlow's start-up notices kept off the
    console (see tf_log)."""
    tf_log.quiet()
    app.run(guarded(body, **options),
            flags_parser=functools.partial(trainer_flags.parse_or_exit, usage=usage))
