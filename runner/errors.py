"""The two kinds of failure the runner reports, mapped to the exit codes of docs/contract.md."""

from .contract import EXIT_BAD_INPUT, EXIT_TRANSIENT


class BadInput(Exception):
    """The input can never succeed as given (spec, data, model, or an output folder that is
    full or not writable): exit 3, do not retry; the user must fix it."""

    exit_code = EXIT_BAD_INPUT


class TransientError(Exception):
    """A failure that a retry may fix (storage unreachable after our own retries): exit 1."""

    exit_code = EXIT_TRANSIENT
