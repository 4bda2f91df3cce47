"""LoRA runs resuming from the Hub (``hf_upload.resume`` with ``actor_rollout_ref.model.lora_rank > 0``).

A LoRA snapshot holds the PEFT adapter, its optimizer state and veRL's trainer state, not the base weights: the run's
own ``actor_rollout_ref.model.path`` supplies those. So before resharding, the snapshot must fit this run:

- the base model: the architecture fields of :func:`training.hub_resume.compat_fingerprint` recorded at save time,
  and ``base_model_name_or_path`` when both sides name a Hub model;
- the LoRA shape: ``r``, ``lora_alpha`` and the adapted modules (the run's ``target_modules`` resolved by PEFT
  on a meta-device model, compared by tensor name and shape with the snapshot's adapter).

Each difference is named (``lora_rank: Hub 8 vs this run 16``) in one :class:`IncompatibleResumeError`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

__all__ = ["run_lora_config", "base_config_dir", "lora_differences"]

logger = logging.getLogger(__name__)


def run_lora_config(cfg: DictConfig) -> dict[str, Any] | None:
    """This run's LoRA settings as an ``adapter_config``-like dict, or ``None`` when it fine-tunes all weights."""
    model = cfg.actor_rollout_ref.model
    rank = int(model.get("lora_rank", 0) or 0)
    if rank <= 0:
        return None
    targets = model.get("target_modules", "all-linear")
    targets = targets if isinstance(targets, str) else [str(t) for t in targets]
    return {"r": rank, "lora_alpha": model.get("lora_alpha", 16), "target_modules": targets}


def base_config_dir(model_path: str) -> Path:
    """A local folder holding the base model's ``config.json`` (downloads only that file for a Hub id)."""
    if Path(model_path, "config.json").is_file():
        return Path(model_path)
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(model_path, "config.json")).parent


def _is_hub_id(name: Any) -> bool:
    return isinstance(name, str) and name.count("/") == 1 and not name.startswith((".", "/", "~"))


def lora_differences(cfg: DictConfig, snap: Any, adapter: Any, mine_model: dict[str, Any]) -> list[str]:
    """Every field in which a snapshot and this run disagree about the base model or the LoRA shape.

    Args:
        cfg: the run config. snap: the :class:`utils.hub.snapshots.ResumeSnapshot`.
        adapter: the snapshot's :class:`utils.checkpoint.reshard_lora.LoraSnapshot`, or ``None`` (a full model).
        mine_model: this run's ``compat_fingerprint(cfg)["model"]``.

    Returns:
        ``"field: Hub X vs this run Y"`` strings; empty when the snapshot fits.
    """
    mine = run_lora_config(cfg)
    theirs = adapter.config if adapter is not None else None
    if mine is None or theirs is None:
        return [f"actor_rollout_ref.model.lora_rank: Hub {theirs['r'] if theirs else 0} vs this run "
                f"{mine['r'] if mine else 0} (a LoRA snapshot resumes a LoRA run, a full one a full run)"]
    diffs = []
    for key, field in (("r", "lora_rank"), ("lora_alpha", "lora_alpha")):
        if float(theirs.get(key) or 0) != float(mine[key]):
            diffs.append(f"actor_rollout_ref.model.{field}: Hub {theirs.get(key)!r} vs this run {mine[key]!r}")
    recorded = ((snap.state or {}).get("compat") or {}).get("model") or {}
    diffs += [f"base model {k}: Hub {recorded[k]!r} vs this run {mine_model.get(k)!r}"
              for k in sorted(recorded) if k in mine_model and recorded[k] != mine_model.get(k)]
    base_theirs, base_mine = theirs.get("base_model_name_or_path"), str(cfg.actor_rollout_ref.model.path)
    if _is_hub_id(base_theirs) and _is_hub_id(base_mine) and base_theirs != base_mine:
        diffs.append(f"base_model_name_or_path: Hub {base_theirs!r} vs this run {base_mine!r}")
    if not diffs:  # same r: compare the adapted modules tensor by tensor (names and shapes)
        from utils.checkpoint.reshard_lora import checkpoint_key, peft_parameters

        run_lora = {n: s for n, s in peft_parameters(base_config_dir(base_mine), mine) if "lora_" in n}
        hub_lora = {checkpoint_key(k): s for k, s in adapter.shapes.items()}
        if run_lora != hub_lora:
            only_hub = sorted(set(hub_lora) - set(run_lora))
            only_run = sorted(set(run_lora) - set(hub_lora))
            diffs.append(f"actor_rollout_ref.model.target_modules: Hub {theirs.get('target_modules')!r} vs this run "
                         f"{mine['target_modules']!r} ({len(only_hub)} LoRA tensors only on the Hub, e.g. "
                         f"{only_hub[:2]}; {len(only_run)} only in this run, e.g. {only_run[:2]})")
    return diffs
