"""HTTP side of the local Hub server (`tests/hub_server.py`): routing, auth checks and the Hub's endpoints.

Each endpoint answers what the `huggingface_hub` client reads;
errors carry the `X-Error-Code`/`X-Error-Message` headers the client maps to its exception classes. The handler
reaches the `HubServer` (users, fault knobs, counters, store) through `self.server.hub`.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import socket
import socketserver
import struct
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from tests.hub_server_storage import HubError, lfs_pointer, now_iso

_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_API_ROUTE = re.compile(r"^(revision|preupload|commit|commits|tree|paths-info|branch|tag)$")
BAD_TOKEN_MESSAGE = "Invalid credentials in Authorization header"  # exact string the client keys on
_CHUNK = 1 << 20


class _Reset(Exception):
    """Raised inside a handler to drop the connection without an answer (a connection reset)."""


class HubHTTPServer(ThreadingHTTPServer):
    """Tracks live connections (so `go_down` can drop them) and can end one with a TCP reset."""

    daemon_threads = True
    hub: Any  # the HubServer serving through this socket

    def __init__(self, *args: Any, **kwargs: Any):
        self.live: set[socket.socket] = set()
        self.to_reset: set[socket.socket] = set()
        self.live_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host name (socket.getfqdn), which can stall on machines without DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that gave up (a test's short timeout, a killed upload) leaves the answer nowhere to go: that is
        # the scenario, not a server error, so no traceback on stderr. Anything else is still printed.
        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            return
        super().handle_error(request, client_address)

    def drop_connections(self) -> None:
        with self.live_lock:
            for sock in list(self.live):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def shutdown_request(self, request: Any) -> None:
        with self.live_lock:
            self.live.discard(request)
            reset = request in self.to_reset
            self.to_reset.discard(request)
        if reset:  # SO_LINGER 0 + close = RST, and skip the FIN a graceful shutdown would send first
            request.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            request.close()
        else:
            super().shutdown_request(request)


class HubRequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the Hub; every answer carries Content-Length
    server: HubHTTPServer

    # ----- plumbing -----
    def setup(self) -> None:
        super().setup()
        with self.server.live_lock:
            self.server.live.add(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.hub.verbose:
            sys.stderr.write(f"[hub] {self.address_string()} {format % args}\n")

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _body_chunks(self, limit: int | None = None):
        """Yield the request body (Content-Length or chunked), at most `limit` bytes; marks the body consumed."""
        self._body_read = True
        sent = 0
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return
                data = self.rfile.read(size)
                self.rfile.readline()
                if len(data) < size:
                    raise ConnectionError("client went away mid-body")
                sent += len(data)
                yield data
                if limit is not None and sent >= limit:
                    return
        else:
            remaining = int(self.headers.get("Content-Length") or 0)
            if limit is not None:
                remaining = min(remaining, limit)
            while remaining > 0:
                data = self.rfile.read(min(remaining, _CHUNK))
                if not data:
                    raise ConnectionError("client went away mid-body")
                remaining -= len(data)
                yield data

    def _body(self) -> bytes:
        return b"".join(self._body_chunks())

    def _json_body(self) -> Any:
        raw = self._body()
        try:
            return json.loads(raw or b"{}")
        except ValueError as e:
            raise HubError(400, f"Request body is not valid JSON: {e}") from e

    def _send(
        self,
        status: int,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> None:
        if not self._body_read:  # answer only after the whole request is read, or keep-alive desyncs
            for _ in self._body_chunks():
                pass
        if self._drop_answer:  # the request was served; the client never hears about it
            raise _Reset()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        if status < 400:
            self.server.hub._count(self.server.hub.completed, self._kind)

    def _send_json(self, obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers)

    def _send_error(self, err: HubError) -> None:
        # Header values must be one latin-1 line; the JSON body keeps the message as it is.
        one_line = err.message.replace("\r", " ").replace("\n", " ").encode("ascii", "backslashreplace").decode()
        headers = {"X-Error-Message": one_line, **err.headers}
        if err.code:
            headers["X-Error-Code"] = err.code
        self._send_json({"error": err.message}, err.status, headers)

    def _reset(self) -> None:
        with self.server.live_lock:
            self.server.to_reset.add(self.connection)
        self.close_connection = True

    # ----- routing -----
    def _dispatch(self, method: str) -> None:
        hub = self.server.hub
        self._body_read = False
        split = urlsplit(self.path)
        self._query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        # Split before unquoting: revisions arrive as one segment with their slashes encoded (`refs%2Fpr%2F1`).
        segments = [unquote(s) for s in split.path.split("/")[1:]]
        self._kind, handler, args = self._route(method, segments)
        self._drop_answer = False
        if hub._hanging.is_set():  # `go_down("hang")`: never answer; reset once the server comes back or stops
            hub._count(hub.requests, self._kind)
            while hub._hanging.is_set() and not hub._down.wait(0.05):
                pass
            return self._reset()
        fault = hub._take_fault(self._kind)
        try:
            if fault is not None and fault["error"] == "hold":
                while not fault["gate"].wait(0.05):
                    if hub._down.is_set():
                        raise _Reset()
            elif fault is not None and fault["error"] == "stall":
                if hub._down.wait(fault["seconds"]):
                    raise _Reset()
            elif fault is not None and fault["error"] == "reset":
                raise _Reset()
            elif fault is not None and fault["error"] == "reset_mid_body":
                length = int(self.headers.get("Content-Length") or 2)
                for chunk in self._body_chunks(limit=max(1, length // 2)):
                    if self._kind == "lfs_put":
                        hub._count_bytes(len(chunk))
                raise _Reset()
            elif fault is not None and fault["error"] == "drop_answer":
                self._drop_answer = True
            elif fault is not None and fault["error"] == 429:
                retry_after = str(int(fault["retry_after"]))
                raise HubError(
                    429, f"Rate limited (injected fault on {self._kind})", headers={"Retry-After": retry_after}
                )
            elif fault is not None:
                raise HubError(int(fault["error"]), f"Injected fault ({fault['error']}) on {self._kind}")
            handler(*args)
        except _Reset:
            self._reset()
        except HubError as e:
            try:
                self._send_error(e)
            except _Reset:  # "drop_answer" also swallows error answers
                self._reset()
        except (ConnectionError, OSError):
            self.close_connection = True
        except Exception as e:  # a server bug: answer 500 with the reason instead of hanging the client
            self._send_error(HubError(500, f"Local hub server error: {type(e).__name__}: {e}"))
            raise

    def _route(self, method: str, s: list[str]) -> tuple[str, Any, tuple]:
        n = len(s)
        if s[:2] == ["api", "whoami-v2"] and method == "GET":
            return "whoami", self.whoami, ()
        if s[:3] == ["api", "repos", "create"] and method == "POST":
            return "create_repo", self.create_repo, ()
        if s[:3] == ["api", "repos", "delete"] and method == "DELETE":
            return "delete_repo", self.delete_repo, ()
        if s[:2] == ["api", "validate-yaml"] and method == "POST":
            return "validate_yaml", self.validate_yaml, ()
        if s[:1] == ["lfs-upload"] and n == 2 and method == "PUT":
            return "lfs_put", self.lfs_put, (s[1],)
        if n >= 4 and s[0] == "api" and s[1] in _TYPES:
            t, repo_id, rest = _TYPES[s[1]], f"{s[2]}/{s[3]}", s[4:]
            if not rest and method == "GET":
                return "repo_info", self.repo_info, (t, repo_id, "main")
            if rest == ["settings"] and method == "PUT":
                return "settings", self.settings, (t, repo_id)
            if rest == ["refs"] and method == "GET":
                return "refs", self.refs, (t, repo_id)
            if len(rest) >= 2 and _API_ROUTE.match(rest[0]):
                action, rev, path = rest[0], rest[1], "/".join(rest[2:])
                table = {
                    ("revision", "GET"): ("repo_info", self.repo_info, (t, repo_id, rev)),
                    ("preupload", "POST"): ("preupload", self.preupload, (t, repo_id, rev)),
                    ("commit", "POST"): ("commit", self.commit, (t, repo_id, rev)),
                    ("commits", "GET"): ("commits", self.commits, (t, repo_id, rev)),
                    ("tree", "GET"): ("tree", self.tree, (t, repo_id, rev, path)),
                    ("paths-info", "POST"): ("paths_info", self.paths_info, (t, repo_id, rev)),
                    ("branch", "POST"): ("branch", self.create_branch, (t, repo_id, rev)),
                    ("branch", "DELETE"): ("branch", self.delete_branch, (t, repo_id, rev)),
                    ("tag", "POST"): ("tag", self.create_tag, (t, repo_id, rev)),
                    ("tag", "DELETE"): ("tag", self.delete_tag, (t, repo_id, rev)),
                }
                if (action, method) in table:
                    return table[(action, method)]
        t, rest = ("model", s) if not s or s[0] not in ("datasets", "spaces") else (s[0][:-1], s[1:])
        if len(rest) == 6 and rest[1].endswith(".git") and rest[2:] == ["info", "lfs", "objects", "batch"]:
            return "lfs_batch", self.lfs_batch, (t, f"{rest[0]}/{rest[1][:-4]}")
        if len(rest) >= 5 and rest[2] == "resolve" and method in ("GET", "HEAD"):
            return "resolve", self.resolve, (t, f"{rest[0]}/{rest[1]}", rest[3], "/".join(rest[4:]))
        return "other", self.not_found, ()

    # ----- access -----
    def _user(self) -> tuple[str | None, bool]:
        return self.server.hub.user_for(self.headers.get("Authorization"))

    def _repo(self, repo_type: str, repo_id: str, *, write: bool = False) -> dict[str, Any]:
        """The repo if the caller may read (or write) it; private repos look missing to everyone else."""
        hub = self.server.hub
        user, can_write = self._user()
        repo = hub.store.get_repo(repo_type, repo_id)
        may_see = repo is not None and (
            not repo["private"] or (user and repo_id.split("/")[0] in hub.namespaces_of(user))
        )
        if not may_see:
            if user is None:  # what the Hub answers anonymous callers; the client maps it to RepositoryNotFoundError
                raise HubError(401, "Invalid username or password.", "RepoNotFound")
            raise HubError(404, "Repository not found", "RepoNotFound")
        if write:
            self._check_write(user, can_write, repo_id.split("/")[0])
        return repo

    def _check_write(self, user: str | None, can_write: bool, namespace: str) -> None:
        if user is None:
            raise HubError(401, "You must be authenticated to write to the Hub (no token was sent)")
        if not can_write:
            raise HubError(403, f"Your token is read-only: it cannot write to {namespace!r}; use a write token")
        if namespace not in self.server.hub.namespaces_of(user):
            raise HubError(403, f"You don't have the rights to write to the namespace {namespace!r} (user {user!r})")

    def _base(self) -> str:
        return f"http://{self.headers.get('Host') or self.server.hub.url.removeprefix('http://')}"

    def _repo_url(self, repo_type: str, repo_id: str) -> str:
        return f"{self._base()}/{_URL_PREFIX[repo_type]}{repo_id}"

    # ----- endpoints -----
    def not_found(self) -> None:
        raise HubError(404, f"Not found: {self.command} {self.path} (not served by the local hub server)")

    def whoami(self) -> None:
        user, can_write = self._user()
        if user is None:
            raise HubError(401, BAD_TOKEN_MESSAGE)
        orgs = [
            {"type": "org", "name": o, "fullname": o, "roleInOrg": "write"}
            for o in self.server.hub.namespaces_of(user)[1:]
        ]
        role = "write" if can_write else "read"
        self._send_json(
            {
                "type": "user",
                "id": user,
                "name": user,
                "fullname": user,
                "email": f"{user}@localhost",
                "emailVerified": True,
                "isPro": False,
                "canPay": False,
                "orgs": orgs,
                "auth": {
                    "type": "access_token",
                    "accessToken": {"displayName": "local-hub", "role": role, "createdAt": now_iso()},
                },
            }
        )

    def create_repo(self) -> None:
        body = self._json_body()
        user, can_write = self._user()
        repo_type = body.get("type") or "model"
        namespace = body.get("organization") or user
        self._check_write(user, can_write, namespace or "")
        repo_id = f"{namespace}/{body.get('name', '')}"
        url = self._repo_url(repo_type, repo_id)
        store = self.server.hub.store
        with store.lock:
            if store.get_repo(repo_type, repo_id) is not None:
                return self._send_json({"error": f"You already created this {repo_type} repo", "url": url}, 409)
            private = body.get("visibility") == "private" or body.get("private") is True
            store.create_repo(repo_type, repo_id, private=private, author=user or "")
        self._send_json({"url": url, "name": repo_id, "id": repo_id})

    def delete_repo(self) -> None:
        body = self._json_body()
        user, _ = self._user()
        repo_type = body.get("type") or "model"
        repo_id = f"{body.get('organization') or user}/{body.get('name', '')}"
        self._repo(repo_type, repo_id, write=True)
        self.server.hub.store.delete_repo(repo_type, repo_id)
        self._send_json({})

    def settings(self, repo_type: str, repo_id: str) -> None:
        repo = self._repo(repo_type, repo_id, write=True)
        body = self._json_body()
        with self.server.hub.store.lock:
            if "visibility" in body or "private" in body:
                repo["private"] = body.get("visibility") == "private" or body.get("private") is True
            self.server.hub.store.save()
        self._send_json({})

    def validate_yaml(self) -> None:
        self._json_body()  # the client only reads `errors`/`warnings`; real YAML validation is out of scope
        self._send_json({"errors": [], "warnings": []})

    def repo_info(self, repo_type: str, repo_id: str, revision: str) -> None:
        repo = self._repo(repo_type, repo_id)
        commit = self.server.hub.store.resolve(repo, revision)
        blobs = self._query.get("blobs", "").lower() in ("1", "true")
        siblings = []
        for path, entry in sorted(commit["files"].items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs:
                sibling.update(size=entry["size"], blobId=entry["oid"])
                if entry["lfs"]:
                    sibling["lfs"] = {
                        "sha256": entry["sha256"],
                        "size": entry["size"],
                        "pointerSize": len(lfs_pointer(entry["sha256"], entry["size"])),
                    }
            siblings.append(sibling)
        self._send_json(
            {
                "_id": repo_id,
                "id": repo_id,
                "author": repo_id.split("/")[0],
                "sha": commit["id"],
                "private": repo["private"],
                "gated": False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "siblings": siblings,
                "createdAt": repo["created_at"],
                "lastModified": commit["date"],
            }
        )

    def refs(self, repo_type: str, repo_id: str) -> None:
        repo = self._repo(repo_type, repo_id)

        def refs_of(kind: str, prefix: str) -> list[dict[str, str]]:
            return [{"name": n, "ref": f"refs/{prefix}/{n}", "targetCommit": c} for n, c in sorted(repo[kind].items())]

        self._send_json(
            {
                "branches": refs_of("branches", "heads"),
                "tags": refs_of("tags", "tags"),
                "converts": [],
                "pullRequests": [],
            }
        )

    def create_branch(self, repo_type: str, repo_id: str, branch: str) -> None:
        repo = self._repo(repo_type, repo_id, write=True)
        start = self._json_body().get("startingPoint") or "main"
        store = self.server.hub.store
        with store.lock:
            if branch in repo["branches"]:
                raise HubError(409, f"Reference already exists: refs/heads/{branch}")
            repo["branches"][branch] = store.resolve(repo, start)["id"]
            store.save()
        self._send_json({})

    def delete_branch(self, repo_type: str, repo_id: str, branch: str) -> None:
        repo = self._repo(repo_type, repo_id, write=True)
        with self.server.hub.store.lock:
            if branch == "main":
                raise HubError(403, "Cannot delete the main branch")
            if repo["branches"].pop(branch, None) is None:
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            self.server.hub.store.save()
        self._send_json({})

    def create_tag(self, repo_type: str, repo_id: str, revision: str) -> None:
        repo = self._repo(repo_type, repo_id, write=True)
        tag = self._json_body().get("tag") or ""
        store = self.server.hub.store
        with store.lock:
            target = store.resolve(repo, revision)["id"]
            if tag in repo["tags"]:
                raise HubError(409, f"Tag {tag} already exists")
            if not tag or "/" in tag or tag.startswith("."):
                raise HubError(400, f"Invalid tag name {tag!r}")
            repo["tags"][tag] = target
            store.save()
        self._send_json({})

    def delete_tag(self, repo_type: str, repo_id: str, tag: str) -> None:
        repo = self._repo(repo_type, repo_id, write=True)
        with self.server.hub.store.lock:
            if repo["tags"].pop(tag, None) is None:
                raise HubError(404, f"Invalid rev id: {tag}", "RevisionNotFound")
            self.server.hub.store.save()
        self._send_json({})

    def commits(self, repo_type: str, repo_id: str, revision: str) -> None:
        repo = self._repo(repo_type, repo_id)
        store = self.server.hub.store
        chain = store.history(repo, store.resolve(repo, revision))
        self._send_json(
            [
                {
                    "id": c["id"],
                    "title": c["title"],
                    "message": c["message"],
                    "date": c["date"],
                    "authors": [{"user": c["author"], "avatar": None}],
                }
                for c in chain
            ]
        )

    def _path_items(self, repo: dict[str, Any], commit: dict[str, Any], items: list, expand: bool) -> list[dict]:
        store, out = self.server.hub.store, []
        for path, entry in items:
            if entry is None:
                item: dict[str, Any] = {
                    "type": "directory",
                    "oid": store.folder_oid(commit, path),
                    "size": 0,
                    "path": path,
                }
            else:
                item = {"type": "file", "oid": entry["oid"], "size": entry["size"], "path": path}
                if entry["lfs"]:
                    item["lfs"] = {
                        "oid": entry["sha256"],
                        "size": entry["size"],
                        "pointerSize": len(lfs_pointer(entry["sha256"], entry["size"])),
                    }
            if expand:
                last = store.last_commit(repo, commit, path) if entry is not None else commit
                item["lastCommit"] = {"id": last["id"], "title": last["title"], "date": last["date"]}
            out.append(item)
        return out

    def tree(self, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        repo = self._repo(repo_type, repo_id)
        store = self.server.hub.store
        commit = store.resolve(repo, revision)
        items = store.tree(commit, path, recursive=self._query.get("recursive", "").lower() in ("1", "true"))
        if path.strip("/") and not items:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
        self._send_json(self._path_items(repo, commit, items, self._query.get("expand", "").lower() in ("1", "true")))

    def paths_info(self, repo_type: str, repo_id: str, revision: str) -> None:
        repo = self._repo(repo_type, repo_id)
        form = parse_qs(self._body().decode())
        commit = self.server.hub.store.resolve(repo, revision)
        items = []
        for path in form.get("paths", []):
            path = path.strip("/")
            if path in commit["files"]:
                items.append((path, commit["files"][path]))
            elif any(p.startswith(path + "/") for p in commit["files"]):
                items.append((path, None))
        expand = form.get("expand", ["False"])[-1].lower() in ("1", "true")
        self._send_json(self._path_items(repo, commit, items, expand))

    def preupload(self, repo_type: str, repo_id: str, revision: str) -> None:
        repo = self._repo(repo_type, repo_id, write=True)
        body = self._json_body()
        store = self.server.hub.store
        commit = store.resolve(repo, revision)
        files = []
        for f in body.get("files", []):
            sample = base64.b64decode(f.get("sample") or "")
            mode = store.upload_mode(repo, commit, f["path"], int(f["size"]), sample)
            remote = commit["files"].get(f["path"])
            # `oid` lets the client skip unchanged files: sha256 for LFS, git blob sha1 for regular (as the client hashes).
            oid = None if remote is None else (remote["sha256"] if remote["lfs"] else remote["oid"])
            files.append({"path": f["path"], "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        self._send_json({"files": files, "commitOid": commit["id"]})

    def lfs_batch(self, repo_type: str, repo_id: str) -> None:
        repo = self._repo(repo_type, repo_id, write=True)
        body = self._json_body()
        if body.get("operation") != "upload":
            raise HubError(400, "Only the LFS 'upload' operation is served here (downloads go through /resolve)")
        hub, objects = self.server.hub, []
        for obj in body.get("objects", []):
            oid, size = obj["oid"], int(obj["size"])
            answer: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if not hub.store.has_lfs(repo, oid, size):  # no "actions" = already stored, the client skips the PUT
                credential = secrets.token_urlsafe(24)
                with hub._lock:
                    hub._lfs_credentials[credential] = (f"{repo_type}:{repo_id}", oid, size)
                answer["actions"] = {"upload": {"href": f"{self._base()}/lfs-upload/{credential}", "expires_in": 3600}}
            objects.append(answer)
        self._send(
            200,
            json.dumps({"transfer": "basic", "objects": objects, "hash_algo": "sha256"}).encode(),
            content_type="application/vnd.git-lfs+json",
        )

    def lfs_put(self, credential: str) -> None:
        """The href's own credential authorizes the PUT (the client sends no Authorization header here)."""
        hub = self.server.hub
        with hub._lock:
            target = hub._lfs_credentials.get(credential)
        if target is None:
            raise HubError(403, "Unknown or used LFS upload credential; ask the LFS batch endpoint for a new href")
        repo_key, oid, size = target

        def counted():
            for chunk in self._body_chunks():
                hub._count_bytes(len(chunk))
                yield chunk

        hub.store.blobs.put_chunks(counted(), oid, size)  # checks sha256 and size before keeping anything
        repo = hub.store.repos.get(repo_key)
        if repo is None:
            raise HubError(404, "Repository not found (deleted during the upload)", "RepoNotFound")
        hub.store.add_lfs(repo, oid, size)
        hub._count(hub.lfs_stored, oid)
        with hub._lock:
            hub._lfs_credentials.pop(credential, None)  # one-time: used up once the object is stored
        self._send(200, b"", content_type="text/plain")

    def commit(self, repo_type: str, repo_id: str, revision: str) -> None:
        repo = self._repo(repo_type, repo_id, write=True)
        if self._query.get("create_pr"):
            raise HubError(400, "Pull requests are not supported by the local hub server")
        try:
            operations = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        except ValueError as e:
            raise HubError(400, f"Commit body is not valid NDJSON: {e}") from e
        header = next((op.get("value") or {} for op in operations if op.get("key") == "header"), {})
        user, _ = self._user()
        commit_id = self.server.hub.store.commit(
            repo, revision, operations, author=user or "", parent_commit=header.get("parentCommit")
        )
        self._send_json(
            {
                "commitUrl": f"{self._repo_url(repo_type, repo_id)}/commit/{commit_id}",
                "commitOid": commit_id,
                "pullRequestUrl": None,
                "success": True,
            }
        )

    def resolve(self, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        repo = self._repo(repo_type, repo_id)
        store = self.server.hub.store
        commit = store.resolve(repo, revision)
        entry = commit["files"].get(path)
        if entry is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
        size = entry["size"]
        etag = entry["sha256"] if entry["lfs"] else entry["oid"]
        headers = {"X-Repo-Commit": commit["id"], "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
        if entry["lfs"]:
            headers.update({"X-Linked-Etag": f'"{entry["sha256"]}"', "X-Linked-Size": str(size)})
        start, end, status = 0, size - 1, 200
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "").strip())
        if match and (match[1] or match[2]):
            if match[1]:
                start, end = int(match[1]), min(int(match[2]) if match[2] else size - 1, size - 1)
            else:
                start = max(0, size - int(match[2]))
            if start >= size or start > end:
                return self._send(416, b"", {"Content-Range": f"bytes */{size}", **headers})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        length = max(0, end - start + 1)
        headers["Content-Length"] = str(length)
        self._send(status, b"", headers, content_type="application/octet-stream")
        if self.command == "GET" and length:
            with open(store.blobs.path(entry["sha256"]), "rb") as f:
                f.seek(start)
                while length > 0:
                    data = f.read(min(_CHUNK, length))
                    self.wfile.write(data)
                    length -= len(data)
