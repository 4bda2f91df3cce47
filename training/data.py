"""reasoning-gym composite datasets, served to veRL 0.9.1 as a `data.custom_cls` dataset.

veRL's dataset factory (`verl.trainer.ppo.utils.create_rl_dataset`) builds the class as
`cls(data_files=..., tokenizer=..., processor=..., config=<data section>, max_samples=...)` for the train and the val
split, without telling it which split it is. So the split travels in the file "path" and the reasoning-gym
settings in the data section:

    data:
      train_files: reasoning_gym://train
      val_files: reasoning_gym://val
      custom_cls: {path: pkg://training.data, name: ReasoningGymDataset}
      reasoning_gym: ${reasoning_gym}      # the top-level section, copied in by train_grpo.py
      curriculum: ${curriculum}            # optional: initial curriculum levels
      dataloader_num_workers: 0            # workers would hold stale copies after a curriculum level change

Rows follow what veRL's V1 trainer, agent loop and reward manager read (`verl/utils/dataset/rl_dataset.py`,
`verl/experimental/agent_loop/`, `verl/experimental/reward_loop/reward_manager/naive.py`): `raw_prompt` (chat
messages; the agent loop applies the chat template), `data_source`, `reward_model.ground_truth`, `extra_info`,
`index`, `tools_kwargs`, `interaction_kwargs` and a `dummy_tensor`. `extra_info["entry"]` is the whole
reasoning-gym entry, so an answer is always scored against its own entry - the original trainer scored val answers
against the train entry at the same index.

Items are generated lazily from the composite at `__getitem__` time: after the curriculum changes a dataset's level,
the next batch already comes from the new level.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from verl.utils.dataset.rl_dataset import RLHFDataset

from training.config_schema import DEFAULTS, reasoning_gym_section, split_seeds, to_plain
from training.errors import ConfigError

__all__ = [
    "DATA_FILE_SCHEME",
    "DEFAULTS",
    "ReasoningGymDataset",
    "build_reasoning_gym_dataset",
    "split_seeds",
    "make_row",
    "split_from_data_files",
    "system_prompt",
    "to_plain",
]

DATA_FILE_SCHEME = "reasoning_gym://"
SPLITS = ("train", "val")


def system_prompt(rg_cfg: Any) -> str:
    """Return the system prompt text named by `reasoning_gym.developer_prompt`.

    Raises:
        ConfigError: The name is not a key of `reasoning_gym.utils.SYSTEM_PROMPTS`.
    """
    from reasoning_gym.utils import SYSTEM_PROMPTS

    name = reasoning_gym_section(rg_cfg)["developer_prompt"]
    if name not in SYSTEM_PROMPTS:
        raise ConfigError(
            f"reasoning_gym.developer_prompt={name!r} is not a reasoning-gym system prompt; "
            f"use one of {sorted(SYSTEM_PROMPTS)}"
        )
    return SYSTEM_PROMPTS[name]


def build_reasoning_gym_dataset(rg_cfg: Any, split: str, seed: int | None = None):
    """Build the weighted reasoning-gym composite for one split.

    Args:
        rg_cfg: The `reasoning_gym` config section (dict or OmegaConf): `datasets.<name>.weight` / `.config`,
            `dataset_size`, optional `val_size`, `seed`, optional `val_seed`. Datasets with weight 0 are left out.
        split: "train" or "val"; val uses `val_seed` (default `seed + dataset_size`, see `split_seeds`) and `val_size` (default `dataset_size`).
        seed: Overrides the split's seed.

    Returns:
        A `reasoning_gym.composite.CompositeDataset`.

    Raises:
        ConfigError: Unknown split, no dataset with a positive weight, a negative weight, an unknown dataset name
            or a per-dataset config the dataset rejects.

    Example:
        >>> ds = build_reasoning_gym_dataset({"datasets": {"chain_sum": {"weight": 1}}, "dataset_size": 4}, "val")
        >>> (len(ds), ds.seed)
        (4, 5)
    """
    from reasoning_gym.composite import CompositeConfig, CompositeDataset, DatasetSpec

    if split not in SPLITS:
        raise ConfigError(f"split={split!r}: expected one of {SPLITS}")
    rg = reasoning_gym_section(rg_cfg)
    datasets = rg.get("datasets") or {}
    if not isinstance(datasets, Mapping) or not datasets:
        raise ConfigError("reasoning_gym.datasets is empty: add at least one `<name>: {weight: 1, config: {}}`")
    specs = []
    for name, ds_cfg in datasets.items():
        ds_cfg = ds_cfg or {}
        weight = float(ds_cfg.get("weight", 1.0))
        if weight < 0:
            raise ConfigError(f"reasoning_gym.datasets.{name}.weight={weight}: weights must be >= 0 (0 disables it)")
        if weight > 0:
            specs.append(DatasetSpec(name=name, weight=weight, config=dict(ds_cfg.get("config") or {})))
    if not specs:
        raise ConfigError(
            f"reasoning_gym.datasets: every weight is 0 ({sorted(datasets)}); give at least one dataset a weight > 0"
        )
    train_seed, val_seed = split_seeds(rg)
    if seed is None:
        seed = train_seed if split == "train" else val_seed
    size = rg["dataset_size"] if split == "train" or rg["val_size"] is None else rg["val_size"]
    try:
        return CompositeDataset(CompositeConfig(size=int(size), seed=int(seed), datasets=specs))
    except (ValueError, TypeError, AssertionError) as e:
        raise ConfigError(f"reasoning_gym ({split} split): cannot build the composite: {e}") from e


def make_row(entry: dict[str, Any], *, index: int, split: str, prompt: str, role: str = "system") -> dict[str, Any]:
    """Turn one reasoning-gym entry into the row dict veRL's V1 trainer and agent loop consume.

    Example:
        >>> row = make_row({"question": "1+1?", "answer": "2", "metadata": {"source_dataset": "chain_sum"}},
        ...                index=7, split="val", prompt="Be brief.")
        >>> row["raw_prompt"][1], row["reward_model"]["ground_truth"], row["extra_info"]["split"]
        ({'role': 'user', 'content': '1+1?'}, '2', 'val')
    """
    return {
        "data_source": entry["metadata"]["source_dataset"],
        "raw_prompt": [{"role": role, "content": prompt}, {"role": "user", "content": entry["question"]}],
        "reward_model": {"style": "rule", "ground_truth": entry["answer"]},
        "extra_info": {"entry": entry, "split": split, "index": index},
        "index": index,
        "tools_kwargs": {},
        "interaction_kwargs": {},
        # veRL's DataProto needs at least one tensor per row (see RLHFDataset.__getitem__).
        "dummy_tensor": torch.tensor([0], dtype=torch.uint8),
    }


def split_from_data_files(data_files: Any) -> str:
    """Return "train" or "val" from `data.train_files` / `data.val_files` = `reasoning_gym://<split>`.

    Raises:
        ConfigError: Anything else (e.g. a parquet path left over from a veRL example config).
    """
    files = to_plain(data_files)
    if isinstance(files, list | tuple):
        files = files[0] if len(files) == 1 else files
    if isinstance(files, str) and files.startswith(DATA_FILE_SCHEME) and files[len(DATA_FILE_SCHEME) :] in SPLITS:
        return files[len(DATA_FILE_SCHEME) :]
    raise ConfigError(
        f"data.train_files/data.val_files={files!r}: ReasoningGymDataset expects "
        f"'{DATA_FILE_SCHEME}train' and '{DATA_FILE_SCHEME}val'"
    )


class ReasoningGymDataset(RLHFDataset):
    """veRL `data.custom_cls` dataset over a reasoning-gym composite, generated lazily by index.

    Subclasses `RLHFDataset` only for its classmethods the agent loop calls (`process_multi_modal_info`); the
    parquet loading of its `__init__` is replaced.

    Attributes:
        composite: The `CompositeDataset` (the curriculum controller updates its datasets in place).
        split: "train" or "val".
    """

    def __init__(self, data_files, tokenizer, config, processor=None, max_samples: int = -1):
        if "reasoning_gym" not in config or config.get("reasoning_gym") is None:
            raise ConfigError(
                "data.reasoning_gym is missing: train_grpo.py copies the top-level `reasoning_gym` section there "
                "(or add `data.reasoning_gym: ${reasoning_gym}` to the config)"
            )
        self.tokenizer = tokenizer
        self.processor = processor
        self.config = config
        self.split = split_from_data_files(data_files)
        self.data_files = self.original_data_files = [f"{DATA_FILE_SCHEME}{self.split}"]
        rg_cfg = config.get("reasoning_gym")
        self.composite = build_reasoning_gym_dataset(rg_cfg, self.split)
        self.prompt = system_prompt(rg_cfg)
        self.role = reasoning_gym_section(rg_cfg)["developer_role"]
        self.max_samples = max_samples
        curriculum_cfg = config.get("curriculum")
        if curriculum_cfg is not None and to_plain(curriculum_cfg).get("enabled", False):
            from training.curriculum import apply_initial_levels

            apply_initial_levels(curriculum_cfg, self.composite)

    def __len__(self) -> int:
        n = len(self.composite)
        return min(n, self.max_samples) if self.max_samples is not None and self.max_samples > 0 else n

    def __getitem__(self, item: int) -> dict[str, Any]:
        index = int(item)
        if not 0 <= index < len(self):
            raise IndexError(f"{self.split} index {index} out of range [0, {len(self)})")
        return make_row(self.composite[index], index=index, split=self.split, prompt=self.prompt, role=self.role)

    def __getstate__(self) -> dict[str, Any]:
        # RLHFDataset.__getstate__ drops its parquet dataframe; here everything is cheap to pickle as is.
        return self.__dict__.copy()

    def resume_dataset_state(self) -> None:
        """No-op: there are no files to re-read; items are regenerated from the composite by index."""

    def entry(self, index: int) -> dict[str, Any]:
        """Return the reasoning-gym entry at `index` (generated now, at the current curriculum level)."""
        return self.composite[index]
