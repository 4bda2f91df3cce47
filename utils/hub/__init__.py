"""The Hugging Face Hub side: push a consolidated folder, verify it, resume from it.

Mental model: one upload is one commit on ``main`` plus one ``step-N`` tag; everything else protects that::

    HuggingFaceUploader.preflight()            token, write access, repo id; creates the repo   (client)
    upload_from_checkpoint_dir(global_step_N)
        -> step_lock + staging space check                                                    (pending, uploader)
        -> consolidate into a temp folder      utils.checkpoint.consolidate_checkpoint
        -> (strategy=checkpoint) resume files  optimizer.pt, resume/, trainer_state.json        (resume_state)
        -> plan: skip files the Hub already holds, render the model card                       (push, card)
        -> commit + tag step-N, retried; failure -> upload_pending.json for ``resume``          (client, pending)
           (before each commit attempt: a newer step already on main -> this one only gets its tag)  (push)
    every_save: the same call, one at a time, off the training thread                          (background)
    later: verify_upload (sha256 + load), pull_snapshot (newest complete snapshot -> veRL rank files)

    uploader      HuggingFaceUploader, upload_checkpoint_to_hf, resume_pending, backfill
    cli           ``python utils/hf_uploader.py upload|backfill|resume|verify|pull``
    client        HubClient: preflight, commits, tags, downloads, retries
    timeouts      connect/read limits on every request huggingface_hub sends (a silent Hub cannot hang a run)
    push          plan what to send (skip unchanged files), commit, tag
    verify        check an uploaded revision against local files
    snapshots     newest complete resume snapshot per namespace; pull + reshard
    resume_state  trainer_state.json of a resume snapshot
    pending       upload_pending.json markers and the staging lock
    card          generated model card (never overwrites a hand-written one)
    background    one-at-a-time background upload queue
    errors        every specific exception (``HubUploadError`` and subclasses)

The verbs below are imported on first use, so ``import utils.hub.errors`` stays light.
"""

from __future__ import annotations

from utils._lazy import lazy_exports

_HOME = {
    "HuggingFaceUploader": "uploader",
    "UploadResult": "uploader",
    "upload_checkpoint_to_hf": "uploader",
    "resume_pending": "uploader",
    "verify_upload": "verify",
    "pull_snapshot": "snapshots",
    "BackgroundUploader": "background",
    "HubClient": "client",
}

__all__ = list(_HOME)
__getattr__ = lazy_exports(__name__, _HOME)
