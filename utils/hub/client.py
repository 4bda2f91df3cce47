"""The one small interface between the uploader and the Hub: preflight, read the remote, commit, tag, retry.

Everything that talks HTTP goes through :class:`HubClient`, a thin layer over ``huggingface_hub.HfApi``, so the same
code runs against huggingface.co and against the local test server (``endpoint=...`` or ``HF_ENDPOINT``).

Retries come in two layers:
- ``huggingface_hub``'s own ``http_backoff`` already retries preupload, LFS batch and LFS PUT requests on
  408/429/5xx and connection errors (honouring ``Retry-After``);
- the commit POST itself is *not* retried by the client (a lost answer may mean the commit landed), so
  :meth:`HubClient.commit` wraps the whole commit in an outer retry with jittered exponential backoff and, before
  every new attempt, re-reads the branch: if the files are already there, the lost commit landed and is reused.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    HFValidationError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id
from huggingface_hub.utils.sha import git_hash

from utils.hub.errors import (
    HubUnreachableError,
    InvalidRepoIdError,
    InvalidTokenError,
    InvalidUploadConfigError,
    MissingTokenError,
    NamespaceAccessError,
    ReadOnlyTokenError,
    RepoNotFoundOnHubError,
    RevisionNotFoundOnHubError,
    redact,
)
from utils.hub.timeouts import DEFAULT_READ_TIMEOUT, install_timeouts, unreachable_reason

__all__ = [
    "HubClient", "LocalFile", "PreflightReport", "RemoteFile", "check_repo_id", "is_transient", "local_files", "resolve_token",
]

logger = logging.getLogger(__name__)

# Status codes worth another try of a whole commit: timeouts, rate limits, server-side failures, and 412 (the
# branch moved under us, e.g. because our own lost commit landed - the re-check sorts that out).
_TRANSIENT_STATUS = {408, 409, 412, 425, 429, 500, 502, 503, 504}


def resolve_token(token: str | None = None) -> str | None:
    """The token to use: the explicit argument, else ``HF_TOKEN``, else the one saved by ``hf auth login``.

    Args:
        token: An explicit token (e.g. from the ``hf_upload.token`` config key); ``None`` to look elsewhere.

    Returns:
        The token, or ``None`` when none is configured anywhere.
    """
    if token:
        return token
    from huggingface_hub import get_token  # reads HF_TOKEN, then the token file of `hf auth login`

    return get_token() or None


def is_transient(exc: BaseException) -> bool:
    """Whether a failed request is worth retrying: network errors and 408/412/429/5xx answers."""
    if isinstance(exc, httpx.TransportError | ConnectionError | TimeoutError):
        return True
    if isinstance(exc, HfHubHTTPError) and exc.response is not None:
        return exc.response.status_code in _TRANSIENT_STATUS
    return False


@dataclass(frozen=True)
class RemoteFile:
    """One file of a remote tree: ``sha256`` for LFS files, ``blob_id`` (git sha1) for every file."""

    path: str
    size: int
    blob_id: str
    sha256: str | None


@dataclass(frozen=True)
class LocalFile:
    """One file to upload, with the hashes needed to tell whether the remote already holds it."""

    path_in_repo: str
    local_path: Path | None
    size: int
    sha256: str
    content: bytes | None = None  # for generated files (the model card)
    # The CommitOperationAdd built while hashing, handed to the first commit attempt so no file is hashed twice
    # (later attempts build fresh ones: the client mutates operations during a commit).
    first_op: list = field(default_factory=list, compare=False, repr=False)

    def git_blob_id(self) -> str:
        """Git's blob id of the content (what the Hub reports for regular, non-LFS files)."""
        data = self.content if self.content is not None else Path(self.local_path).read_bytes()
        return git_hash(data)

    def matches(self, remote: RemoteFile | None) -> bool:
        """True when ``remote`` holds exactly these bytes."""
        if remote is None or remote.size != self.size:
            return False
        if remote.sha256 is not None:
            return remote.sha256 == self.sha256
        return remote.blob_id == self.git_blob_id()  # regular files are small (< 10 MB): hashing is cheap


