"""One exception hierarchy, mapped to exit codes at the CLI boundary (see cli.main)."""

from __future__ import annotations

from enum import IntEnum


class Exit(IntEnum):
    OK = 0
    FOUND = 1  # the command ran and found something (diff: differences, check: a rule failed)
    ERROR = 2  # usage, unreadable or invalid input, unsafe content


class ParamctlError(Exception):
    """An error the user can act on: printed as one line, exit code 2."""

    exit_code = Exit.ERROR

    def __init__(self, message: str, path: str | None = None):
        self.message = message
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)

    def __reduce__(self) -> tuple:
        return (type(self), (self.message, self.path))

    def about(self, path: str) -> ParamctlError:
        """The same error, naming PATH (what the user typed) instead of the file actually read."""
        return type(self)(self.message, path)


class FormatError(ParamctlError):
    """The file is not a valid checkpoint of the format it claims to be."""


class UnsafeContentError(FormatError):
    """The file holds something paramctl refuses to load (a pickle global outside the allowlist)."""


class UsageError(ParamctlError):
    """The command line asks for something impossible (bad pattern, missing tensor, ...)."""
