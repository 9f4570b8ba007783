"""Errors a user can act on. Uncaught, they print as one ``error:`` line (see runtime.py)."""


class S2SError(Exception):
    """Base class: bad options, bad checkpoints, bad input."""


class ConfigError(S2SError, ValueError):
    """Options that are invalid or cannot work together."""


class CheckpointError(S2SError, RuntimeError):
    """A checkpoint that cannot be loaded safely or at all."""
