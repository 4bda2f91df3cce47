"""Storage behind the local Hub server (`tests/hub_server.py`): blobs on disk, repos and commits as JSON.

Blobs are content-addressed by sha256 under `<root>/blobs/ab/abcdef...`; every file of every commit points at one.
Repos, their commits (a full `{path: entry}` snapshot per commit, git-like ids) and refs live in memory and are
mirrored to `<root>/state.json` after each change, so a server restarted on the same root keeps its repos.

An entry is `{"sha256", "size", "lfs", "oid"}` where `oid` is what git would call the blob id: the sha1 of the file
for a regular file, the sha1 of the LFS pointer file for an LFS file (as on the Hub).

Hand-written (no library serves this): the real Hub's storage is git + S3/Xet; this is the smallest model of it that
the `huggingface_hub` client cannot tell apart over HTTP.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import os
import re
import tempfile
import threading
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

# The Hub stores a file with LFS when it is larger than 10 MB, binary, or matched by `.gitattributes`.
LFS_SIZE_THRESHOLD = 10 * 1000 * 1000
# The `.gitattributes` the Hub writes in the initial commit of a new model repo (abridged to the usual suspects).
DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (
        "*.7z",
        "*.arrow",
        "*.bin",
        "*.bz2",
        "*.ckpt",
        "*.ftz",
        "*.gz",
        "*.h5",
        "*.joblib",
        "*.lfs.*",
        "*.mlmodel",
        "*.model",
        "*.msgpack",
        "*.npy",
        "*.npz",
        "*.onnx",
        "*.ot",
        "*.parquet",
        "*.pb",
        "*.pickle",
        "*.pkl",
        "*.pt",
        "*.pth",
        "*.rar",
        "*.safetensors",
        "saved_model/**/*",
        "*.tar.*",
        "*.tar",
        "*.tflite",
        "*.tgz",
        "*.wasm",
        "*.xz",
        "*.zip",
        "*.zst",
        "*tfevents*",
    )
)
REPO_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


class HubError(Exception):
    """An HTTP error answer: status, message (JSON `error`) and the `X-Error-Code` the client maps to exceptions."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, dict(headers or {})


def now_iso() -> str:
    """The Hub's date format, e.g. `2024-01-01T00:00:00.000Z`."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def git_blob_oid(data: bytes) -> str:
    """Git's blob id (`git hash-object`), which the client compares with preupload's `oid` for regular files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-lfs pointer file that git stores in place of an LFS file."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def make_entry(sha256: str, size: int, lfs: bool, content: bytes | None = None) -> dict[str, Any]:
    """A tree entry; `content` is needed for regular files (their git oid hashes the content)."""
    oid = git_blob_oid(lfs_pointer(sha256, size)) if lfs else git_blob_oid(content or b"")
    return {"sha256": sha256, "size": size, "lfs": lfs, "oid": oid}


def _check_path(path: str) -> str:
    parts = path.split("/")
    if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts) or ".git" in parts:
        raise HubError(400, f"Invalid path in repo: {path!r}")
    return path


class BlobStore:
    """Content-addressed files under `<root>/blobs`; writes go to a temp file, are checked, then renamed."""

    def __init__(self, root: Path):
        self.root = root / "blobs"
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256

    def has(self, sha256: str, size: int | None = None) -> bool:
        p = self.path(sha256)
        return p.is_file() and (size is None or p.stat().st_size == size)

    def put_bytes(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        if not self.has(sha):
            self.put_chunks([data], sha, len(data))
        return sha

    def put_chunks(self, chunks: Iterable[bytes], sha256: str, size: int) -> int:
        """Stream chunks to disk; keep them only if sha256 and size match. Returns the bytes read.

        Raises:
            HubError: 400 when the received bytes do not match `sha256`/`size` (nothing is kept).
            OSError/ConnectionError: from `chunks` when the sender goes away (nothing is kept).
        """
        target = self.path(sha256)
        target.parent.mkdir(parents=True, exist_ok=True)
        hasher, received = hashlib.sha256(), 0
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".incoming-")
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in chunks:
                    hasher.update(chunk)
                    f.write(chunk)
                    received += len(chunk)
            if received != size or hasher.hexdigest() != sha256:
                raise HubError(
                    400,
                    f"Uploaded content does not match: got {received} bytes with sha256 "
                    f"{hasher.hexdigest()}, expected {size} bytes with sha256 {sha256}",
                )
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return received


