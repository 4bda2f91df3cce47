"""Uploads off the training critical path: at most one in flight, the newest save replaces a queued older one, and
the final upload is never dropped.

The trainer hook (``training/``) owns one :class:`BackgroundUploader` per run. On each save it calls
:meth:`BackgroundUploader.submit`; at the end :meth:`BackgroundUploader.finish` (``final=True`` submit + wait).
Checkpoint rotation must not delete a directory returned by :meth:`BackgroundUploader.pinned_dirs` (it is being
or will be consolidated).

The upload itself is any callable ``upload_fn(checkpoint_dir, step, metrics) -> result`` - by default
``HuggingFaceUploader.upload_from_checkpoint_dir`` in this process's worker thread; the trainer may pass a function
that runs the same call in a Ray task on rank 0's node and waits for it (``utils/`` never imports Ray).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from utils.hub.errors import UploaderClosedError

__all__ = ["BackgroundUploader", "UploadJob"]

logger = logging.getLogger(__name__)


@dataclass
class UploadJob:
    """One requested upload and, once done, its result or error."""

    checkpoint_dir: Path
    step: int
    final: bool = False
    metrics: Mapping[str, float] | None = None
    result: Any = None
    error: BaseException | None = None
    state: str = "queued"  # queued -> running -> done | failed | replaced
    submitted_at: float = field(default_factory=time.monotonic)
    seconds: float = 0.0


class BackgroundUploader:
    """A single worker thread that uploads checkpoints one at a time.

    Args:
        upload_fn: ``upload_fn(checkpoint_dir, step, metrics)``; exceptions are caught and recorded in the job
            (the uploader already wrote ``upload_pending.json``), never raised into the training loop.
        on_done: Optional callback ``on_done(job)`` after each job (logging, metrics).
        niceness: Lower the worker thread's CPU priority by this much (Linux, best effort) so hashing and sending
            yield the CPU to the training loop's threads; 0 leaves it alone.

    Example:
        >>> up = HuggingFaceUploader("alice/m", private=True)  # doctest: +SKIP
        >>> bg = BackgroundUploader(lambda d, s, m: up.upload_from_checkpoint_dir(d, step=s, metrics=m))  # doctest: +SKIP
        >>> bg.submit("ckpt/global_step_100", 100)  # doctest: +SKIP
        >>> jobs = bg.finish("ckpt/global_step_500", 500, timeout=3600)  # doctest: +SKIP
    """

    def __init__(self, upload_fn: Callable[[Path, int, Mapping[str, float] | None], Any],
                 on_done: Callable[[UploadJob], None] | None = None, niceness: int = 10):
        self._upload_fn = upload_fn
        self._niceness = niceness
        self._on_done = on_done
        self._cond = threading.Condition()
        self._queued: UploadJob | None = None
        self._running: UploadJob | None = None
        self._closed = False
        self.jobs: list[UploadJob] = []  # every job ever submitted, in order
        self._thread = threading.Thread(target=self._loop, name="hf-background-upload", daemon=True)
        self._thread.start()

    def submit(self, checkpoint_dir: str | Path, step: int, *, final: bool = False,
               metrics: Mapping[str, float] | None = None) -> UploadJob:
        """Queue an upload. Returns immediately.

        If a job is already queued (not yet running), the new one replaces it - unless the queued one is final and
        the new one is not (the final upload is never dropped). A running job is never interrupted.
        """
        job = UploadJob(Path(checkpoint_dir), int(step), final, dict(metrics) if metrics else None)
        with self._cond:
            if self._closed:
                raise UploaderClosedError("BackgroundUploader is closed")
            self.jobs.append(job)
            old = self._queued
            if old is not None and old.final and not final:
                job.state = "replaced"
                logger.warning("upload of step %d not queued: the final upload (step %d) is already waiting",
                               job.step, old.step)
                return job
            if old is not None:
                old.state = "replaced"
                logger.info("upload of step %d replaced by the newer step %d before it started", old.step, job.step)
            self._queued = job
            self._cond.notify_all()
        return job

    def pinned_dirs(self) -> set[Path]:
        """Checkpoint directories that rotation must keep: the one being uploaded and the one queued."""
        with self._cond:
            return {j.checkpoint_dir for j in (self._running, self._queued) if j is not None}

    @property
    def busy(self) -> bool:
        with self._cond:
            return self._running is not None or self._queued is not None

    def wait(self, timeout: float | None = None) -> bool:
        """Block until nothing is running or queued; ``False`` if ``timeout`` seconds passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._running is not None or self._queued is not None:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def finish(self, checkpoint_dir: str | Path | None = None, step: int | None = None, *,
               metrics: Mapping[str, float] | None = None, timeout: float | None = None) -> list[UploadJob]:
        """Submit the final upload (if given), wait for everything, stop the worker, and return every job."""
        if checkpoint_dir is not None and step is not None:
            self.submit(checkpoint_dir, step, final=True, metrics=metrics)
        done = self.wait(timeout)
        if not done:
            logger.error("background upload still running after %.0fs; leaving it (a pending marker will remain)",
                         timeout)
        self.close()
        return list(self.jobs)

    def close(self) -> None:
        """Stop accepting jobs; the worker exits once the queue is empty."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _loop(self) -> None:
        if self._niceness and hasattr(os, "setpriority"):
            try:  # Linux threads are schedulable tasks: this lowers only the worker thread's priority
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self._niceness)
            except OSError:
                pass
        while True:
            with self._cond:
                while self._queued is None and not self._closed:
                    self._cond.wait()
                if self._queued is None:
                    return
                job, self._queued = self._queued, None
                self._running = job
                job.state = "running"
            t0 = time.monotonic()
            try:
                job.result = self._upload_fn(job.checkpoint_dir, job.step, job.metrics)
                job.state = "done"
            except BaseException as e:  # noqa: BLE001 - recorded on the job; training must go on
                job.error, job.state = e, "failed"
                logger.error("background upload of step %d failed: %s", job.step, str(e).splitlines()[0] if
                             str(e) else type(e).__name__)
            job.seconds = time.monotonic() - t0
            # Report first, then clear "running": wait()/finish() return only after the ERROR line (with the command
            # that finishes the job) is out, so it is never lost when the process ends right after.
            if self._on_done is not None:
                try:
                    self._on_done(job)
                except Exception:  # noqa: BLE001 - a broken callback must not kill the worker
                    logger.exception("on_done callback failed")
            with self._cond:
                self._running = None
                self._cond.notify_all()
