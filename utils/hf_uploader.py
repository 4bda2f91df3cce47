"""Consolidate veRL FSDP checkpoints and push them to the Hugging Face Hub: Python API and CLI.

    python utils/hf_uploader.py upload   CKPT_DIR --repo-id alice/qwen-grpo [--step N] [--private] [--dry-run]
    python utils/hf_uploader.py backfill RUN_DIR  --repo-id alice/qwen-grpo [--steps 100,200]
    python utils/hf_uploader.py resume   [RUN_DIR]
    python utils/hf_uploader.py verify   --repo-id alice/qwen-grpo [--revision step-N] [--against CKPT_DIR]
    python utils/hf_uploader.py pull     --repo-id alice/qwen-grpo [--namespace NS] [--revision step-N] \\
                                         --world-size W --out RUN_DIR

(also ``python -m utils.hf_uploader ...``). The token comes from ``HF_TOKEN`` (or ``hf auth login``); the Hub from
``HF_ENDPOINT`` or ``--endpoint``. What lands on the Hub: ``main`` holds the newest model at its root, every upload
is tagged ``step-N``, a generated model card unless a hand-written README is there, ``optimizer.pt`` on request.
An upload that fails after all retries leaves ``upload_pending.json`` in the step directory; ``resume`` finishes it.

The trainer hook uses :class:`HuggingFaceUploader` (``preflight()`` before any worker starts, then
``upload_from_checkpoint_dir``) and :class:`utils.hub.background.BackgroundUploader` for ``every_save``.

This file is the public face: the bodies live in :mod:`utils.hub.uploader`, the CLI in :mod:`utils.hub.cli`.

Example:
    >>> from utils.hf_uploader import resolve_repo_id
    >>> resolve_repo_id("qwen-grpo", organization="acme")
    'acme/qwen-grpo'
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `python utils/hf_uploader.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.hub import uploader as _body
from utils.hub.cli import main
from utils.hub.uploader import *  # the public names, listed once in utils.hub.uploader.__all__

__all__ = [*_body.__all__, "main"]

if __name__ == "__main__":
    sys.exit(main())
