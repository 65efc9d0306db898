"""The errors loco-timm raises for what a user can fix: one family, each class with its command-line exit status.

Every class derives from :class:`LocoError` and from the built-in error it refines (``ValueError``,
``FileNotFoundError``, ``RuntimeError`` ...), so ``except ValueError`` keeps working. The ``loco-timm`` command
prints a :class:`LocoError` as one line and exits with its :attr:`~LocoError.exit_code`; any other exception is a
bug and keeps its traceback (exit status 1).
"""
from __future__ import annotations

__all__ = ['LocoError', 'ConfigError', 'DataError', 'DataNotFoundError', 'UnreadableImageError',
           'MissingDependencyError', 'DamagedFileError', 'MissingFileError', 'OutputExistsError', 'NonFiniteLossError',
           'Preempted', 'PREEMPTED_EXIT', 'PretrainedWeightsNotFound', 'PublishError']

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: run the same command again with --resume


class LocoError(Exception):
    """A problem in the user's input, data or files; the message names it and the fix."""
    exit_code = 2


class ConfigError(LocoError, ValueError):
    """A recipe, option or argument value is invalid."""


class DataError(LocoError, ValueError):
    """A dataset gives something other than what it announced (no images, more images than its length ...)."""


class DataNotFoundError(LocoError, FileNotFoundError):
    """A dataset, split or data folder is missing."""


class UnreadableImageError(LocoError, RuntimeError):
    """An image of the dataset cannot be decoded (training stops; the last checkpoint is kept)."""
    exit_code = 1


class MissingDependencyError(LocoError, ImportError):
    """What the user asked for needs an optional package that is not installed; the message names it."""


class DamagedFileError(LocoError, ValueError):
    """A checkpoint, result or export file fails its check or cannot be read; the message says how to redo it."""


class MissingFileError(LocoError, FileNotFoundError):
    """A file or folder the command needs is missing: a checkpoint, a readout, an export."""


class OutputExistsError(LocoError, FileExistsError):
    """An output folder that must be new already holds files."""


class NonFiniteLossError(LocoError, RuntimeError):
    """A unit's loss became NaN or infinite on some process; every process stops."""
    exit_code = 1


class Preempted(LocoError, RuntimeError):
    """Training stopped on SIGTERM/SIGINT after writing a checkpoint; ``--resume`` continues it."""
    exit_code = PREEMPTED_EXIT


class PretrainedWeightsNotFound(LocoError, RuntimeError):
    """``pretrained=True`` on a tag whose weights the Hub (or the mirror at ``HF_ENDPOINT``) does not have."""


class PublishError(LocoError, RuntimeError):
    """The Hub refused or failed an upload."""
    exit_code = 1
