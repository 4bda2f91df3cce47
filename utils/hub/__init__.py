"""The Hugging Face Hub side: push a consolidated folder, verify it, resume from it.

    client        HubClient: preflight, commits, tags, downloads, retries
    push          plan what to send (skip unchanged files), commit, tag
    verify        check an uploaded revision against local files
    snapshots     newest complete resume snapshot per namespace; pull + reshard
    resume_state  trainer_state.json of a resume snapshot
    pending       upload_pending.json markers and the staging lock
    card          generated model card (never overwrites a hand-written one)
    background    one-at-a-time background upload queue
    cli           ``python utils/hf_uploader.py upload|backfill|resume|verify|pull``
    errors        every specific exception (``HubUploadError`` and subclasses)
"""
