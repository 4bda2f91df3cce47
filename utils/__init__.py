"""Checkpoint I/O and the Hub: consolidate veRL FSDP shards into Hugging Face models and upload them.

Nothing here imports ``training``, verl, ray or reasoning_gym: it reads files that veRL wrote and writes files
that transformers reads, so it runs on a laptop with torch and huggingface_hub alone.
"""
