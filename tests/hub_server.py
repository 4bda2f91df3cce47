"""A local Hugging Face Hub-compatible HTTP server, for tests and the offline demo.

huggingface.co cannot be reached here, so tests drive the real `huggingface_hub` client against this server. It speaks
the part of the Hub's HTTP contract the client uses to create repos, upload (preupload, LFS batch + PUT, NDJSON
commit), tag, branch, list and download, with users, orgs and private
repos, and it has fault knobs: fail the next N requests of a kind, stall, go down and come back on the same port.

Run it in a thread (tests)::

    with HubServer(tmp_path, users={"hf_alice": "alice"}, orgs={"acme": ["alice"]}) as hub:
        api = HfApi(endpoint=hub.url, token="hf_alice")
        hub.fail_next("lfs_put", times=1, error="reset_mid_body")
        api.upload_folder(repo_id="alice/m", folder_path=folder)
        assert hub.completed["lfs_put"] == 1

or as a process (the demo)::

    python -m tests.hub_server --port 0 --root /tmp/hub --token alice=hf_alice_token   # first stdout line: URL

The client needs, BEFORE `huggingface_hub` is first imported: `HF_HUB_DISABLE_XET=1` (else LFS files go to Xet,
which no local server can serve), `HF_HUB_DISABLE_TELEMETRY=1`, `HF_HOME=<temp dir>` and `HF_ENDPOINT=<hub.url>`
(`constants.ENDPOINT` is frozen at import; `HfApi(endpoint=...)`/`hf_hub_download(endpoint=...)` work regardless,
but model-card validation and `from_pretrained` use the constant). `tests/conftest.py` does all of that and provides
the `hub_server`/`hub` fixtures.

Request kinds, for `fail_next`, `stall_next`, `hold_next` and the counters: whoami, create_repo, delete_repo,
repo_info, settings, preupload, lfs_batch, lfs_put, commit, commits, tree, paths_info, refs, branch, tag, resolve, validate_yaml, other;
`"any"` matches every kind in the fault knobs.

Hand-written on the stdlib (http.server) on purpose: no maintained open-source Hub server runs here (see the
contract note) and a test helper should not pull a web framework into the test dependencies.
"""

from __future__ import annotations

import argparse
import signal
import threading
from collections import Counter
from pathlib import Path
from typing import Any

from tests.hub_server_http import BAD_TOKEN_MESSAGE, HubHTTPServer, HubRequestHandler
from tests.hub_server_storage import HubError, HubStore

KINDS = (
    "whoami",
    "create_repo",
    "delete_repo",
    "repo_info",
    "settings",
    "preupload",
    "lfs_batch",
    "lfs_put",
    "commit",
    "commits",
    "tree",
    "paths_info",
    "refs",
    "branch",
    "tag",
    "resolve",
    "validate_yaml",
    "other",
)
FAULTS = (500, 502, 503, 429, "reset", "reset_mid_body", "drop_answer")


