"""Exceptions raised by `training/`: each names the config key or file at fault and says how to fix it.

The two other layers keep theirs beside their code: :mod:`utils.checkpoint.errors` and :mod:`utils.hub.errors`.
Every class subclasses the closest builtin, so ``except ValueError`` keeps working for callers that expect it.
"""

__all__ = [
    "ConfigError",
    "ResumeError",
    "IncompatibleResumeError",
    "RewardError",
    "MissingRewardKeyError",
    "CurriculumError",
    "TinyModelError",
    "HFRolloutError",
]


class ConfigError(ValueError):
    """A run config value is invalid. Raised before Ray starts; the message names the key, the value and the fix."""


class ResumeError(ConfigError):
    """``resume: required`` cannot be met, or the Hub state cannot be used."""


class IncompatibleResumeError(ResumeError):
    """The Hub snapshot was trained with another model architecture or optimizer."""


class RewardError(ValueError):
    """A reward function was called with inputs it cannot score (a wiring bug, not a bad model answer)."""


class MissingRewardKeyError(RewardError, KeyError):
    """The reward function's extra info lacks a key the curriculum needs (``accuracy``)."""


class CurriculumError(ValueError):
    """The curriculum was fed inconsistent data (scores and data sources of different lengths)."""


class TinyModelError(RuntimeError):
    """The offline tiny model could not be built or its cache is inconsistent."""


class HFRolloutError(RuntimeError):
    """The HF rollout backend was used in a way it does not support, or got weights it cannot load."""
