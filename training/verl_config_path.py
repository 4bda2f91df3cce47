"""Point Hydra at veRL's config folder by file path, so composing a config does not import veRL.

Every shipped config reads veRL's ``ppo_trainer`` through ``hydra.searchpath: [pkg://verl.trainer.config]``. Hydra
resolves a ``pkg://`` path by importing that package, and importing anything under ``verl`` runs
``verl/__init__.py``: torch, tensordict, transformers, datasets - about 10 s on 2 CPU cores, paid before the
config checks of ``train_grpo.py`` can say that a task name is misspelt. The same folder, given as ``file://``,
composes to the same config without that import (``PathFinder.find_spec`` locates a top-level package on
``sys.path`` without executing it). Hydra has no hook to change how ``pkg://`` is resolved, hence this argv rewrite.

Example:
    >>> argv = with_verl_config_searchpath(["train_grpo.py", "trainer.total_training_steps=4"], CONFIG_DIR, "cpu_demo")
    >>> argv[-1].startswith("hydra.searchpath=[file://") and argv[-1].endswith("/verl/trainer/config]")
    True
"""

from __future__ import annotations

from importlib.machinery import PathFinder
from pathlib import Path

__all__ = ["CONFIG_DIR", "VERL_CONFIG_PACKAGE", "verl_config_dir", "with_verl_config_searchpath"]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # train_grpo.py's config_path
VERL_CONFIG_PACKAGE = "pkg://verl.trainer.config"


def verl_config_dir() -> Path | None:
    """veRL's ``trainer/config`` folder, found without importing veRL; None if veRL is not installed as files."""
    spec = PathFinder.find_spec("verl")  # sys.path only: neither sys.modules nor import hooks are consulted
    for root in (spec.submodule_search_locations or []) if spec is not None else []:
        folder = Path(root) / "trainer" / "config"
        if (folder / "ppo_trainer.yaml").is_file():
            return folder
    return None


def _config_name(argv: list[str], default: str) -> str | None:
    for i, arg in enumerate(argv[1:], start=1):
        if arg in ("--config-name", "-cn"):
            return argv[i + 1] if i + 1 < len(argv) else None
        if arg.startswith(("--config-name=", "-cn=")):
            return arg.split("=", 1)[1]
    return default


def with_verl_config_searchpath(argv: list[str], config_dir: Path, default_config: str) -> list[str]:
    """``argv`` plus ``hydra.searchpath=[...]``: the chosen config's own search path, with
    ``pkg://verl.trainer.config`` replaced by that folder's ``file://`` path (other entries kept, in order).

    Left as it is when the command line sets a search path, config path or config dir itself, when the config does
    not use ``pkg://verl.trainer.config``, or when veRL's folder is not found: then Hydra imports the package, as
    before (slower, same result).
    """
    if any(a.startswith(("hydra.searchpath", "--config-dir", "-cd", "--config-path", "-cp")) for a in argv[1:]):
        return argv
    name = _config_name(argv, default_config)
    path = config_dir / f"{name}.yaml" if name else None
    folder = verl_config_dir()
    if path is None or not path.is_file() or folder is None:
        return argv
    from omegaconf import OmegaConf

    try:
        searchpath = OmegaConf.select(OmegaConf.load(path), "hydra.searchpath", default=None)
    except Exception:  # noqa: BLE001 - a config Hydra itself will report on; this is only a shortcut
        return argv
    if not searchpath or VERL_CONFIG_PACKAGE not in list(searchpath):
        return argv
    entries = [f"file://{folder}" if p == VERL_CONFIG_PACKAGE else str(p) for p in searchpath]
    return [*argv, f"hydra.searchpath=[{','.join(entries)}]"]
