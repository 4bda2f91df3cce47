"""GRPO training on reasoning-gym tasks with veRL: data, rewards, curriculum, the upload hook, the CPU plugin.

Importing the package registers the typed config sections with Hydra's ConfigStore (``grpo_sections``, see
:mod:`training.config_schema`), so any ``compose``/``@hydra.main`` that lists them finds them.
"""

from training import config_schema as _config_schema  # noqa: F401 - registers `grpo_sections`
