"""The LoRA outputs of a consolidation (:func:`utils.checkpoint.consolidate.consolidate_checkpoint` with ``lora=``):
the adapter-only PEFT folder, and what goes beside a merged model (the adapter in ``adapter/``, the LoRA optimizer).

The merged model itself is written by the engine's usual path over :class:`utils.checkpoint.lora.MergedLoraShards`.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import torch

from utils.checkpoint.consolidate import (
    ConsolidationResult,
    _check_out_dir,
    _make_temp_dir,
    _move_into_place,
)
from utils.checkpoint.layout import CheckpointLayout
from utils.checkpoint.lora import (
    ADAPTER_WEIGHTS,
    LoraLayout,
    consolidate_lora_optimizer,
    write_adapter,
)
from utils.checkpoint.merge import RankShards
from utils.checkpoint.model_config import ExpectedModel, copy_side_files, resolve_dtype

__all__ = ["consolidate_adapter", "write_lora_extras", "lora_base_name"]

logger = logging.getLogger("utils.load_fsdp_to_hf")
_NO_BASE = "adapter_config.json: base_model_name_or_path unknown; pass --lora-base-model NAME (API lora_base_model=)"


def lora_base_name(lora_base_model: str | None, base_model: str | Path | None, config_dir: Path) -> str | None:
    """What ``adapter_config.json`` names as the base: explicit, the base model given, else the config's own
    ``_name_or_path`` (``None`` when nothing says)."""
    if lora_base_model or base_model:
        return str(lora_base_model or base_model)
    name = json.loads((config_dir / "config.json").read_text()).get("_name_or_path")
    return str(name) if name else None


def write_lora_extras(folder: Path, layout: CheckpointLayout, raw: RankShards, lora_layout: LoraLayout, mode: str,
                      out_dtype: torch.dtype, include_optimizer: bool, base_name: str | None) -> dict:
    """Beside a merged model in ``folder``: the PEFT adapter in ``adapter/`` (mode ``both``) and the LoRA
    ``optimizer.pt``. Returns the result's ``lora`` record plus ``optimizer_file``/``optimizer_bytes``."""
    adapter_dir = None
    if mode == "both":
        adapter_dir = "adapter"
        (folder / adapter_dir).mkdir()
        write_adapter(raw, lora_layout, folder / adapter_dir, base_model_name_or_path=base_name, dtype=out_dtype)
        if base_name is None:
            logger.warning(_NO_BASE)
    opt_file, opt_bytes = None, 0
    if include_optimizer:
        opt_file = "optimizer.pt"
        opt_bytes = consolidate_lora_optimizer(layout.optim_files, raw, lora_layout, folder / opt_file)
    return {"mode": mode, **lora_layout.summary(), "base_model_name_or_path": base_name, "adapter_dir": adapter_dir,
            "optimizer_file": opt_file, "optimizer_bytes": opt_bytes}


def consolidate_adapter(t0: float, layout: CheckpointLayout, shards: RankShards, lora_layout: LoraLayout,
                        expected: ExpectedModel, out_dir: Path, *, dtype: str, include_optimizer: bool,
                        base_name: str | None, overwrite: bool) -> ConsolidationResult:
    """``lora="adapter"``: a PEFT folder (adapter, tokenizer and generation config; no base ``config.json``), built
    in a temporary folder beside ``out_dir`` and renamed into place, like every consolidation."""
    source_dtype = shards.spec(lora_layout.lora_keys[0]).dtype
    out_dtype = resolve_dtype(dtype, expected.config_dtype, source_dtype)
    if base_name is None:
        logger.warning(_NO_BASE)
    tmp = _make_temp_dir(out_dir)
    try:
        write_adapter(shards, lora_layout, tmp, base_model_name_or_path=base_name, dtype=out_dtype)
        side_files = [f for f in copy_side_files(expected.config_dir, tmp, out_dtype) if f != "config.json"]
        (tmp / "config.json").unlink()  # the base model's config: a PEFT folder holds adapter_config.json instead
        opt_file, opt_bytes = None, 0
        if include_optimizer:
            opt_file = "optimizer.pt"
            opt_bytes = consolidate_lora_optimizer(layout.optim_files, shards, lora_layout, tmp / opt_file)
        _check_out_dir(out_dir, overwrite)
        _move_into_place(tmp, out_dir)
    except BaseException:  # Ctrl-C included: leave nothing behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ConsolidationResult(
        out_dir=out_dir, files=sorted(p.name for p in out_dir.iterdir()), weight_files=[ADAPTER_WEIGHTS],
        bytes_written=(out_dir / ADAPTER_WEIGHTS).stat().st_size + opt_bytes, seconds=time.perf_counter() - t0,
        dtype=str(out_dtype).removeprefix("torch."), source_dtype=str(source_dtype).removeprefix("torch."),
        world_size=layout.world_size, step=layout.step, num_tensors=len(lora_layout.lora_keys),
        optimizer_file=opt_file, side_files=side_files,
        lora={"mode": "adapter", **lora_layout.summary(), "base_model_name_or_path": base_name, "adapter_dir": "."})
