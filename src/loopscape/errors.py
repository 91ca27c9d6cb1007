"""Errors that stop a command with one line (the CLI prints them; no traceback).

:class:`~loopscape.config.ConfigError` is a bad setting (exit 2);
:class:`DivergenceError` a run that failed (exit 1). This module imports
nothing heavy, so the CLI can name them before it loads a study.
"""

from loopscape.config import ConfigError


class DivergenceError(RuntimeError):
    """Training produced a NaN or infinite loss or gradient: the run stops and is marked failed."""


class DamagedRunError(ConfigError):
    """A run folder's file is torn, missing or not what was written: refused with one line naming
    the file and what to do (exit 2, as for any bad input)."""
