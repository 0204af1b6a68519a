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


class BrokenLogits(ModelError):
    """The model's logits hold NaN or infinity: broken weights, or an overflow in a half
    precision. Named apart so the CLI can say which model it was."""

    model = "the model"  # the loaded model's directory, set when it is loaded

    def __init__(self) -> None:
        super().__init__(f"{self.model}: the model's logits are NaN or infinite: its weights are broken, "
                         "or its activations overflow this dtype (try --dtype float32)")
