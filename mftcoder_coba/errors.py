"""Errors a user can cause, reported at the edge as one line and a non-zero exit.

Code anywhere may raise :class:`UserError` with a message that already names the place
(``path:line: field 'chat_rounds' missing``, ``config field 'train.lr': must be > 0``); the CLI prints
it as a single line and exits with status 2, instead of a traceback that hides the cause.
"""


class UserError(Exception):
    """A problem in the user's input, data, files or configuration, with a message naming where."""


class ConfigError(UserError):
    """A configuration field that is unknown, missing, of the wrong type or out of range."""
