"""veRL FSDP shards -> a Hugging Face model folder (and back, for resume).

Mental model: one checkpoint flows left to right, one tensor at a time, and nothing is visible until it is whole::

    global_step_N/actor/model_world_size_W_rank_r.pt   (+ optim_*.pt, huggingface/)
        -> layout         which files, which world size, which step            detect_layout
        -> merge          mmap every rank file; assemble one full tensor        RankShards
        -> writer         stream it into bin/safetensors shards; index last     (plan_shards, write_index)
        -> model_config   config/tokenizer side files, dtype                    (copy_side_files)
        -> optimizer      name-keyed optimizer.pt                               consolidate_optimizer
        -> consolidate    verify, then rename the temporary folder into place   consolidate_checkpoint
    reshard: the way back, a consolidated folder -> veRL rank files for any W   write_verl_checkpoint

    consolidate   the engine (:func:`consolidate_checkpoint`, :class:`ConsolidationResult`)
    cli           ``python utils/load_fsdp_to_hf.py CKPT_DIR OUT_DIR [options]``
    layout        find the step / actor dir, world size and rank files
    merge         placement-aware assembly of one full tensor from memory-mapped DTensor shards
    model_config  expected keys/shapes/tied aliases from a meta-device model; dtype; side files
    writer        shard plan, streamed safetensors, ``pytorch_model.bin``, index (written last), header checks
    optimizer     name-keyed ``optimizer.pt`` in torch's full optimizer state dict layout
    reshard       a consolidated model + optimizer -> veRL's FSDP2 rank files for any world size
    safe_state    veRL's pickled trainer state (extra_state, data.pt): weights_only + allow-list, re-serialized
    tempdirs      temporary folders with an owner record: removed on every exit, swept when stale; SIGTERM
    space         free-space check before writing; disk-full / vanished-checkpoint errors in plain words
    errors        every specific exception (``CheckpointError`` and subclasses)

The verbs below are imported on first use, so ``import utils.checkpoint.errors`` stays free of torch.
"""

from __future__ import annotations

from utils._lazy import lazy_exports

_HOME = {
    "consolidate_checkpoint": "consolidate",
    "ConsolidationResult": "consolidate",
    "detect_layout": "layout",
    "find_step_dirs": "layout",
    "latest_step": "layout",
    "consolidate_optimizer": "optimizer",
    "write_verl_checkpoint": "reshard",
}

__all__ = list(_HOME)
__getattr__ = lazy_exports(__name__, _HOME)
