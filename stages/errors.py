"""Errors a user can fix, and how any error is shown: one line."""
from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input or flags; the message says what to change."""


def one_line(exc: BaseException) -> str:
    """An exception as one line: its type and the last line of its message, whitespace collapsed,
    at most 300 characters. A Ray task error's `cause` is the original exception (its own message
    carries a traceback before the last line)."""
    cause = getattr(exc, "cause", None) or exc
    lines = [line for line in str(cause).splitlines() if line.strip()]
    text = " ".join(lines[-1].split())[:300] if lines else ""
    return f"{type(cause).__name__}: {text}" if text else type(cause).__name__
