"""Checkpoint I/O and the Hub: consolidate veRL FSDP shards into Hugging Face models and upload them.

Nothing here imports ``training``, verl, ray or reasoning_gym: it reads files that veRL wrote and writes files
that transformers reads, so it runs on a laptop with torch and huggingface_hub alone.

Consolidation, one job per module:
    checkpoint_layout  find the step / actor dir, world size and rank files (``detect_layout``, ``find_step_dirs``,
                       ``latest_step``)
    merge              placement-aware assembly of one full tensor from memory-mapped DTensor shards
    model_config       expected keys/shapes/tied aliases from a meta-device model; dtype; side files
    hf_writer          shard plan, streamed safetensors, ``pytorch_model.bin``, index (written last), header checks
    optimizer_merge    name-keyed ``optimizer.pt`` in torch's full optimizer state dict layout
    load_fsdp_to_hf    ``consolidate_checkpoint(...) -> ConsolidationResult`` and the CLI
    errors             every specific exception (``CheckpointError`` and subclasses)
"""
