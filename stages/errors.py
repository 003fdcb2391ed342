"""Errors a user can fix; the CLI prints them as one line."""


class UserError(Exception):
    """A mistake in the user's input or flags; the message says what to change."""
