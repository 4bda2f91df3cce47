"""Upload bookkeeping on local disk: ``upload_pending.json`` markers, the per-step upload lock, step discovery.

A marker records everything ``resume`` needs to finish an upload that failed after all retries - never the token
(``resume`` reads it from ``HF_TOKEN`` or the saved login again). Markers are written atomically (temp file, then
rename) so a crash never leaves half a JSON document behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from utils.checkpoint.layout import find_step_dirs, step_from_path
from utils.hub.errors import PendingUploadError, UploadInProgressError

__all__ = [
    "PENDING_MARKER",
    "PendingUpload",
    "write_pending",
    "read_pending",
    "clear_pending",
    "find_pending",
    "step_lock",
    "step_from_path",
]

PENDING_MARKER = "upload_pending.json"
LOCK_FILE = ".hf_upload.lock"
_MARKER_VERSION = 1


@dataclass
class PendingUpload:
    """The content of ``upload_pending.json``: how to redo one upload. Holds no secret.

    Attributes:
        checkpoint_dir: The step (or actor) directory to consolidate again.
        repo_id: Target repo (``namespace/name``).
        step: Training step, tagged ``step-N``.
        options: Uploader settings needed to reproduce the upload (private, optimizer_save_mode, weights_format,
            dtype, max_shard_size, endpoint, base_model, metrics, ...). Never the token.
        error: The last error, redacted, for the user.
        attempts: How many uploads of this step failed so far.
        created_at: When the first failure happened (UTC, ISO 8601).
    """

    checkpoint_dir: str
    repo_id: str
    step: int
    options: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    attempts: int = 1
    created_at: str = ""
    version: int = _MARKER_VERSION


_SECRET_KEYS = {"token", "hf_token", "password", "authorization"}


def write_pending(step_dir: Path, pending: PendingUpload) -> Path:
    """Atomically write (or update) ``step_dir/upload_pending.json``; returns its path.

    Raises:
        ValueError: ``pending.options`` holds a secret-looking key (a bug in the caller; markers never hold tokens).
    """
    leaked = _SECRET_KEYS & {k.lower() for k in pending.options}
    if leaked:
        raise PendingUploadError(f"refusing to write secret option(s) {sorted(leaked)} into {PENDING_MARKER}")
    step_dir = Path(step_dir)
    path = step_dir / PENDING_MARKER
    previous = read_pending(step_dir) if path.exists() else None
    if previous is not None:
        pending.attempts = previous.attempts + pending.attempts
        pending.created_at = previous.created_at or pending.created_at
    pending.created_at = pending.created_at or datetime.now(timezone.utc).isoformat(timespec="seconds")
    fd, tmp = tempfile.mkstemp(prefix=f".{PENDING_MARKER}.", dir=step_dir)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(pending), f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_pending(step_dir: Path) -> PendingUpload | None:
    """The marker of ``step_dir``, or ``None`` when there is none.

    Raises:
        PendingUploadError: The marker exists but is not valid JSON or lacks required fields.
    """
    path = Path(step_dir) / PENDING_MARKER
    if not path.exists():
        return None
    try:
        raw = json.loads(path.read_text())
        known = {k: raw[k] for k in PendingUpload.__dataclass_fields__ if k in raw}
        return PendingUpload(**known)
    except (json.JSONDecodeError, TypeError) as e:
        raise PendingUploadError(
            f"{path} is not a valid pending-upload marker ({e}). Delete it and run "
            f"`python utils/hf_uploader.py upload {step_dir} --repo-id ...` instead."
        ) from e


def clear_pending(step_dir: Path) -> None:
    """Remove the marker of ``step_dir`` (after a successful upload)."""
    (Path(step_dir) / PENDING_MARKER).unlink(missing_ok=True)


def find_pending(run_dir: Path) -> list[Path]:
    """Step directories under ``run_dir`` (or ``run_dir`` itself) that hold a marker, in step order.

    Example:
        >>> find_pending(Path("/no/such/run"))
        []
    """
    run_dir = Path(run_dir)
    if (run_dir / PENDING_MARKER).exists():
        return [run_dir]
    return [d for _, d in find_step_dirs(run_dir) if (d / PENDING_MARKER).exists()]


@contextmanager
def step_lock(step_dir: Path, timeout: float = 0) -> Iterator[None]:
    """Hold the upload lock of one step directory, so two processes never push the same step at once.

    A directory that cannot be written (a read-only checkpoint mount) is uploaded without a lock.

    Raises:
        UploadInProgressError: Another process holds the lock for longer than ``timeout`` seconds.
    """
    path = Path(step_dir) / LOCK_FILE
    if not os.access(Path(step_dir), os.W_OK):
        yield
        return
    lock = FileLock(str(path), timeout=timeout)
    try:
        lock.acquire()
    except Timeout as e:
        raise UploadInProgressError(
            f"Another process is uploading {step_dir} (lock {path}). Wait for it, or delete the lock file if that "
            "process is gone."
        ) from e
    try:
        yield
    finally:
        lock.release()  # the (empty) lock file stays: deleting it would race with a process about to lock it