class HubStore:
    """Repos, commits and refs. Every method that reads or changes state holds `self.lock`."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.blobs = BlobStore(self.root)
        self.lock = threading.RLock()
        self._state_path = self.root / "state.json"
        self.repos: dict[str, dict[str, Any]] = {}
        if self._state_path.exists():
            self.repos = json.loads(self._state_path.read_text())["repos"]
        self._counter = 0

    def save(self) -> None:
        tmp = self._state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"repos": self.repos}))
        os.replace(tmp, self._state_path)

    # ----- repos -----
    def get_repo(self, repo_type: str, repo_id: str) -> dict[str, Any] | None:
        return self.repos.get(f"{repo_type}:{repo_id}")

    def create_repo(self, repo_type: str, repo_id: str, *, private: bool, author: str) -> dict[str, Any]:
        namespace, _, name = repo_id.partition("/")
        if not REPO_NAME_RE.match(name) or not namespace:
            raise HubError(400, f"Invalid repo name {repo_id!r}: use letters, digits, '-', '_' and '.' only")
        with self.lock:
            repo = {
                "type": repo_type,
                "id": repo_id,
                "private": private,
                "created_at": now_iso(),
                "commits": {},
                "branches": {},
                "tags": {},
                "lfs": {},
            }
            self.repos[f"{repo_type}:{repo_id}"] = repo
            # Like the Hub: a new repo starts with one commit holding the default `.gitattributes`.
            data = DEFAULT_GITATTRIBUTES.encode()
            files = {".gitattributes": make_entry(self.blobs.put_bytes(data), len(data), False, data)}
            repo["branches"]["main"] = self._new_commit(repo, None, files, "initial commit", "", author)
            self.save()
            return repo

    def has_lfs(self, repo: dict[str, Any], oid: str, size: int) -> bool:
        """Whether this repo holds the LFS object. Like on the Hub, LFS objects belong to a repo: the same
        content pushed to another repo is uploaded again (the bytes on disk are shared)."""
        return repo["lfs"].get(oid) == size and self.blobs.has(oid, size)

    def add_lfs(self, repo: dict[str, Any], oid: str, size: int) -> None:
        with self.lock:
            repo["lfs"][oid] = size
            self.save()

    def delete_repo(self, repo_type: str, repo_id: str) -> None:
        with self.lock:
            self.repos.pop(f"{repo_type}:{repo_id}", None)
            self.save()

    # ----- revisions -----
    def resolve(self, repo: dict[str, Any], revision: str) -> dict[str, Any]:
        """Branch, tag or full commit id -> commit. Raises HubError 404 `RevisionNotFound`."""
        with self.lock:
            commit_id = repo["branches"].get(revision) or repo["tags"].get(revision)
            if commit_id is None and revision in repo["commits"]:
                commit_id = revision
            if commit_id is None:
                raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            return repo["commits"][commit_id]

    def history(self, repo: dict[str, Any], commit: dict[str, Any]) -> list[dict[str, Any]]:
        """The commit and its ancestors, newest first."""
        with self.lock:
            out = [commit]
            while out[-1]["parent"] is not None:
                out.append(repo["commits"][out[-1]["parent"]])
            return out

    def last_commit(self, repo: dict[str, Any], commit: dict[str, Any], path: str) -> dict[str, Any]:
        """The newest commit, from `commit` back, that changed `path` (what `expand=True` reports)."""
        chain = self.history(repo, commit)
        for newer, older in zip(chain, chain[1:], strict=False):
            if newer["files"].get(path) != older["files"].get(path):
                return newer
        return chain[-1]

    def _new_commit(self, repo, parent, files, title, description, author) -> str:
        self._counter += 1
        date = now_iso()
        seed = json.dumps([repo["id"], parent, sorted(files.items()), title, description, date, self._counter])
        commit_id = hashlib.sha1(seed.encode()).hexdigest()
        message = title + (f"\n\n{description}" if description else "")
        repo["commits"][commit_id] = {
            "id": commit_id,
            "parent": parent,
            "title": title,
            "message": message,
            "date": date,
            "author": author,
            "files": files,
        }
        repo["last_modified"] = date
        return commit_id

    # ----- writes -----
    def upload_mode(self, repo: dict[str, Any], commit: dict[str, Any], path: str, size: int, sample: bytes) -> str:
        """`"lfs"` or `"regular"`, decided the way the Hub does: size, `.gitattributes` patterns, binary sample."""
        if size > LFS_SIZE_THRESHOLD or b"\0" in sample:
            return "lfs"
        entry = commit["files"].get(".gitattributes")
        attrs = self.blobs.path(entry["sha256"]).read_text() if entry else ""
        for line in attrs.splitlines():
            pattern, *attributes = line.split()
            if "filter=lfs" in attributes:
                target = path if "/" in pattern else path.rsplit("/", 1)[-1]
                if fnmatch.fnmatch(target, pattern):
                    return "lfs"
        return "regular"

    def commit(
        self,
        repo: dict[str, Any],
        branch: str,
        operations: list[dict[str, Any]],
        *,
        author: str,
        parent_commit: str | None = None,
    ) -> str:
        """Apply NDJSON commit lines (`header`, `file`, `lfsFile`, `deletedFile`, `deletedFolder`) to a branch.

        Returns:
            The new commit id.

        Raises:
            HubError: 404 `RevisionNotFound` (no such branch), 412 (parentCommit is not the head), 400 (bad line,
                LFS object not uploaded), 404 `EntryNotFound` (deleting a file that does not exist).
        """
        header = next((op["value"] for op in operations if op.get("key") == "header"), None)
        if header is None or not header.get("summary"):
            raise HubError(400, "The commit needs a header line with a non-empty summary")
        staged: list[tuple[str, str, dict[str, Any] | None]] = []  # (kind, path, entry) built outside the lock
        for op in operations:
            key, value = op.get("key"), op.get("value") or {}
            if key == "file":
                data = (
                    base64.b64decode(value["content"])
                    if value.get("encoding") == "base64"
                    else value["content"].encode()
                )
                sha = self.blobs.put_bytes(data)
                staged.append(("add", _check_path(value["path"]), make_entry(sha, len(data), False, data)))
            elif key == "lfsFile":
                oid, size = value["oid"], int(value["size"])
                if value.get("algo", "sha256") != "sha256" or not self.has_lfs(repo, oid, size):
                    raise HubError(400, f"LFS object {oid} ({size} bytes) for {value['path']!r} was not uploaded")
                staged.append(("add", _check_path(value["path"]), make_entry(oid, size, True)))
            elif key in ("deletedFile", "deletedFolder"):
                staged.append((key, value["path"].rstrip("/") if key == "deletedFolder" else value["path"], None))
            elif key != "header":
                raise HubError(400, f"Unknown commit line key {key!r}")
        with self.lock:
            if branch not in repo["branches"]:
                if branch in repo["tags"] or branch in repo["commits"]:
                    raise HubError(400, f"Cannot commit to {branch!r}: it is not a branch")
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            head = repo["branches"][branch]
            if parent_commit is not None and parent_commit != head:
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            files = dict(repo["commits"][head]["files"])
            for kind, path, entry in staged:
                if kind == "add":
                    files[path] = entry
                elif kind == "deletedFile":
                    if files.pop(path, None) is None:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                else:
                    doomed = [p for p in files if p.startswith(path + "/")] if path else list(files)
                    if not doomed:
                        raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                    for p in doomed:
                        del files[p]
            commit_id = self._new_commit(repo, head, files, header["summary"], header.get("description") or "", author)
            repo["branches"][branch] = commit_id
            self.save()
            return commit_id

    # ----- listings -----
    def tree(self, commit: dict[str, Any], path: str, recursive: bool) -> list[tuple[str, dict[str, Any] | None]]:
        """`(path, entry)` for files and `(path, None)` for folders under `path`, sorted; [] if nothing is there."""
        prefix = path.strip("/")
        files = commit["files"]
        if prefix in files:
            return [(prefix, files[prefix])]
        out: dict[str, dict[str, Any] | None] = {}
        for p, entry in files.items():
            if prefix and not p.startswith(prefix + "/"):
                continue
            rest = p[len(prefix) + 1 :] if prefix else p
            parts = rest.split("/")
            base = f"{prefix}/" if prefix else ""
            for depth in range(1, len(parts) if recursive else min(len(parts), 2)):
                out[base + "/".join(parts[:depth])] = None
            if recursive or len(parts) == 1:
                out[p] = entry
        return sorted(out.items())

    @staticmethod
    def folder_oid(commit: dict[str, Any], path: str) -> str:
        """A stable stand-in for git's tree id: hash of the files under the folder."""
        under = sorted((p, e["oid"]) for p, e in commit["files"].items() if p.startswith(path + "/"))
        return hashlib.sha1(json.dumps(under).encode()).hexdigest()
