"""Exceptions raised by `training/`: each names the config key or file at fault and says how to fix it."""

__all__ = ["ConfigError", "RewardError", "TinyModelError"]


class ConfigError(ValueError):
    """A run config value is invalid. Raised before Ray starts; the message names the key, the value and the fix."""


class RewardError(ValueError):
    """A reward function was called with inputs it cannot score (a wiring bug, not a bad model answer)."""


class TinyModelError(RuntimeError):
    """The offline tiny model could not be built or its cache is inconsistent."""
