"""The process that consolidates and uploads during training, and what it sends back to the driver.

Kept apart from :mod:`training.hub_upload_hook` on purpose: Ray imports an actor's module in the actor's process,
and the hook imports veRL (about 10 s of imports on a CPU core, per upload actor) while this module needs only
the uploader (``utils/``), Ray and the standard library.
"""

from __future__ import annotations

import os
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import ray

from utils.hub.errors import UploadFailedError, redact

__all__ = ["UploadOutcome", "upload_outcome", "UPLOAD_NICENESS"]

UPLOAD_NICENESS = 10


@dataclass(frozen=True)
class UploadOutcome:
    """What the upload actor sends back to the driver: picklable, token-free, no message parsing needed.

    Attributes:
        step: The training step.
        status: ``"uploaded"`` or ``"failed"``.
        summary, tag, commit: Of a finished upload (:meth:`utils.hub.uploader.UploadResult.summary`, ``step-N``, sha).
        error_class: The exception's class name (``UploadFailedError``, ``CorruptShardError``, ...).
        message: What went wrong, one line, without the "finish it later" hint.
        pending_marker: The ``upload_pending.json`` left in the step directory, if any.
        traceback: The redacted traceback, printed to the run's log by the driver.
        bytes_gathered: Bytes of other nodes' rank files copied here through Ray for this upload (multi-node runs).
        resume_command: A multi-node upload whose gather failed (a node was gone): the command that finishes it
            once the node is back (``python -m training.cluster_upload resume STEP_DIR``); "" otherwise.
    """

    step: int
    status: Literal["uploaded", "failed"]
    summary: str = ""
    tag: str = ""
    commit: str = ""
    error_class: str = ""
    message: str = ""
    pending_marker: str | None = None
    traceback: str = ""
    bytes_gathered: int = 0
    resume_command: str = ""

    def raise_if_failed(self) -> UploadOutcome:
        """``self`` when uploaded; else an :class:`UploadFailedError` carrying the reason and the marker."""
        if self.status == "uploaded":
            return self
        error = UploadFailedError(self.message, pending_marker=self.pending_marker, reason=self.message)
        error.resume_command = self.resume_command or None  # type: ignore[attr-defined]
        raise error


# One actor per run does every upload: a dedicated process (the lowered priority never reaches a pooled Ray worker
# that later runs training work), warm after the first upload (torch, transformers, huggingface_hub imported once).
# num_cpus=0: placement groups may hold every CPU of the node, and the work is mostly I/O and hashing.
@ray.remote(num_cpus=0, max_restarts=0)
class _UploadActor:
    """Consolidates + uploads checkpoints, one call at a time, in a low-priority process on rank 0's node."""

    def __init__(self, settings: dict[str, Any], token: str | None = None):
        try:  # hashing and copying yield the CPU to the training ranks on the same node
            os.nice(UPLOAD_NICENESS)
        except OSError:
            pass
        self.settings = settings
        # The token arrives as an argument, not through the runtime environment: Ray's runtime_env agent logs
        # env_vars in clear (runtime_env_agent.log), and a joined cluster's workers do not inherit the driver's env.
        # This process is the actor's own (max_restarts=0), so its environment is where the uploader looks.
        if token:
            os.environ["HF_TOKEN"] = token

    def upload(self, checkpoint_dir: str, step: int, metrics: dict[str, float] | None,
               gather: dict[str, Any] | None = None) -> UploadOutcome:
        """Consolidate and upload one checkpoint; every failure comes back as a ``failed`` outcome, not raised.

        ``gather`` (multi-node runs): ``{"layout": ClusterLayout, "readers": {node id: ShardReader}}``; the files of
        other nodes are copied here first (nothing moves on shared storage) and removed after a successful upload.
        """
        return upload_outcome(self.settings, checkpoint_dir, step, metrics, gather)


def upload_outcome(settings: dict[str, Any], checkpoint_dir: str | Path, step: int,
                   metrics: dict[str, float] | None, gather: dict[str, Any] | None = None) -> UploadOutcome:
    """What the upload actor runs: one upload with ``settings``, its result or failure as an :class:`UploadOutcome`.

    The token comes from ``HF_TOKEN``; it is redacted from the message and traceback. With ``gather`` (see
    :meth:`_UploadActor.upload`) the other nodes' files are gathered first (``training/cluster_upload.py``).
    """
    from utils.hub.uploader import HuggingFaceUploader

    report = None
    try:
        uploader = HuggingFaceUploader(**settings)
        if gather is not None and _hub_answers(uploader):  # a Hub that refuses: no bytes moved for nothing
            from training.cluster_upload import gather_for_upload

            report, failure = gather_for_upload(uploader, Path(checkpoint_dir), step, metrics, **gather)
            if failure is not None:
                return UploadOutcome(step, "failed", error_class="RankFileUnavailableError",
                                     message=failure["error"], pending_marker=failure["marker"],
                                     resume_command=failure["resume_command"])
        result = uploader.upload_from_checkpoint_dir(checkpoint_dir, step=step, metrics=metrics)
    except Exception as e:  # noqa: BLE001 - reported by the driver; e.g. the Hub is down, a corrupt checkpoint
        failed = isinstance(e, UploadFailedError)
        token = os.environ.get("HF_TOKEN")
        return UploadOutcome(
            step, "failed", error_class=type(e).__name__,
            message=e.reason if failed else redact(f"{type(e).__name__}: {e}".splitlines()[0], token),
            pending_marker=e.pending_marker if failed else None,
            traceback=redact(traceback.format_exc(), token),
            resume_command=_cluster_resume(checkpoint_dir) if gather is not None and failed and e.pending_marker
            else "")
    summary = result.summary()
    if report is not None:
        report.remove_fetched()  # each node keeps only its own ranks' files
        summary += f"; {report.summary()}"
    return UploadOutcome(step, "uploaded", summary=summary, tag=result.tag, commit=result.commit_sha,
                         bytes_gathered=report.bytes_moved if report is not None else 0)


def _cluster_resume(checkpoint_dir: str | Path) -> str:
    # other nodes' files are needed to finish it: only a cluster resume can
    from training.cluster_upload import resume_command

    return resume_command(checkpoint_dir)


def _hub_answers(uploader: Any) -> bool:
    """Preflight before gathering; ``False`` if the Hub is unreachable (the upload then fails with its marker)."""
    from utils.hub.errors import HubUnreachableError

    try:
        uploader.preflight()
    except HubUnreachableError:
        return False
    return True
