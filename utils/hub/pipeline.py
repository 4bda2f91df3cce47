"""Shards -> Hub as one pipeline: upload each finished output file while the consolidation writes the next ones.

Without it, an upload is two passes after the consolidation: hash every file (read it all again), then send it.
Here the consolidation engine reports each file as soon as it is complete, with the sha256 it computed while
writing (``consolidate_checkpoint(..., on_file_written=...)``), and :class:`PreUploader` sends its bytes to the
Hub's LFS storage from a background thread through huggingface_hub's public API
(:meth:`HfApi.preupload_lfs_files` on a :class:`CommitOperationAdd` whose ``upload_info.sha256`` is already set,
so the client never re-reads the file to hash it). Nothing becomes visible on the Hub until the one commit that
follows the consolidation (then the tag and card, as before): a failure still leaves nothing that looks complete.

Pre-uploading is an optimisation, never a second source of truth: if it fails (Hub down, a refused object), the
pre-uploader stops and the commit uploads whatever is missing itself, with the client's retries and the pending
marker on failure, exactly as without the pipeline. Content-addressed LFS objects make an early or repeated upload
harmless: the server answers "already stored" for bytes it has.

Works unchanged with Xet storage on huggingface.co (the client routes LFS uploads to Xet) and with plain LFS on the
local test server (``HF_HUB_DISABLE_XET=1``).

Example:
    >>> pre = PreUploader(client, "alice/model", links_dir=staging / "links")  # doctest: +SKIP
    >>> consolidate_checkpoint(ckpt, staging / "model", on_file_written=pre)  # doctest: +SKIP
    >>> known = pre.finish()  # {name: (sha256, operation)}: plan_push(..., known=known) hashes nothing again
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from pathlib import Path

from huggingface_hub import CommitOperationAdd

from utils.hub.client import HubClient

__all__ = ["PreUploader"]

logger = logging.getLogger(__name__)

_DONE = object()
_BINARY_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")  # weight shards and optimizer.pt: worth sending early
_LARGE = 10 * 1000 * 1000  # anything this big goes early too (the Hub stores it in LFS/Xet)


class PreUploader:
    """Callback for ``consolidate_checkpoint(on_file_written=...)`` that pre-uploads finished files.

    Args:
        client: The Hub interface (its ``api`` is a :class:`huggingface_hub.HfApi`).
        repo_id: Target repo (it exists: preflight created it).
        links_dir: A folder on the same filesystem as the consolidation output; each reported file is hard-linked
            there (no copy) because the engine renames its build folder when it finishes.
        prefix: Path prefix inside the repo (a run's namespace).
        tag: The tag this upload will get: files already on ``main`` or under that tag are not sent again (a
            re-upload of an unchanged step sends nothing, as without the pipeline).
        revision: Branch the upload modes are asked for (LFS objects themselves are repo-wide).
    """

    def __init__(self, client: HubClient, repo_id: str, *, links_dir: Path, prefix: str = "", tag: str | None = None,
                 revision: str = "main"):
        self.client, self.repo_id, self.prefix, self.revision = client, repo_id, prefix.strip("/"), revision
        self.tag = tag
        self._remote: set[str] | None = None  # sha256 of the LFS files main (and the tag) already hold
        self.links_dir = Path(links_dir)
        self.links_dir.mkdir(parents=True, exist_ok=True)
        self._known: dict[str, tuple[str, CommitOperationAdd | None]] = {}
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue()
        self._failed: str | None = None
        self._root: Path | None = None
        self.uploaded_bytes = 0
        self._thread = threading.Thread(target=self._run, name="hub-preupload", daemon=True)
        self._thread.start()

    def __call__(self, path: Path, sha256: str) -> None:
        """Record ``path`` (a flat file of the output folder) with its digest and queue its upload."""
        path = Path(path)
        if self._root is None:
            self._root = path.parent  # the engine's build folder: weight shards are reported first
        if path.parent != self._root:
            return  # a file in a subfolder (e.g. a LoRA adapter/): hashed and sent by the commit as usual
        if not path.name.endswith(_BINARY_SUFFIXES) and path.stat().st_size < _LARGE:
            # config/tokenizer/index: small text the commit carries inline; only its digest is worth keeping
            with self._lock:
                self._known[path.name] = (sha256, None)
            return
        link = self.links_dir / path.name
        try:
            if link.exists():
                link.unlink()
            os.link(path, link)
        except OSError as e:  # e.g. a filesystem without hard links: the commit uploads it instead
            logger.info("not pre-uploading %s (%s)", path.name, e.strerror or e)
            return
        path_in_repo = f"{self.prefix}/{path.name}" if self.prefix else path.name
        op = CommitOperationAdd(path_in_repo=path_in_repo, path_or_fileobj=str(link))
        op.upload_info.sha256 = bytes.fromhex(sha256)  # computed while writing: the client must not read it again
        with self._lock:
            self._known[path.name] = (sha256, op)
        self._queue.put(op)

    def _remote_lfs(self) -> set[str]:
        branches, tags = self.client.refs(self.repo_id)
        out: set[str] = set()
        for commit in {branches.get("main"), tags.get(self.tag) if self.tag else None} - {None}:
            out |= {f.sha256 for f in self.client.tree(self.repo_id, commit, prefix=self.prefix).values() if f.sha256}
        return out

    def _run(self) -> None:
        while (op := self._queue.get()) is not _DONE:
            if self._failed is not None:
                continue
            try:
                if self._remote is None:
                    self._remote = self._remote_lfs()
                if op.upload_info.sha256.hex() in self._remote:
                    continue  # the Hub holds these bytes already; the commit just refers to them
                self.client.api.preupload_lfs_files(self.repo_id, additions=[op], revision=self.revision,
                                                    free_memory=False)
                if op._upload_mode == "lfs":  # noqa: SLF001 - read-only look at what the client decided
                    self.uploaded_bytes += op.upload_info.size
            except Exception as e:  # noqa: BLE001 - the commit uploads what is missing, with retries and marker
                self._failed = self.client.redact(f"{type(e).__name__}: {e}".splitlines()[0])[:300]
                logger.warning("pre-upload to %s stopped (%s); the commit will upload the rest", self.repo_id,
                               self._failed)

    def finish(self) -> dict[str, tuple[str, CommitOperationAdd | None]]:
        """Wait for the queued uploads; return ``{file name: (sha256, operation or None)}`` for every reported file.

        The operations of uploaded files are marked uploaded; hand them to the commit (``LocalFile.first_op``) so it
        neither hashes nor sends them again. Never raises for an upload failure (see the module docstring).
        """
        self._queue.put(_DONE)
        self._thread.join()
        with self._lock:
            return dict(self._known)

    @property
    def failure(self) -> str | None:
        """Why pre-uploading stopped, if it did (token-free)."""
        return self._failed
