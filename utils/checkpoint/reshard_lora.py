"""Resume a LoRA run from a snapshot: write veRL's per-rank files for any world size from a PEFT adapter folder.

A LoRA resume snapshot (``hf_upload.strategy=checkpoint`` on a LoRA run) holds the adapter (``adapter_config.json``
+ ``adapter_model.safetensors``, at the root or in ``adapter/``), the name-keyed LoRA ``optimizer.pt`` and veRL's
trainer state; the frozen base weights are the run's own ``actor_rollout_ref.model.path``. veRL 0.9.1 resumes
such a run from *adapters-only* model shards (``FSDPCheckpointManager.load_checkpoint`` loads a state dict whose
keys all contain ``lora_`` with ``strict=False``, the base comes from the model path), so each rank gets::

    model_world_size_W_rank_r.pt   {base_model.model.<module>.lora_A.default.weight: DTensor Shard(0), ...}
    optim_world_size_W_rank_r.pt   AdamW's state_dict over the PeftModel's parameters() (frozen ones included,
                                   without state), LoRA state sharded like its parameter

The parameter ids follow the PeftModel's ``parameters()`` order, read from PEFT itself on a meta-device model
(the base config + the adapter's LoraConfig): no weights are loaded, and the order is PEFT's, not a guess.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from utils.checkpoint.errors import CheckpointError, OptimizerMismatchError
from utils.checkpoint.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LORA_META_FILE

__all__ = ["LoraSnapshot", "find_adapter", "peft_parameters", "lora_rank_worker", "check_lora_optimizer"]


@dataclass(frozen=True)
class LoraSnapshot:
    """A PEFT adapter inside a snapshot folder.

    Attributes:
        folder: the folder holding ``adapter_config.json`` (the snapshot root, or its ``adapter/``).
        config: ``adapter_config.json`` parsed.
        shapes: PEFT adapter key (``...q_proj.lora_A.weight``) -> shape, from the safetensors header.
    """

    folder: Path
    config: dict[str, Any]
    shapes: dict[str, tuple[int, ...]]

    def summary(self) -> dict[str, Any]:
        c = self.config
        return {"r": c.get("r"), "lora_alpha": c.get("lora_alpha"), "target_modules": c.get("target_modules"),
                "base_model_name_or_path": c.get("base_model_name_or_path")}


def find_adapter(snapshot_dir: str | Path) -> LoraSnapshot | None:
    """The PEFT adapter of a snapshot (root first, then ``adapter/``), or ``None`` for a full-model snapshot.

    Raises:
        CheckpointError: ``adapter_config.json`` without its weights, or unreadable.
    """
    from safetensors import safe_open

    for folder in (Path(snapshot_dir), Path(snapshot_dir) / "adapter"):
        if not (folder / ADAPTER_CONFIG).is_file():
            continue
        if not (folder / ADAPTER_WEIGHTS).is_file():
            raise CheckpointError(f"{folder / ADAPTER_CONFIG} has no {ADAPTER_WEIGHTS} beside it; the adapter is "
                                  "incomplete.")
        config = json.loads((folder / ADAPTER_CONFIG).read_text())
        with safe_open(str(folder / ADAPTER_WEIGHTS), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - not a Mapping
        return LoraSnapshot(folder, config, shapes)
    return None


def peft_parameters(base_config_dir: str | Path, adapter_config: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """``(name, shape)`` of every parameter of the PeftModel veRL builds, in ``parameters()`` order (meta device).

    Args:
        base_config_dir: a folder with the base model's ``config.json``.
        adapter_config: ``adapter_config.json`` (r, lora_alpha, target_modules).

    Example:
        >>> names = [n for n, _ in peft_parameters("tiny-qwen2", {"r": 8, "lora_alpha": 16,  # doctest: +SKIP
        ...                                                       "target_modules": ["q_proj"]})]
    """
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base_config_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        peft_model = get_peft_model(model, LoraConfig(
            task_type=TaskType.CAUSAL_LM, r=int(adapter_config["r"]), lora_alpha=adapter_config["lora_alpha"],
            target_modules=adapter_config["target_modules"], bias="none"))
    return [(n, tuple(p.shape)) for n, p in peft_model.named_parameters()]


def checkpoint_key(adapter_key: str) -> str:
    """PEFT's adapter file name -> the PeftModel state-dict key veRL saves (the adapter name ``default`` back in).

    Example:
        >>> checkpoint_key("base_model.model.model.layers.0.mlp.up_proj.lora_A.weight")
        'base_model.model.model.layers.0.mlp.up_proj.lora_A.default.weight'
    """
    return adapter_key.removesuffix(".weight") + ".default.weight"


def check_lora_optimizer(snapshot_dir: Path, adapter: LoraSnapshot, params: list[tuple[str, tuple[int, ...]]]) -> None:
    """``optimizer.pt`` and the adapter must hold exactly the LoRA parameters of the PeftModel, with their shapes.

    Raises:
        OptimizerMismatchError: names or shapes differ (named).
    """
    import torch

    lora = {n: s for n, s in params if "lora_" in n}
    in_adapter = {checkpoint_key(k): s for k, s in adapter.shapes.items()}
    if in_adapter != lora:
        diff = sorted(set(in_adapter.items()) ^ set(lora.items()))[:3]
        raise OptimizerMismatchError(f"{adapter.folder / ADAPTER_WEIGHTS}: LoRA tensors differ from the model built "
                                     f"from the base config and adapter_config.json, e.g. {diff}")
    full = torch.load(Path(snapshot_dir) / "optimizer.pt", map_location="cpu", weights_only=True, mmap=True)
    names = [n for g in full["param_groups"] for n in g["params"]]
    if sorted(names) != sorted(lora) or sorted(full["state"]) != sorted(lora):
        raise OptimizerMismatchError(
            f"{snapshot_dir / 'optimizer.pt'}: does not hold exactly the adapter's LoRA parameters (only in the "
            f"optimizer {sorted(set(names) - set(lora))[:3]}, only in the adapter {sorted(set(lora) - set(names))[:3]})")


def write_lora_meta(actor_dir: Path, adapter: LoraSnapshot) -> None:
    """veRL's ``lora_train_meta.json`` for the resharded step (a later consolidation reads it)."""
    c = adapter.config
    (actor_dir / LORA_META_FILE).write_text(json.dumps(
        {"r": int(c["r"]), "lora_alpha": c["lora_alpha"], "task_type": c.get("task_type") or "CAUSAL_LM"}, indent=4))


