"""The one exception family for problems a user can cause or fix.

The CLI prints any `PrelabelError` as a single line and exits non-zero; every other
exception is a bug and is reported as such (with the traceback under `--debug`).
"""

from __future__ import annotations


class PrelabelError(Exception):
    """A problem with the user's input, environment or server; its message is one line."""

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint

    def one_line(self) -> str:
        """The message and hint as a single line, as the CLI prints it."""
        text = " ".join(str(self).split())
        if self.hint:
            text += f" (hint: {' '.join(self.hint.split())})"
        return text


class ConfigError(PrelabelError):
    """The configuration file or a command-line override is invalid."""


class InputError(PrelabelError):
    """The data to label cannot be read: a missing folder, an empty folder, and so on."""


class ModelError(PrelabelError):
    """The model or its weights cannot be loaded."""

    exit_code = 3
