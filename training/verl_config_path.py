"""Point Hydra at veRL's config folder by file path, so composing a config does not import veRL.

Every shipped config reads veRL's ``ppo_trainer`` through ``hydra.searchpath: [pkg://verl.trainer.config]``. Hydra
resolves a ``pkg://`` path by importing that package, and importing anything under ``verl`` runs
``verl/__init__.py``: torch, tensordict, transformers, datasets - about 10 s on 2 CPU cores, paid before the
config checks of ``train_grpo.py`` can say that a task name is misspelt. The same folder, given as ``file://``,
composes to the same config without that import (``PathFinder.find_spec`` locates a top-level package on
``sys.path`` without executing it). Hydra has no hook to change how ``pkg://`` is resolved, hence this argv rewrite.

Example:
    >>> argv = with_verl_config_searchpath(["train_grpo.py", "trainer.total_training_steps=4"])
    >>> argv[-1].startswith("hydra.searchpath=[file://") and argv[-1].endswith("/verl/trainer/config]")
    True
"""

from __future__ import annotations

from importlib.machinery import PathFinder
from pathlib import Path

__all__ = ["verl_config_dir", "with_verl_config_searchpath"]


def verl_config_dir() -> Path | None:
    """veRL's ``trainer/config`` folder, found without importing veRL; None if veRL is not installed as files."""
    spec = PathFinder.find_spec("verl")  # sys.path only: neither sys.modules nor import hooks are consulted
    for root in (spec.submodule_search_locations or []) if spec is not None else []:
        folder = Path(root) / "trainer" / "config"
        if (folder / "ppo_trainer.yaml").is_file():
            return folder
    return None


def with_verl_config_searchpath(argv: list[str]) -> list[str]:
    """``argv`` plus ``hydra.searchpath=[file://<veRL>/trainer/config]`` (the shipped configs' ``pkg://`` path).

    Left as it is when the command line sets the search path or a config dir itself, or veRL's folder is not found
    (then Hydra imports the package, as before: slower, same result).
    """
    if any(a.startswith(("hydra.searchpath", "--config-dir", "-cd")) for a in argv[1:]):
        return argv
    folder = verl_config_dir()
    return argv if folder is None else [*argv, f"hydra.searchpath=[file://{folder}]"]
