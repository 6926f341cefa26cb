"""Errors the CLI turns into one line and an exit code."""


class CompressError(Exception):
    """A failure while doing valid work (exit 1): load, write, measure."""

    exit_code = 1


class UsageError(CompressError):
    """Bad input from the user (exit 2): paths, schemes, options, recipes."""

    exit_code = 2


class GateFailed(CompressError):
    """The run finished and wrote its output, but a recipe gate was missed (exit 1)."""
