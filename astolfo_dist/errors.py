"""Typed errors. The CLI maps them to exit codes; nothing below the CLI prints or exits."""

from __future__ import annotations


class AstolfoError(Exception):
    """Base of every error the engine raises on purpose."""

    exit_code = 1


class InputError(AstolfoError):
    """A model file, folder, URL or recipe that cannot be used. Names the file (and key)."""

    exit_code = 2

    def __init__(self, source: str, message: str, key: str | None = None) -> None:
        self.source = source
        self.key = key
        self.detail = message
        where = f"{source}: tensor {key!r}" if key is not None else source
        super().__init__(f"{where}: {message}")


class UsageError(AstolfoError):
    """Options that contradict each other or the inputs."""

    exit_code = 2


class OutputExistsError(UsageError):
    """The output exists and --overwrite was not given."""


class MergeCancelled(AstolfoError):
    """The merge was interrupted (Ctrl-C); the partial output was removed."""

    exit_code = 130
