"""Errors that mean "the input is wrong", as opposed to bugs.

Entry points (CLI, flows, service) catch these and show their message alone,
without a traceback: the message already names the problem and the file or key.
"""

from __future__ import annotations

import importlib


class BonefracError(Exception):
    """Base for bonefrac's own user-facing errors."""


def user_error_types() -> tuple[type[BaseException], ...]:
    """Every exception class whose message is meant for the user.

    Looked up lazily so that importing this module stays cheap and so that
    areas may define their errors where they belong.
    """
    names = [
        ("bonefrac.config", "ConfigError"),
        ("bonefrac.data.imageio", "ImageDecodeError"),
        ("bonefrac.validation.run", "CriticalValidationError"),
        ("bonefrac.training.pretrained", "PretrainedWeightsError"),
    ]
    found: list[type[BaseException]] = [BonefracError, FileNotFoundError]
    for module, attr in names:
        try:
            found.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):
            continue
    return tuple(found)
