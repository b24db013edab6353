"""Error types and the exit codes the CLI maps them to.

Every error a user can cause is a ModelgrowError: the CLI prints ``str(err)`` as one line
and exits with ``err.exit_code``. Anything else that escapes is a bug (exit code 1).
"""

from __future__ import annotations

from pathlib import Path

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_BAD_INPUT = 3
EXIT_VERIFY_FAILED = 4
EXIT_OUTPUT = 5


class ModelgrowError(Exception):
    """Base class: a problem the user can act on. Message = where, what, what to do."""

    exit_code = EXIT_INTERNAL

    def __init__(self, message: str, *, path: str | Path | None = None, hint: str | None = None):
        self.path = str(path) if path is not None else None
        self.problem = message
        self.hint = hint
        super().__init__(self._format())

    def located(self, path: str | Path) -> ModelgrowError:
        """Name the file this error is about, where it does not say yet."""
        if self.path is None:
            self.path = str(path)
            self.args = (self._format(),)
        return self

    def _format(self) -> str:
        text = f"{self.path}: {self.problem}" if self.path else self.problem
        if self.hint:
            text = f"{text} ({self.hint})"
        # One line, always: a user's error never spans a screen.
        return " ".join(text.split())


class UsageError(ModelgrowError):
    """Options that cannot work together or a growth spec that cannot be met."""

    exit_code = EXIT_USAGE


class InputError(ModelgrowError):
    """An input file (checkpoint, config, layout, data) is unreadable or inconsistent."""

    exit_code = EXIT_BAD_INPUT


class CheckpointError(InputError):
    """A checkpoint file is malformed, truncated, pickled or disagrees with its config."""


class LayoutError(InputError):
    """An architecture layout does not validate or does not match a checkpoint."""


class VerificationError(ModelgrowError):
    """A growth that promised exactness did not reproduce the source model."""

    exit_code = EXIT_VERIFY_FAILED


class OutputError(ModelgrowError):
    """The destination cannot be written (exists, same as input, disk full, ...)."""

    exit_code = EXIT_OUTPUT