def lora_rank_worker(rank: int, world_size: int, snapshot_dir: str, actor_dir: str, adapter_dir: str,
                     params: list[tuple[str, tuple[int, ...]]], weights_only: bool, init_file: str) -> None:
    """One rank: this rank's rows of every LoRA tensor and its AdamW state, as veRL's per-rank files."""

    import torch
    import torch.distributed as dist
    from safetensors import safe_open
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    from utils.checkpoint.reshard import shard_rows

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        snap, actor = Path(snapshot_dir), Path(actor_dir)
        mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("fsdp",))

        def local(full: torch.Tensor) -> Any:
            start, stop = shard_rows(full.shape[0], world_size, rank)
            rows = full[start:stop].float().contiguous().clone()  # fp32 masters, a compact storage per rank
            stride = torch.empty(full.shape, device="meta").stride()
            return DTensor.from_local(rows, mesh, [Shard(0)], run_check=False, shape=full.shape, stride=stride)

        model_sd: dict[str, Any] = {}
        with safe_open(str(Path(adapter_dir) / ADAPTER_WEIGHTS), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
                model_sd[checkpoint_key(key)] = local(f.get_tensor(key))
        torch.save(dict(sorted(model_sd.items())), actor / f"model_world_size_{world_size}_rank_{rank}.pt")
        if weights_only:
            return
        full = torch.load(snap / "optimizer.pt", map_location="cpu", weights_only=True, mmap=True)
        ids = {name: i for i, (name, _) in enumerate(params)}
        state = {ids[name]: {k: local(v) if isinstance(v, torch.Tensor) and v.ndim > 0 else
                             (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in entry.items()}
                 for name, entry in full["state"].items()}
        # veRL's AdamW holds every parameter (frozen ones too) in one group: ids 0..P-1 in parameters() order.
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": list(range(len(params)))}
                  for g in full["param_groups"]]
        torch.save({"state": dict(sorted(state.items())), "param_groups": groups},
                   actor / f"optim_world_size_{world_size}_rank_{rank}.pt")
        # extra_state: written by the parent, validated and re-serialized (utils/checkpoint/safe_state.py)
    finally:
        dist.barrier()
        dist.destroy_process_group()
