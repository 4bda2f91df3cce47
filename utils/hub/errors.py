"""Every specific exception the Hub uploader raises, in one place.

Each class subclasses :class:`HubUploadError` *and* the closest builtin, so callers can catch our family
(``except HubUploadError``) or the builtin they already expect (``except PermissionError``, ``except ValueError``).
Messages say what is wrong and what to do about it, and never contain a token (see :func:`redact`).
"""

from __future__ import annotations

__all__ = [
    "HubUploadError",
    "InvalidUploadConfigError",
    "InvalidRepoIdError",
    "MissingRepoIdError",
    "InvalidOptimizerSaveModeError",
    "StepNotFoundError",
    "MissingTokenError",
    "InvalidTokenError",
    "ReadOnlyTokenError",
    "NamespaceAccessError",
    "HubUnreachableError",
    "TagConflictError",
    "UploadFailedError",
    "StagingSpaceError",
    "UploadInProgressError",
    "PendingUploadError",
    "VerificationError",
    "SnapshotNotFoundError",
    "IncompleteSnapshotError",
    "UnsupportedSnapshotError",
    "UploaderClosedError",
    "redact",
]


class HubUploadError(Exception):
    """Base class of every error raised while preparing, uploading or verifying a model on the Hub."""


class InvalidUploadConfigError(HubUploadError, ValueError):
    """An upload setting has a value the uploader cannot use (the message names the setting and valid values)."""


class InvalidRepoIdError(InvalidUploadConfigError):
    """The repo id is not a valid Hub id, or ``organization`` conflicts with the namespace inside ``repo_id``."""


class MissingRepoIdError(InvalidUploadConfigError):
    """No ``repo_id`` was given (``hf_upload.repo_id: null``)."""


class InvalidOptimizerSaveModeError(InvalidUploadConfigError):
    """``optimizer_save_mode`` is not one of the supported values."""


class StepNotFoundError(InvalidUploadConfigError):
    """No step was given and none can be read from a ``global_step_N`` folder name."""


class MissingTokenError(HubUploadError, PermissionError):
    """No Hugging Face token: not passed, not in ``HF_TOKEN``, not saved by ``hf auth login``."""


class InvalidTokenError(HubUploadError, PermissionError):
    """The Hub rejected the token (expired, revoked or mistyped)."""


class ReadOnlyTokenError(HubUploadError, PermissionError):
    """The token is valid but only has the ``read`` role, so it cannot create repos or push commits."""


class NamespaceAccessError(HubUploadError, PermissionError):
    """The token's user may not write to the repo's namespace (another user, or an org they are not in)."""


class HubUnreachableError(HubUploadError, ConnectionError):
    """The Hub endpoint did not answer (network down, wrong ``HF_ENDPOINT``, server outage)."""


class TagConflictError(HubUploadError, FileExistsError):
    """The ``step-N`` tag already exists on the Hub and points at different weights than the ones being uploaded."""


class UploadFailedError(HubUploadError, RuntimeError):
    """An upload failed after all retries.

    Attributes:
        pending_marker: the ``upload_pending.json`` left behind, if any.
        reason: the message without the "finish it later" hint (what went wrong, one line, token-free).
    """

    def __init__(self, message: str, *, pending_marker: str | None = None, reason: str | None = None):
        super().__init__(message)
        self.pending_marker = pending_marker
        self.reason = message if reason is None else reason


class StagingSpaceError(HubUploadError, OSError):
    """The temporary folder for the consolidated model lacks the free space the checkpoint needs."""


class UploadInProgressError(HubUploadError, BlockingIOError):
    """Another process holds the upload lock of this step directory."""


class PendingUploadError(HubUploadError, ValueError):
    """An ``upload_pending.json`` marker cannot be read or lacks a field ``resume`` needs."""


class VerificationError(HubUploadError, ValueError):
    """Files on the Hub differ from the local consolidation, or the uploaded model does not load."""


class SnapshotNotFoundError(HubUploadError, LookupError):
    """The repo/namespace holds no snapshot (or not the one asked for)."""


class IncompleteSnapshotError(HubUploadError, ValueError):
    """A snapshot's files do not match its ``trainer_state.json`` (an explicitly requested revision)."""


class UnsupportedSnapshotError(HubUploadError, ValueError):
    """A ``trainer_state.json`` was written by a newer format than this code understands."""


class UploaderClosedError(HubUploadError, RuntimeError):
    """A job was submitted to a :class:`utils.hub.background.BackgroundUploader` after it was closed."""


class RepoNotFoundOnHubError(HubUploadError, LookupError):
    """The repo does not exist at the endpoint (or the token's user cannot see it)."""


class RevisionNotFoundOnHubError(HubUploadError, LookupError):
    """The repo exists, but has no such branch, tag or commit."""


def redact(text: str, token: str | None) -> str:
    """Replace every occurrence of ``token`` (and of any ``hf_...`` token-looking word) in ``text`` with ``***``.

    Args:
        text: Any message that may end up in a log, an exception or a marker file.
        token: The secret to hide; ``None`` or ``""`` only applies the generic ``hf_`` pattern.

    Returns:
        The text with secrets replaced.

    Example:
        >>> redact("401 for token hf_abc123xyz", "hf_abc123xyz")
        '401 for token ***'
    """
    import re

    if token:
        text = text.replace(token, "***")
    # Hub user tokens look like `hf_` + 34 letters; hide any that slipped in from another source (e.g. a header dump).
    return re.sub(r"\bhf_[A-Za-z0-9]{20,}\b", "***", text)