class HubServer:
    """A Hub-compatible server on `127.0.0.1`, in a background thread.

    Args:
        root_dir: where blobs and `state.json` live (a server restarted on it keeps its repos).
        users: token -> user name. A user writes its own namespace and the orgs it belongs to.
        orgs: org name -> member user names.
        read_only_tokens: tokens (also in `users`) whose role is "read": they read private repos they may see,
            but every write answers 403.
        port: 0 picks a free port; `come_up()` after `go_down()` reuses the same one.

    Attributes:
        requests: Counter of requests received per kind (failed or not).
        completed: Counter of requests answered with a status < 400, per kind.
        lfs_stored: Counter sha256 -> how many times an LFS PUT stored that object (1 means "uploaded once").
        lfs_bytes_received: body bytes read by all LFS PUTs, complete or not.

    Example:
        >>> with HubServer(tmp, users={"tok": "alice"}) as hub:
        ...     HfApi(endpoint=hub.url, token="tok").create_repo("alice/m")
    """

    def __init__(
        self,
        root_dir: str | Path,
        users: dict[str, str] | None = None,
        orgs: dict[str, list[str]] | None = None,
        *,
        read_only_tokens: tuple[str, ...] | list[str] = (),
        host: str = "127.0.0.1",
        port: int = 0,
        verbose: bool = False,
    ):
        self.store = HubStore(root_dir)
        self.users = dict(users or {})
        self.orgs = {org: list(members) for org, members in (orgs or {}).items()}
        self.read_only_tokens = set(read_only_tokens)
        self.host, self.port, self.verbose = host, port, verbose
        self.requests: Counter[str] = Counter()
        self.completed: Counter[str] = Counter()
        self.lfs_stored: Counter[str] = Counter()
        self.lfs_bytes_received = 0
        self._faults: list[dict[str, Any]] = []  # {"kind", "times", "error", "retry_after"|"seconds"}
        self._lfs_credentials: dict[str, tuple[str, str, int]] = {}  # one-time token in a PUT href -> (repo, sha, size)
        self._lock = threading.Lock()
        self._down = threading.Event()
        self._hanging = threading.Event()
        self._httpd: HubHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ----- lifecycle -----
    @property
    def url(self) -> str:
        """Base URL, e.g. `http://127.0.0.1:40123` (pass it as `endpoint=` or `HF_ENDPOINT`)."""
        return f"http://{self.host}:{self.port}"

    def start(self) -> HubServer:
        """Bind (port 0 -> a free port) and serve in a daemon thread. Returns self."""
        self._down.clear()
        self._httpd = HubHTTPServer((self.host, self.port), HubRequestHandler)
        self._httpd.hub = self
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"hub-server-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, drop open connections and free the port."""
        self._down.set()  # wakes stalled handlers
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd.drop_connections()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def go_down(self, mode: str = "refuse") -> None:
        """Go down until `come_up()`; repos are kept.

        Args:
            mode: "refuse": the listening socket is closed and open connections dropped, so clients get
                "connection refused" at once. "hang": connections are accepted but no request is answered (each
                waits until `come_up()` and is then reset), like a wedged server behind a load balancer.
        """
        if mode == "refuse":
            self._hanging.clear()
            self.stop()
        elif mode == "hang":
            self._hanging.set()
        else:
            raise ValueError(f"unknown mode {mode!r}; use 'refuse' or 'hang'")

    def come_up(self) -> None:
        """Serve again (on the same port) after `go_down()`."""
        self._hanging.clear()
        if self._httpd is None:
            self.start()

    @property
    def is_up(self) -> bool:
        return self._httpd is not None and not self._hanging.is_set()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ----- users -----
    def token_for(self, user: str) -> str:
        """A token of `user`, a write token when it has one (a KeyError names the known users)."""
        tokens = sorted((token in self.read_only_tokens, token) for token, name in self.users.items() if name == user)
        if not tokens:
            raise KeyError(f"no token for user {user!r}; known users: {sorted(set(self.users.values()))}")
        return tokens[0][1]

    # ----- fault knobs (thread-safe, callable while requests are in flight) -----
    def fail_next(self, kind: str, times: int = 1, error: int | str = 500, *, retry_after: float = 0) -> None:
        """Answer the next `times` requests of `kind` ("any" = every kind) with a fault instead of serving them.

        Args:
            kind: a request kind (see the module docstring) or "any".
            times: how many requests to fail.
            error: 500/502/503 (server error), 429 (rate limited, with `Retry-After: retry_after`), "reset" (close
                the connection without reading the body or answering), "reset_mid_body" (read half of the request
                body, then reset; for `lfs_put`/`commit`), "drop_answer" (serve the request, e.g. apply the commit,
                then reset instead of answering: the client cannot tell whether it happened).
        """
        if kind != "any" and kind not in KINDS:
            raise ValueError(f"unknown request kind {kind!r}; use one of {KINDS + ('any',)}")
        if error not in FAULTS:
            raise ValueError(f"unknown fault {error!r}; use one of {FAULTS}")
        with self._lock:
            self._faults.append({"kind": kind, "times": times, "error": error, "retry_after": retry_after})

    def stall_next(self, kind: str, seconds: float, times: int = 1) -> None:
        """Sleep `seconds` before serving each of the next `times` requests of `kind` (then serve them normally)."""
        if kind != "any" and kind not in KINDS:
            raise ValueError(f"unknown request kind {kind!r}; use one of {KINDS + ('any',)}")
        with self._lock:
            self._faults.append({"kind": kind, "times": times, "error": "stall", "seconds": seconds})

    def hold_next(self, kind: str, times: int = 1) -> threading.Event:
        """Hold each of the next `times` requests of `kind` before serving it until the returned event is set.

        For forced interleavings: `hub.requests[kind]` counts a held request as soon as it arrives, so a test can
        wait for it, run something else to completion, then `event.set()` to let the held request through.
        """
        if kind != "any" and kind not in KINDS:
            raise ValueError(f"unknown request kind {kind!r}; use one of {KINDS + ('any',)}")
        gate = threading.Event()
        with self._lock:
            self._faults.append({"kind": kind, "times": times, "error": "hold", "gate": gate})
        return gate

    def clear_faults(self) -> None:
        with self._lock:
            for fault in self._faults:  # a held request is let through, never left hanging
                if "gate" in fault:
                    fault["gate"].set()
            self._faults.clear()

    def reset_counters(self) -> None:
        with self._lock:
            self.requests.clear()
            self.completed.clear()
            self.lfs_stored.clear()
            self.lfs_bytes_received = 0

    def _take_fault(self, kind: str) -> dict[str, Any] | None:
        with self._lock:
            self.requests[kind] += 1
            for fault in self._faults:
                if fault["kind"] in (kind, "any") and fault["times"] > 0:
                    fault["times"] -= 1
                    if fault["times"] == 0:
                        self._faults.remove(fault)
                    return fault
        return None

    def _count_bytes(self, n: int) -> None:
        with self._lock:
            self.lfs_bytes_received += n

    def _count(self, counter: Counter[str], key: str, n: int = 1) -> None:
        with self._lock:
            counter[key] += n

    # ----- auth -----
    def user_for(self, authorization: str | None) -> tuple[str | None, bool]:
        """(user, can_write) for an Authorization header; anonymous -> (None, False); unknown token -> 401."""
        if not authorization:
            return None, False
        token = authorization.removeprefix("Bearer ").strip()
        if token not in self.users:
            raise HubError(401, BAD_TOKEN_MESSAGE)
        return self.users[token], token not in self.read_only_tokens

    def namespaces_of(self, user: str) -> list[str]:
        return [user] + [org for org, members in self.orgs.items() if user in members]


