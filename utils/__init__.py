"""Checkpoint I/O and the Hub: consolidate veRL FSDP shards into Hugging Face models and upload them.

Nothing here imports ``training``, verl, ray or reasoning_gym: it reads files that veRL wrote and writes files
that transformers reads, so it runs on a laptop with torch and huggingface_hub alone.

    utils/load_fsdp_to_hf.py   public face of ``utils.checkpoint``: ``consolidate_checkpoint`` and its CLI
    utils/hf_uploader.py       public face of ``utils.hub``: ``upload_checkpoint_to_hf``, ``HuggingFaceUploader``, CLI
    utils/checkpoint/          veRL shards -> Hugging Face folder (layout, merge, writer, optimizer, reshard)
    utils/hub/                 the Hub (client, push planner, verify, snapshots, pending markers, card, background)
    utils/errlog.py            full tracebacks to a log file; the console line names it
"""
