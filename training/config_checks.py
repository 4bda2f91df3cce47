"""Validate a composed run config before Ray starts.

A typo in a dataset or reward name used to surface minutes into a run (after Ray, the workers and the model were up),
or never. `check_run_config` reads only the sections this project adds or relies on, and raises `ConfigError`
naming the key, the bad value and the fix. It builds nothing heavy: dataset configs are constructed and validated,
no dataset items are generated and no model is loaded.

Example:
    >>> check_run_config({"reasoning_gym": {"datasets": {"chain_summ": {"weight": 1}}},
    ...                   "actor_rollout_ref": {"model": {"path": "tiny://qwen2"}}})
    Traceback (most recent call last):
    ...
    training.errors.ConfigError: reasoning_gym.datasets.chain_summ: unknown reasoning-gym dataset; did you mean 'chain_sum' or 'decimal_chain_sum'? (list them with `python -c "import reasoning_gym.factory as f; print(sorted(f.DATASETS))"`)
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

from training.config_schema import to_plain
from training.errors import ConfigError

__all__ = ["TINY_MODEL_PATHS", "check_run_config"]

TINY_MODEL_PATHS = ("tiny://qwen2", "tiny://qwen2-warm")
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _select(cfg: Any, key: str) -> Any:
    """`cfg[key]` for a dotted key (dicts or OmegaConf, interpolations resolved), None if absent."""
    node = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    return to_plain(OmegaConf.select(node, key, default=None))


def _check_datasets(rg: Mapping[str, Any]) -> list[str]:
    """Check `reasoning_gym`; return the names of datasets with weight > 0."""
    from reasoning_gym.factory import DATASETS
    from reasoning_gym.utils import SYSTEM_PROMPTS

    from training.config_schema import split_seeds

    datasets = rg.get("datasets")
    if not isinstance(datasets, Mapping) or not datasets:
        raise ConfigError("reasoning_gym.datasets is empty: add at least one `<name>: {weight: 1, config: {}}`")
    active = []
    for name, spec in datasets.items():
        key = f"reasoning_gym.datasets.{name}"
        if name not in DATASETS or name == "composite":
            close = difflib.get_close_matches(str(name), [n for n in DATASETS if n != "composite"], n=3, cutoff=0.6)
            hint = f"did you mean {' or '.join(repr(c) for c in close)}?" if close else "no close match"
            raise ConfigError(
                f"{key}: unknown reasoning-gym dataset; {hint} (list them with "
                '`python -c "import reasoning_gym.factory as f; print(sorted(f.DATASETS))"`)'
            )
        spec = spec or {}
        if not isinstance(spec, Mapping):
            raise ConfigError(f"{key}={spec!r}: expected {{weight: <float>, config: {{...}}}}")
        weight = spec.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise ConfigError(f"{key}.weight={weight!r}: expected a number >= 0")
        if weight < 0:
            raise ConfigError(f"{key}.weight={weight}: weights must be >= 0 (0 disables the dataset)")
        unknown = set(spec) - {"weight", "config"}
        if unknown:
            raise ConfigError(f"{key}: unknown key(s) {sorted(unknown)}; a dataset takes `weight` and `config`")
        ds_config = spec.get("config") or {}
        config_cls = DATASETS[name][1]
        try:
            built = config_cls(**ds_config)
            if hasattr(built, "validate"):
                built.validate()
        except TypeError as e:
            fields = sorted(getattr(config_cls, "__dataclass_fields__", {}))
            raise ConfigError(f"{key}.config={ds_config}: {e}; {name} accepts {fields}") from e
        except (ValueError, AssertionError) as e:
            raise ConfigError(f"{key}.config={ds_config}: rejected by {config_cls.__name__}: {e}") from e
        if weight > 0:
            active.append(name)
    if not active:
        raise ConfigError(
            f"reasoning_gym.datasets: every weight is 0 ({sorted(datasets)}); give at least one dataset a weight > 0"
        )
    prompt = rg.get("developer_prompt", "DeepSeekZero")
    if prompt not in SYSTEM_PROMPTS:
        close = difflib.get_close_matches(str(prompt), SYSTEM_PROMPTS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"reasoning_gym.developer_prompt={prompt!r}: not in reasoning_gym.utils.SYSTEM_PROMPTS; "
            f"use one of {sorted(SYSTEM_PROMPTS)}{hint}"
        )
    for size_key in ("dataset_size", "val_size"):
        size = rg.get(size_key)
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size <= 0):
            raise ConfigError(f"reasoning_gym.{size_key}={size!r}: expected a positive int")
    split_seeds(rg)
    return active


def _check_model_path(path: Any, key: str) -> None:
    if not isinstance(path, str) or not path:
        raise ConfigError(f"{key}={path!r}: set it to a local HF model dir, a Hub id (org/name) or tiny://qwen2")
    if path.startswith("tiny://"):
        if path not in TINY_MODEL_PATHS:
            raise ConfigError(f"{key}={path!r}: unknown built-in model; use one of {list(TINY_MODEL_PATHS)}")
        return
    local = os.path.expanduser(path)
    if os.path.isdir(local):
        if not os.path.isfile(os.path.join(local, "config.json")):
            raise ConfigError(f"{key}={path!r}: the directory has no config.json; point it at a HF model directory")
        return
    if path.startswith(("/", ".", "~")) or not _HUB_ID_RE.match(path):
        raise ConfigError(
            f"{key}={path!r}: no such directory, and not a Hub model id (org/name); fix the path, "
            "or use tiny://qwen2 for the offline demo model"
        )


def _check_reward(cfg: Any) -> None:
    from training.rewards import validate_reward_config

    fn = _select(cfg, "reward.custom_reward_function") or {}
    if re.search(r"training[./]rewards", str(fn.get("path") or "")):
        validate_reward_config(fn.get("reward_kwargs") or {})
    # The original trainer's keys (`reward.use_accuracy`, `reward.secondary_rewards`), if a config keeps them beside
    # veRL's own reward settings; length rewards then count with the model's tokenizer up to max_response_length.
    reward = _select(cfg, "reward") or {}
    top = {k: reward[k] for k in ("use_accuracy", "secondary_rewards") if k in reward}
    if top:
        defaults = {
            "tokenizer_path": _select(cfg, "actor_rollout_ref.model.path"),
            "max_response_tokens": _select(cfg, "data.max_response_length"),
        }
        validate_reward_config({**defaults, **top}, key="reward")


def _check_curriculum(cfg: Any, active: list[str]) -> None:
    from training.curriculum import curriculum_section, make_curricula

    cur = _select(cfg, "curriculum")
    if not cur or not cur.get("enabled", False):
        return
    section = curriculum_section(cur)
    if not section["curricula"]:
        raise ConfigError(
            "curriculum.enabled=true but curriculum.curricula is empty; add `<dataset>: "
            "{attribute_levels: {'*': 0}}` or set curriculum.enabled=false"
        )
    make_curricula(section, active)
    workers = _select(cfg, "data.dataloader_num_workers")
    if isinstance(workers, int) and workers > 0:
        raise ConfigError(
            f"data.dataloader_num_workers={workers} with curriculum.enabled=true: dataloader workers keep their own "
            "copy of the datasets and would not see level changes; set data.dataloader_num_workers=0"
        )


def check_run_config(cfg: Any) -> None:
    """Check a composed training config; call it before Ray starts.

    Args:
        cfg: The whole run config (Hydra `DictConfig` or a plain dict).

    Raises:
        ConfigError: Naming the key, the bad value and the fix, for: a missing or empty `reasoning_gym` section,
            an unknown dataset (with close matches), a negative weight or all weights 0, a per-dataset config the
            dataset rejects, a `developer_prompt` not in `SYSTEM_PROMPTS`, a val seed that repeats train items,
            a missing model path, an unknown or misconfigured reward, a curriculum for a dataset that is not in
            the mix or has no reasoning-gym curriculum, bad curriculum attributes/levels/thresholds, or dataloader
            workers with a curriculum.
    """
    rg = _select(cfg, "reasoning_gym")
    if not isinstance(rg, Mapping):
        raise ConfigError("reasoning_gym section is missing: add `reasoning_gym: {datasets: {...}}` to the config")
    active = _check_datasets(rg)
    _check_model_path(_select(cfg, "actor_rollout_ref.model.path"), "actor_rollout_ref.model.path")
    _check_reward(cfg)
    _check_curriculum(cfg, active)
