"""Consolidate a veRL FSDP checkpoint into a Hugging Face model folder, streaming in bounded memory.

    python utils/load_fsdp_to_hf.py checkpoints/run/global_step_100/actor out/model
    python utils/load_fsdp_to_hf.py checkpoints/run out/model --format safetensors --dtype bf16 --optimizer
    python -m utils.load_fsdp_to_hf CKPT_DIR OUT_DIR [--format bin|safetensors] [--dtype auto|bf16|fp16|fp32]
        [--max-shard-size 5GB] [--optimizer] [--base-model PATH] [--step N] [--overwrite] [--verify] [--quiet]
        [--lora adapter|merged|both] [--lora-alpha A] [--lora-rank R] [--lora-base-model NAME]
    python utils/load_fsdp_to_hf.py ckpts/lora_run out/qwen-lora --lora both --lora-base-model Qwen/Qwen2.5-1.5B

The pipeline: detect the layout (world size, rank files) -> read every rank file memory-mapped -> for each tensor,
assemble it from its DTensor shards by placement, cast, write it, release it -> write the index last -> copy config,
generation config and tokenizer -> optionally merge the optimizer -> re-open and check every file -> rename the
temporary folder into place. Peak memory is about the largest tensor (safetensors) or one output shard (bin).

This file is the public face: the engine lives in :mod:`utils.checkpoint.consolidate`, the CLI in
:mod:`utils.checkpoint.cli`.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a script: import `utils` from the repo, not utils/ itself
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from utils.checkpoint.cli import main
from utils.checkpoint.consolidate import ConsolidationResult, consolidate_checkpoint
from utils.checkpoint.layout import find_step_dirs, latest_step

__all__ = ["ConsolidationResult", "consolidate_checkpoint", "find_step_dirs", "latest_step", "main"]

if __name__ == "__main__":
    sys.exit(main())
