"""The project's three config sections, typed once: ``reasoning_gym``, ``curriculum`` and ``hf_upload``.

Each section is a dataclass whose defaults are the only place those defaults are written. They are registered with
Hydra's ConfigStore as ``grpo_sections`` (shipped configs list it in their defaults, right after veRL's
``ppo_trainer``), so Hydra/OmegaConf itself rejects an unknown key or a wrong type, naming it::

    $ python train_grpo.py hf_upload.privat=true
    Could not override 'hf_upload.privat'. ... Key 'privat' not in 'HfUploadConfig'

A user's own config that does not list ``grpo_sections`` gets the same check from :func:`apply_schema`, which the
entry point calls before anything else. Value checks that need reasoning-gym (dataset names, curriculum attributes)
stay in :mod:`training.config_checks`. This module imports neither veRL nor Ray.

Example:
    >>> from omegaconf import OmegaConf
    >>> cfg = apply_schema(OmegaConf.create({"hf_upload": {"enabled": True}}))
    >>> cfg.hf_upload.strategy, cfg.hf_upload.private, cfg.curriculum.last_k
    ('end', True, 20)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from training.errors import ConfigError

__all__ = [
    "SCHEMA_NAME",
    "DatasetEntry",
    "ReasoningGymConfig",
    "ScheduleConfig",
    "CurriculumConfig",
    "HfUploadConfig",
    "ProjectSections",
    "SECTIONS",
    "apply_schema",
    "section_defaults",
    "typed_section",
    "DEFAULTS",
    "reasoning_gym_section",
    "split_seeds",
    "to_plain",
]

SCHEMA_NAME = "grpo_sections"


@dataclass
class DatasetEntry:
    """One reasoning-gym dataset of the mix."""

    weight: float = 1.0  # relative sampling weight; 0 disables the dataset
    config: dict[str, Any] = field(default_factory=dict)  # keyword arguments of its config class


@dataclass
class ReasoningGymConfig:
    """``reasoning_gym``: which tasks, how many items, which system prompt (read by :mod:`training.data`)."""

    dataset_size: int = 20000  # train items per epoch
    val_size: int | None = None  # None: same as dataset_size
    seed: int = 1
    val_seed: int | None = None  # None: seed + dataset_size, so no val item repeats a train item
    developer_prompt: str = "DeepSeekZero"  # a key of reasoning_gym.utils.SYSTEM_PROMPTS
    developer_role: str = "system"
    # Each value has the fields of DatasetEntry, checked by training.data. Typed as Any on purpose: with
    # dict[str, DatasetEntry], Hydra's `+reasoning_gym.datasets.NEW.weight=1` first assigns {} to NEW, which
    # OmegaConf refuses, so a user could not add a dataset from the command line.
    datasets: dict[str, Any] = field(default_factory=dict)


@dataclass
class ScheduleConfig:
    """``curriculum.schedule``: ``automatic: true`` = fixed schedule (the original trainer's meaning)."""

    automatic: bool = False
    update_steps: int = 30  # with automatic: level up every this many steps


@dataclass
class CurriculumConfig:
    """``curriculum``: move reasoning-gym difficulty levels during training (see :mod:`training.curriculum`)."""

    enabled: bool = False
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    last_k: int = 20  # window of per-completion accuracy scores, per dataset
    success_threshold: float = 0.7  # window mean above this: level up
    failure_threshold: float = 0.1  # window mean below this: level down
    mode: str = "inclusive"  # range attributes: inclusive | upper_bound | last_k
    curricula: dict[str, Any] = field(default_factory=dict)  # {dataset: {attribute_levels: {...}}}


@dataclass
class HfUploadConfig:
    """``hf_upload``: push consolidated checkpoints to the Hub (see :mod:`training.hub_upload`).

    ``bootstrap_from`` is deliberately not a field: it is added as ``+hf_upload.bootstrap_from=PATH``.
    """

    enabled: bool = False
    repo_id: str | None = None  # user/name, org/name, or name with organization
    organization: str | None = None
    private: bool = True  # a public repo is announced loudly at preflight
    optimizer_save_mode: str | None = None  # "full": also push a name-keyed optimizer.pt
    strategy: str = "end"  # end | every_save | checkpoint
    weights_format: str = "bin"  # bin | safetensors
    dtype: str = "auto"  # auto = the checkpoint's own config dtype | bf16 | fp16 | fp32
    endpoint: str | None = None  # default HF_ENDPOINT or huggingface.co
    token: str | None = None  # discouraged: use HF_TOKEN; moved there and redacted if given
    fail_on_error: bool = False  # a failed upload fails the run
    max_shard_size: Any = "5GB"  # largest weight file: "5GB", "500MB" or bytes
    namespace: str | None = None  # subfolder of the repo for this experiment
    resume: str = "auto"  # auto | required | never (with strategy=checkpoint)
    lora: str = "adapter"  # LoRA runs: adapter (PEFT folder) | merged | both
    request_timeout: float = 120.0  # s one Hub request may stall (connect 10 s) before it fails and is retried
    max_attempts: int = 4  # tries of each Hub commit or read (backoff 2 s, doubling, jittered) before an upload fails
    final_wait_timeout: float = 10800.0  # s the run waits for its last upload; then upload_pending.json is left
    # The model card's base model: a Hub id (metadata + link) or tiny://...; default actor_rollout_ref.model.path as
    # written (recorded at preflight, before the run resolves tiny:// to a cache folder). A local path is left out.
    base_model: str | None = None


@dataclass
class ProjectSections:
    """The sections this project adds to veRL's ``ppo_trainer`` config."""

    reasoning_gym: ReasoningGymConfig = field(default_factory=ReasoningGymConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    hf_upload: HfUploadConfig = field(default_factory=HfUploadConfig)


SECTIONS: dict[str, type] = {"reasoning_gym": ReasoningGymConfig, "curriculum": CurriculumConfig,
                             "hf_upload": HfUploadConfig}

ConfigStore.instance().store(name=SCHEMA_NAME, node=ProjectSections)


def section_defaults(name: str) -> dict[str, Any]:
    """The defaults of one section as a plain dict (``"reasoning_gym"``, ``"curriculum"`` or ``"hf_upload"``).

    Example:
        >>> section_defaults("curriculum")["schedule"]
        {'automatic': False, 'update_steps': 30}
    """
    return OmegaConf.to_container(OmegaConf.structured(SECTIONS[name]))


def typed_section(name: str, value: Any, *, extra: tuple[str, ...] = ()) -> DictConfig:
    """``value`` (a dict or config node) merged onto the section's schema: defaults filled, keys and types checked.

    Args:
        name: The section.
        value: What the config holds there (``None``: the defaults).
        extra: Keys accepted beside the schema's (``hf_upload.bootstrap_from``).

    Raises:
        ConfigError: an unknown key or a wrong type, naming the key (OmegaConf's own message).
    """
    typed = OmegaConf.structured(SECTIONS[name])
    if value is None:
        return typed
    if not isinstance(value, DictConfig | Mapping):
        raise ConfigError(f"{name}: expected a mapping, got {type(value).__name__}")
    plain = OmegaConf.to_container(value) if isinstance(value, DictConfig) else dict(value)
    kept = {k: plain.pop(k) for k in extra if k in plain}
    try:
        merged = OmegaConf.merge(typed, plain)
    except OmegaConfBaseException as e:
        key = str(getattr(e, "full_key", "") or "")
        where = key if key.startswith(f"{name}.") else f"{name}.{key}" if key else name
        node = OmegaConf.select(typed, key.rpartition(".")[0]) if "." in key else typed
        if isinstance(e, ConfigKeyError) and isinstance(node, DictConfig):
            valid = sorted([*node.keys(), *(extra if node is typed else ())])
            raise ConfigError(f"{where} is not a known key; valid keys: {', '.join(valid)}.") from None
        raise ConfigError(f"{where}: {str(getattr(e, 'msg', e)).splitlines()[0]}") from None
    with open_dict(merged):
        for k, v in kept.items():
            merged[k] = v
    return merged


def apply_schema(cfg: DictConfig) -> DictConfig:
    """Give ``cfg`` the typed sections (for configs that do not list ``grpo_sections``), in place; return it.

    Raises:
        ConfigError: an unknown key or a wrong type in one of the sections, naming it.
    """
    with open_dict(cfg):
        for name in SECTIONS:
            node = cfg.get(name, None)
            if isinstance(node, DictConfig) and OmegaConf.get_type(node) is SECTIONS[name]:
                continue  # composed with grpo_sections: Hydra already checked it
            cfg[name] = typed_section(name, node, extra=("bootstrap_from",) if name == "hf_upload" else ())
    return cfg


# Defaults of the `reasoning_gym` section without its datasets (what training.data fills in).
DEFAULTS: dict[str, Any] = {k: v for k, v in section_defaults("reasoning_gym").items() if k != "datasets"}


def to_plain(cfg: Any) -> Any:
    """Return `cfg` as plain dicts/lists (resolving an OmegaConf node), so the rest of the code sees one type."""
    if isinstance(cfg, DictConfig | ListConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def reasoning_gym_section(rg_cfg: Any) -> dict[str, Any]:
    """The ``reasoning_gym`` section as a plain dict with the defaults filled in (not its datasets')."""
    rg = to_plain(rg_cfg)
    if not isinstance(rg, Mapping):
        raise ConfigError(f"reasoning_gym: expected a mapping with a `datasets` key, got {type(rg).__name__}")
    return {**DEFAULTS, **rg}


def split_seeds(rg_cfg: Any) -> tuple[int, int]:
    """Return the (train, val) composite seeds, refusing a val seed whose items would repeat train items.

    reasoning-gym generates item `i` of a dataset with `Random(seed + i)`, and a composite gives its k-th dataset
    the seed `composite_seed + k + 1`. So with val seed = train seed + d, val item i *is* train item i + d of the
    same dataset whenever 0 <= i + d < dataset_size: the original trainer's seeds 1 and 2 made almost every val
    question a train question. The default val seed is therefore `seed + dataset_size` (no overlap).

    Raises:
        ConfigError: An explicit `val_seed` that makes val items repeat train items.

    Example:
        >>> split_seeds({"seed": 1, "dataset_size": 100})
        (1, 101)
    """
    rg = reasoning_gym_section(rg_cfg)
    seed, n_train = int(rg["seed"]), int(rg["dataset_size"])
    n_val = int(rg["val_size"] if rg["val_size"] is not None else n_train)
    if rg["val_seed"] is None:
        return seed, seed + n_train
    val_seed = int(rg["val_seed"])
    if -n_val < val_seed - seed < n_train:
        raise ConfigError(
            f"reasoning_gym.val_seed={val_seed} with seed={seed}: val items would repeat train items (reasoning-gym "
            f"item i with seed s is item i+1 with seed s-1); use val_seed >= {seed + n_train} or <= {seed - n_val}, "
            "or leave it unset"
        )
    return seed, val_seed
