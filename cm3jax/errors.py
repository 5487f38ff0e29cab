"""User-facing errors: each becomes one clear line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import sys
from typing import Callable, NoReturn

USAGE_EXIT_CODE = 2


class UserError(Exception):
    """Bad input from the user (config, flag, file): reported as one line, exit code 2."""


class ConfigError(UserError):
    """A config field has a value that cannot work; the message names the field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"config.{field}: {message}")
        self.field = field


def exit_on_user_error(main: Callable[[], None]) -> Callable[[], None]:
    """Wraps a CLI main so a UserError prints `error: ...` and exits 2 instead of a traceback."""

    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            die(str(e))

    return wrapped


def die(message: str) -> NoReturn:
    """Prints one error line to stderr and exits with the usage code."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(USAGE_EXIT_CODE)
