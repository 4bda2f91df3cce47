"""veRL FSDP shards -> a Hugging Face model folder (and back, for resume).

    layout        find the step / actor dir, world size and rank files
    merge         placement-aware assembly of one full tensor from memory-mapped DTensor shards
    model_config  expected keys/shapes/tied aliases from a meta-device model; dtype; side files
    writer        shard plan, streamed safetensors, ``pytorch_model.bin``, index (written last), header checks
    optimizer     name-keyed ``optimizer.pt`` in torch's full optimizer state dict layout
    reshard       a consolidated model + optimizer -> veRL's FSDP2 rank files for any world size
    errors        every specific exception (``CheckpointError`` and subclasses)
"""