@dataclass(frozen=True)
class PreflightReport:
    """What preflight found out: who we are, where the model will go and whether anyone can see it."""

    user: str
    repo_id: str
    private: bool
    url: str
    created: bool


class HubClient:
    """A small, retrying facade over :class:`huggingface_hub.HfApi` for model repos.

    Args:
        token: Explicit token; defaults to ``HF_TOKEN`` or the saved login (see :func:`resolve_token`).
        endpoint: Hub URL; defaults to ``HF_ENDPOINT`` or https://huggingface.co.
        max_attempts: Attempts of a whole commit (and of the cheap reads around it) before giving up.
        retry_base_delay: First backoff delay in seconds; doubles per attempt, jittered in [50 %, 100 %].
        retry_max_delay: Upper bound of one backoff delay.
        request_timeout: Seconds one socket read/write may stall before the request fails (and is retried);
            default ``HF_HUB_UPLOAD_TIMEOUT`` or 120. Process-wide (see :mod:`utils.hub.timeouts`).
        sleep: Injected for tests that want no real waiting.

    Example:
        >>> client = HubClient(endpoint="http://127.0.0.1:8080")  # doctest: +SKIP
        >>> client.preflight("alice/tiny-grpo", private=True).url  # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        token: str | None = None,
        endpoint: str | None = None,
        max_attempts: int = 4,
        retry_base_delay: float = 2.0,
        retry_max_delay: float = 60.0,
        sleep: Callable[[float], None] = time.sleep,
        request_timeout: float | None = None,
    ):
        # Every request gets connect/read limits (huggingface_hub sends many with none): a Hub that accepts the
        # connection and never answers fails the request instead of hanging the run (utils/hub/timeouts.py).
        install_timeouts(read=request_timeout or DEFAULT_READ_TIMEOUT)
        self._token = resolve_token(token)
        self.endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
        self.api = HfApi(endpoint=self.endpoint, token=self._token or False)
        self.max_attempts = max(1, int(max_attempts))
        self.retry_base_delay = retry_base_delay
        self.retry_max_delay = retry_max_delay
        self._sleep = sleep

    def __repr__(self) -> str:  # never show the token
        return f"HubClient(endpoint={self.endpoint!r}, token={'***' if self._token else None})"

    @property
    def has_token(self) -> bool:
        return bool(self._token)

    def redact(self, text: str) -> str:
        """``text`` with this client's token hidden."""
        return redact(text, self._token)

    # ------------------------------------------------------------------ preflight
    def whoami(self) -> dict[str, Any]:
        """The token's user (``name``, ``orgs``, ``auth``).

        Raises:
            MissingTokenError: No token is configured.
            InvalidTokenError: The Hub answered 401.
            HubUnreachableError: The endpoint does not answer.
        """
        if not self._token:
            raise MissingTokenError(
                "No Hugging Face token found. Set HF_TOKEN (recommended), run `hf auth login`, or pass token=... "
                "(hf_upload.token in the config). The token needs the 'write' role."
            )
        try:
            return self._read(self.api.whoami)
        except HfHubHTTPError as e:
            if e.response is not None and e.response.status_code == 401:
                raise InvalidTokenError(
                    f"The Hub at {self.endpoint} rejected the token (401). Create a new token with the 'write' role "
                    "at https://huggingface.co/settings/tokens and put it in HF_TOKEN."
                ) from e
            raise HubUnreachableError(self.redact(f"whoami failed at {self.endpoint}: {e}")) from e
        except (httpx.TransportError, OSError) as e:
            raise HubUnreachableError(
                f"{unreachable_reason(self.endpoint, e)}. Check the network and HF_ENDPOINT."
            ) from e

    def preflight(self, repo_id: str, *, private: bool, create: bool = True) -> PreflightReport:
        """Check everything an upload needs before any expensive work starts, and create the repo.

        Checks, in order: the repo id is valid, a token is present and valid, it may write, its user may write to
        the namespace (their own or an org they belong to), and the repo exists (created with the requested
        visibility when missing). A public repo is announced with a WARNING line.

        Args:
            repo_id: ``namespace/name``.
            private: Requested visibility for a new repo; an existing public repo with ``private=True`` is an error.
            create: Create the repo when missing (``False`` for dry runs: read-only checks).

        Returns:
            A :class:`PreflightReport`.

        Raises:
            InvalidRepoIdError, MissingTokenError, InvalidTokenError, ReadOnlyTokenError, NamespaceAccessError,
            InvalidUploadConfigError (private requested, repo public), HubUnreachableError.
        """
        check_repo_id(repo_id)
        me = self.whoami()
        user = me.get("name", "?")
        role = ((me.get("auth") or {}).get("accessToken") or {}).get("role")
        if role == "read":
            raise ReadOnlyTokenError(
                f"The token of user '{user}' is read-only. Create a token with the 'write' role and put it in HF_TOKEN."
            )
        namespace = repo_id.split("/")[0]
        orgs = sorted(o.get("name") for o in me.get("orgs") or [] if o.get("name"))
        if namespace != user and namespace not in orgs:
            raise NamespaceAccessError(
                f"User '{user}' cannot write to namespace '{namespace}' of repo '{repo_id}': it is neither the "
                f"user's own namespace nor one of their organizations ({', '.join(orgs) or 'none'}). Use "
                f"repo_id='{user}/{repo_id.split('/')[1]}' or organization=<an org you belong to>."
            )
        created = False
        try:
            info = self._read(lambda: self.api.repo_info(repo_id))
            is_private = bool(info.private)
            url = f"{self.endpoint}/{repo_id}"
        except RepositoryNotFoundError:
            if not create:
                return PreflightReport(user, repo_id, private, f"{self.endpoint}/{repo_id}", created=False)
            try:
                url = str(self.api.create_repo(repo_id, private=private, exist_ok=True))
            except HfHubHTTPError as e:
                if e.response is not None and e.response.status_code in (401, 403):
                    raise NamespaceAccessError(
                        f"The Hub refused to create '{repo_id}' for user '{user}' ({e.response.status_code}). Check "
                        "that the token may write to this namespace (fine-grained tokens need repo write access)."
                    ) from e
                raise HubUnreachableError(self.redact(f"create_repo('{repo_id}') failed: {e}")) from e
            is_private, created = private, True
        except HfHubHTTPError as e:  # after retries: a server-side failure, not something the user can fix here
            raise HubUnreachableError(self.redact(f"repo_info('{repo_id}') failed at {self.endpoint}: {e}")) from e
        except (httpx.TransportError, OSError) as e:
            raise HubUnreachableError(
                f"{unreachable_reason(self.endpoint, e)}. Check the network and HF_ENDPOINT."
            ) from e
        if private and not is_private:
            raise InvalidUploadConfigError(
                f"Repo '{repo_id}' already exists and is PUBLIC, but private=True was requested. Make it private in "
                f"its settings ({url}/settings) or pass private=False to publish on purpose."
            )
        if is_private:
            logger.info("Hub repo %s is private (%s)", repo_id, "created" if created else "exists")
        else:
            logger.warning(
                "PUBLIC Hub repo: %s - anyone can download every model pushed there. Pass private=True "
                "(hf_upload.private=true) to keep it private.", url,
            )
        return PreflightReport(user=user, repo_id=repo_id, private=is_private, url=url, created=created)

    # ------------------------------------------------------------------ reads
    def check_readable(self, repo_id: str, revision: str | None = None) -> str:
        """The commit of ``repo_id@revision``, or an error saying which of these it is, and what to do.

        A bare ``401``/``404`` from the Hub means one of: no token (a private repo looks absent), a rejected token, a
        repo that does not exist, a revision that does not exist. ``verify`` and ``pull`` call this first.

        Raises:
            MissingTokenError: not found and no token was sent (it may be private).
            InvalidTokenError: the token was rejected.
            RepoNotFoundOnHubError: not found with a valid token.
            RevisionNotFoundOnHubError: the repo exists, the revision does not (names the tags and branches).
            HubUnreachableError: the endpoint does not answer.
        """
        check_repo_id(repo_id)
        try:
            return str(self._read(lambda: self.api.repo_info(repo_id, revision=revision)).sha)
        except RevisionNotFoundError:
            branches, tags = self.refs(repo_id)
            raise RevisionNotFoundOnHubError(
                f"{repo_id} at {self.endpoint} has no revision '{revision}'. Tags: {', '.join(sorted(tags)) or 'none'}; "
                f"branches: {', '.join(sorted(branches)) or 'none'}. Pass one of those (uploads tag step-N)."
            ) from None
        except (RepositoryNotFoundError, HfHubHTTPError) as e:
            status = _status(e)
            if not isinstance(e, RepositoryNotFoundError) and status not in (401, 403, 404):
                raise HubUnreachableError(self.redact(f"repo_info('{repo_id}') failed at {self.endpoint}: "
                                                      f"{_short(e)}")) from None
            if not self._token:
                raise MissingTokenError(
                    f"{repo_id} was not found at {self.endpoint} without a token ({status}): it does not exist, or it "
                    "is private. Set HF_TOKEN (or run `hf auth login`) and retry; if it still fails, check the repo id."
                ) from None
            user = self.whoami().get("name", "?")  # raises InvalidTokenError for a rejected token
            raise RepoNotFoundOnHubError(
                f"{repo_id} does not exist at {self.endpoint}, or user '{user}' may not read it ({status}). Check the "
                "repo id (namespace/name) and the endpoint (HF_ENDPOINT)."
            ) from None
        except (httpx.TransportError, OSError) as e:
            raise HubUnreachableError(
                f"Cannot reach the Hub at {self.endpoint} ({type(e).__name__}). Check the network and HF_ENDPOINT."
            ) from None

    def refs(self, repo_id: str) -> tuple[dict[str, str], dict[str, str]]:
        """``(branches, tags)``, each a map from name to commit id."""
        refs = self._read(lambda: self.api.list_repo_refs(repo_id))
        return ({b.name: b.target_commit for b in refs.branches}, {t.name: t.target_commit for t in refs.tags})

    def tree(self, repo_id: str, revision: str, prefix: str = "") -> dict[str, RemoteFile]:
        """Every file under ``prefix`` at ``revision``, keyed by path in the repo (empty if the path is absent)."""

        def _list() -> dict[str, RemoteFile]:
            out = {}
            try:
                entries = self.api.list_repo_tree(repo_id, path_in_repo=prefix or None, recursive=True,
                                                  revision=revision)
                for e in entries:
                    if getattr(e, "blob_id", None) is None:
                        continue  # a folder
                    lfs = getattr(e, "lfs", None)
                    out[e.path] = RemoteFile(e.path, int(e.size), e.blob_id, lfs.sha256 if lfs else None)
            except EntryNotFoundError:
                return {}
            return out

        return self._read(_list)

    def read_text(self, repo_id: str, path: str, revision: str) -> str | None:
        """The text of one small file at ``revision``, or ``None`` when it does not exist."""
        from huggingface_hub import hf_hub_download

        def _get() -> str | None:
            try:
                local = hf_hub_download(repo_id, path, revision=revision, endpoint=self.endpoint,
                                        token=self._token or False)
            except (EntryNotFoundError, RevisionNotFoundError):
                return None
            return Path(local).read_text(encoding="utf-8", errors="replace")

        return self._read(_get)

    def _read(self, fn: Callable[[], Any]) -> Any:
        """Run a read with the outer retry (reads are idempotent, so retrying them is always safe)."""
        for attempt in range(1, self.max_attempts + 1):
            try:
                return fn()
            except Exception as e:  # noqa: BLE001 - filtered by is_transient right below
                if not is_transient(e) or attempt == self.max_attempts:
                    raise
                self._backoff(attempt, e, "read")
        raise AssertionError("unreachable")

    def _backoff(self, attempt: int, exc: BaseException, what: str) -> None:
        delay = min(self.retry_max_delay, self.retry_base_delay * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
        logger.warning("Hub %s failed (attempt %d/%d: %s); retrying in %.1fs", what, attempt, self.max_attempts,
                       self.redact(_short(exc)), delay)
        self._sleep(delay)

    # ------------------------------------------------------------------ writes
    def commit(
        self,
        repo_id: str,
        files: list[LocalFile],
        *,
        deletions: Iterable[str] = (),
        branch: str,
        message: str,
        description: str | None = None,
        make_ops: Callable[[], list[CommitOperationAdd]] | None = None,
        parent_commit: str | None = None,
        before_attempt: Callable[[str | None], None] | None = None,
    ) -> str:
        """Commit ``files`` (and delete ``deletions``) on ``branch`` with the outer retry; return the commit id.

        Before every retry the branch is re-read: when it already holds every file (and none of the deletions), a
        previous attempt landed although its answer was lost, and its commit is returned instead of committing
        again. Each attempt passes ``parent_commit`` so two writers never silently overwrite each other.

        Args:
            repo_id: Target repo.
            files: What the branch must hold afterwards (with hashes).
            deletions: Paths to remove in the same commit.
            branch: Branch to commit on (``main``, or a temporary branch for an older step).
            message: Commit title (must not contain secrets; it is public).
            description: Commit body.
            make_ops: Builds fresh ``CommitOperationAdd`` objects (they cannot be reused after a failed attempt);
                defaults to one per entry of ``files``.
            parent_commit: The branch head the caller just read (saves a request on the first attempt); later
                attempts always re-read it.
            before_attempt: Called with the head each attempt commits on, right before it (after the "already
                landed" check); it may raise to stop (e.g. a newer step reached ``main`` meanwhile). Because the
                commit names that head as its parent, what the check saw is exactly what the commit lands on.

        Returns:
            The commit id (40 hex) that holds the files.

        Raises:
            The last exception when every attempt failed or the error is not transient.
        """
        deletions = sorted(set(deletions))
        make_ops = make_ops or (lambda: [_to_op(f) for f in files])
        for attempt in range(1, self.max_attempts + 1):
            head = None
            try:
                head = parent_commit if attempt == 1 and parent_commit else self.refs(repo_id)[0].get(branch)
                if attempt > 1 and head and self._branch_holds(repo_id, head, files, deletions):
                    logger.info("Commit on %s@%s already landed (%s); not committing again", repo_id, branch, head[:8])
                    return head
                if before_attempt is not None:
                    before_attempt(head)
                ops: list[Any] = make_ops() + [CommitOperationDelete(p) for p in deletions]
                info = self.api.create_commit(repo_id, ops, commit_message=message, commit_description=description,
                                              revision=branch, parent_commit=head)
                return info.oid
            except Exception as e:  # noqa: BLE001 - filtered by is_transient right below
                if not is_transient(e) or attempt == self.max_attempts:
                    raise
                self._backoff(attempt, e, f"commit to {repo_id}@{branch}")
        raise AssertionError("unreachable")

    def _branch_holds(self, repo_id: str, head: str, files: list[LocalFile], deletions: list[str]) -> bool:
        remote = self.tree(repo_id, head)
        return all(f.matches(remote.get(f.path_in_repo)) for f in files) and not (set(deletions) & set(remote))

    def tag(self, repo_id: str, tag: str, commit: str, message: str | None = None) -> None:
        """Create ``tag`` at ``commit``; an existing tag at the same commit is fine (a retried call)."""
        for attempt in range(1, self.max_attempts + 1):
            try:
                self.api.create_tag(repo_id, tag=tag, revision=commit, tag_message=message)
                return
            except Exception as e:  # noqa: BLE001 - filtered below
                if self.refs(repo_id)[1].get(tag) == commit if _status(e) == 409 else False:
                    return  # an earlier attempt created it and lost the answer
                if not is_transient(e) or _status(e) == 409 or attempt == self.max_attempts:
                    raise
                self._backoff(attempt, e, f"tag {tag}")

    def create_branch(self, repo_id: str, branch: str, start: str) -> None:
        """Create ``branch`` at commit ``start`` (used for steps older than the one on ``main``)."""
        self._read(lambda: self.api.create_branch(repo_id, branch=branch, revision=start, exist_ok=True))

    def delete_branch(self, repo_id: str, branch: str) -> None:
        """Delete ``branch``; a missing branch is fine."""
        try:
            self._read(lambda: self.api.delete_branch(repo_id, branch=branch))
        except (RevisionNotFoundError, EntryNotFoundError):
            pass


def check_repo_id(repo_id: str | None) -> None:
    """Raise :class:`InvalidRepoIdError` unless ``repo_id`` is a valid ``namespace/name`` Hub id."""
    if not repo_id or "/" not in str(repo_id):
        raise InvalidRepoIdError(
            f"repo_id {repo_id!r} needs a namespace: use 'user/name' or 'org/name', or pass organization=..."
        )
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise InvalidRepoIdError(f"repo_id {repo_id!r} is not a valid Hub repo id: {e}") from e


def local_files(folder: Path, *, prefix: str = "", extra: Mapping[str, bytes] | None = None,
                known: Mapping[str, tuple[str, CommitOperationAdd | None]] | None = None) -> list[LocalFile]:
    """Describe every file under ``folder`` (sha256 computed once, streamed) plus generated ``extra`` files.

    Args:
        folder: A consolidated Hugging Face folder.
        prefix: Path prefix inside the repo (``""`` for the root; an experiment's namespace is a subfolder).
        extra: Generated files ``{path_in_folder: bytes}`` (e.g. ``README.md``) that do not exist on disk.
        known: ``{path_in_folder: (sha256, operation or None)}`` for files whose digest is already known (computed
            while they were written, :mod:`utils.hub.pipeline`): not read again; the operation (maybe pre-uploaded)
            goes to the first commit attempt.

    Returns:
        Sorted list of :class:`LocalFile`.
    """
    from concurrent.futures import ThreadPoolExecutor

    out: list[LocalFile] = []
    paths = []
    for p in sorted(folder.rglob("*")):
        if not p.is_file():
            continue
        rel = p.relative_to(folder).as_posix()
        sha, op = (known or {}).get(rel, (None, None))
        if op is not None and op.path_in_repo == _join(prefix, rel) and op.upload_info.size == p.stat().st_size:
            out.append(LocalFile(op.path_in_repo, p, op.upload_info.size, sha, first_op=[op]))
        elif sha is not None and op is None:  # digest known, nothing sent yet: the commit builds the operation
            out.append(LocalFile(_join(prefix, rel), p, p.stat().st_size, sha))
        else:
            paths.append(p)
    ops = [CommitOperationAdd(_join(prefix, p.relative_to(folder).as_posix()), str(p)) for p in paths]
    # The operation hashes its file lazily (sha256, streamed) and keeps the hash: hash every shard in parallel
    # (hashlib releases the GIL), as the client itself would, then hand these operations to the first commit.
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(ops)))) as pool:
        digests = list(pool.map(lambda op: op.upload_info.sha256.hex(), ops))
    out += [LocalFile(op.path_in_repo, p, op.upload_info.size, digest, first_op=[op])
            for p, op, digest in zip(paths, ops, digests, strict=True)]
    for rel, data in (extra or {}).items():
        out.append(LocalFile(_join(prefix, rel), None, len(data), hashlib.sha256(data).hexdigest(), content=data))
    return sorted(out, key=lambda f: f.path_in_repo)


def _to_op(f: LocalFile) -> CommitOperationAdd:
    if f.first_op:
        return f.first_op.pop()
    op = CommitOperationAdd(f.path_in_repo, f.content if f.content is not None else str(f.local_path))
    op.upload_info.sha256 = bytes.fromhex(f.sha256)  # known already: a retry does not read the file again
    return op


def _join(prefix: str, rel: str) -> str:
    return f"{prefix.strip('/')}/{rel}" if prefix.strip("/") else rel


def _status(exc: BaseException) -> int | None:
    resp = getattr(exc, "response", None)
    return getattr(resp, "status_code", None)


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:300]
