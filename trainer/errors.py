"""Errors the user can act on, and the process exit statuses they map to.

The statuses are part of the interface: the Kubernetes Jobs' podFailurePolicy
fails fast on USAGE and DATA and retries PREEMPTED.
"""
import enum


class ExitStatus(enum.IntEnum):
    OK = 0
    FAILURE = 1  # a runtime failure (a bug, a crashed step, NaN loss)
    USAGE = 2  # bad flags or config: retrying will not help
    DATA = 3  # bad or missing input data: retrying will not help
    PREEMPTED = 75  # stopped by SIGTERM after saving a backup: retry (EX_TEMPFAIL)


class TrainerError(Exception):
    """An error with a one-line, actionable message and an exit status."""

    exit_status = ExitStatus.FAILURE


class ConfigError(TrainerError):
    """A flag, YAML key or value that cannot work."""

    exit_status = ExitStatus.USAGE


class DataError(TrainerError):
    """Input data that is missing, unreadable or inconsistent."""

    exit_status = ExitStatus.DATA


class RunDirError(TrainerError):
    """A model_dir that cannot be used as asked (finished run, unwritable)."""

    exit_status = ExitStatus.USAGE


class Preempted(TrainerError):
    """Training stopped on SIGTERM after saving its backup."""

    exit_status = ExitStatus.PREEMPTED