def main(argv: list[str] | None = None) -> None:
    """`python -m tests.hub_server --port 0 --root DIR --token alice=hf_xxx [--org acme=alice,bob]`."""
    parser = argparse.ArgumentParser(description="Local Hugging Face Hub-compatible server (test support).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed on the first line)")
    parser.add_argument("--root", required=True, help="directory for blobs and state.json (created if missing)")
    parser.add_argument("--token", action="append", default=[], metavar="USER=TOKEN", help="a user and its token")
    parser.add_argument("--read-only-token", action="append", default=[], metavar="USER=TOKEN")
    parser.add_argument("--org", action="append", default=[], metavar="ORG=USER1,USER2")
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    args = parser.parse_args(argv)

    def pairs(values: list[str], flag: str) -> list[tuple[str, str]]:
        out = []
        for value in values:
            key, sep, rest = value.partition("=")
            if not sep or not key or not rest:
                parser.error(f"{flag} expects NAME=VALUE, got {value!r}")
            out.append((key, rest))
        return out

    users = {token: user for user, token in pairs(args.token + args.read_only_token, "--token")}
    read_only = [token for _, token in pairs(args.read_only_token, "--read-only-token")]
    orgs = {org: members.split(",") for org, members in pairs(args.org, "--org")}
    server = HubServer(
        args.root, users, orgs, read_only_tokens=read_only, host=args.host, port=args.port, verbose=args.verbose
    ).start()
    print(server.url, flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    try:
        while not done.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
