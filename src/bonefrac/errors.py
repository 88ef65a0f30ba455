"""Errors that mean "the input is wrong", as opposed to bugs.

Every area's user-facing error subclasses :class:`BonefracError`. Entry points
(CLI, flows, service) catch it and show its message alone, without a traceback:
the message already names the problem and the file or key.
"""

from __future__ import annotations


class BonefracError(Exception):
    """Base for bonefrac's own user-facing errors."""


def user_error_types() -> tuple[type[BaseException], ...]:
    """Every exception class whose message is meant for the user."""
    return (BonefracError, FileNotFoundError)
