"""Errors the CLI turns into one line and an exit code, and what may be printed of text that
came from files."""

import unicodedata


class CompressError(Exception):
    """A failure while doing valid work (exit 1): load, write, measure."""

    exit_code = 1


class UsageError(CompressError):
    """Bad input from the user (exit 2): paths, schemes, options, recipes."""

    exit_code = 2


class GateFailed(CompressError):
    """The run finished and wrote its output, but a recipe gate was missed (exit 1)."""


def printable(text: str, newlines: bool = True) -> str:
    """`text` with control characters (terminal escapes, carriage returns, bells) shown as
    escapes instead of acting on the terminal; text from model files, configs and tokenizers
    passes through here before it is printed."""

    def one(c: str) -> str:
        if c == "\n" and newlines:
            return c
        if c == "\t" or unicodedata.category(c) not in ("Cc", "Cf", "Zl", "Zp"):
            return c
        return c.encode("unicode_escape").decode()

    return "".join(one(c) for c in text)


class Terminated(KeyboardInterrupt):
    """SIGTERM (timeout, docker stop, a cancelled CI job): stopped like Ctrl-C."""
