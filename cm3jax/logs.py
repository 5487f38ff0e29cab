"""Log hygiene for the CLIs: our progress lines stay readable.

Orbax and Grain log every file they write at INFO through absl; that drowns the
one-line-per-log-step progress of a run. Their records below WARNING are dropped.
"""

from __future__ import annotations

import logging as std_logging

from absl import logging

_NOISY_PACKAGES = ("/orbax/", "/grain/", "/jax/_src/")


class _DropNoisyInfo(std_logging.Filter):
    def filter(self, record: std_logging.LogRecord) -> bool:
        if record.levelno >= std_logging.WARNING:
            return True
        return not any(package in record.pathname for package in _NOISY_PACKAGES)


def quiet_third_party_logs() -> None:
    """Keeps third-party INFO records out of the absl log (warnings and errors still show)."""
    logging.get_absl_handler().addFilter(_DropNoisyInfo())
