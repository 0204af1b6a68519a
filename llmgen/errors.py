"""Errors a user can cause, each with the exit code the CLI returns for it.

Anything raised that is not one of these is a bug in llmgen: the CLI shows it as an
internal error, with a traceback only under ``--debug``.
"""


class LlmgenError(Exception):
    """A runtime problem the user can fix (a model file, a device): exit code 1."""

    exit_code = 1


class UsageError(LlmgenError):
    """A flag or argument out of its allowed range: exit code 2, like a shell usage error."""

    exit_code = 2


class ModelError(LlmgenError):
    """A model directory that cannot be loaded; the message names the file or tensor."""


class OutputClosed(Exception):
    """stdout's reader went away (``llmgen ... | head``). Not an OSError on purpose: the
    CLI framework turns EPIPE into exit code 1, and a closed pipe should end quietly."""
