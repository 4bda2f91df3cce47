"""Time limits on every HTTP request ``huggingface_hub`` sends: a Hub that accepts connections and never answers
cannot hang an upload, a verify or a resume.

``huggingface_hub`` 1.x sends everything through one shared ``httpx.Client`` built without a timeout, and many of
its API calls pass ``timeout=None`` explicitly (which means "wait forever" to httpx). A request event hook on that
client fills in (or lowers) the limits of every request just before it is sent: connect and pool waits, and the
read and write of each socket operation, so a stalled LFS transfer fails as well as a stalled answer. The limits
are per operation, not per transfer: a slow but moving upload of a large shard is never cut off.

The HTTP client is shared by the whole process, so the limits are too: :func:`install_timeouts` (called by every
:class:`utils.hub.client.HubClient`) sets them for all later requests.

Example:
    >>> install_timeouts(connect=10, read=120)  # doctest: +SKIP
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

__all__ = ["DEFAULT_CONNECT_TIMEOUT", "DEFAULT_READ_TIMEOUT", "install_timeouts", "current_timeouts",
           "unreachable_reason"]

DEFAULT_CONNECT_TIMEOUT = 10.0
# A commit of many LFS files may take the Hub a while to answer; a minute of silence on one socket read is not
# normal traffic. Override with HF_HUB_UPLOAD_TIMEOUT (seconds) or request_timeout=... on the uploader.
DEFAULT_READ_TIMEOUT = float(os.environ.get("HF_HUB_UPLOAD_TIMEOUT", "120") or 120)


@dataclass
class _Limits:
    connect: float = DEFAULT_CONNECT_TIMEOUT
    read: float = DEFAULT_READ_TIMEOUT
    installed: bool = False


_LIMITS = _Limits()  # process-wide, like the HTTP client it configures
_INSTALL_LOCK = threading.Lock()


def current_timeouts() -> tuple[float, float]:
    """``(connect, read)`` seconds now applied to every request."""
    return _LIMITS.connect, _LIMITS.read


def _apply_limits(request) -> None:
    """httpx request hook: no request leaves without connect/read/write/pool limits (never raises them)."""
    limits = dict(request.extensions.get("timeout") or {})
    for key, cap in (("connect", _LIMITS.connect), ("pool", _LIMITS.connect), ("read", _LIMITS.read),
                     ("write", _LIMITS.read)):
        if limits.get(key) is None or limits[key] > cap:
            limits[key] = cap
    request.extensions["timeout"] = limits


def install_timeouts(*, connect: float = DEFAULT_CONNECT_TIMEOUT, read: float = DEFAULT_READ_TIMEOUT) -> None:
    """Apply ``connect``/``read`` second limits to every request ``huggingface_hub`` sends from now on.

    Idempotent: the client factory is wrapped once per process; later calls only change the limits (so a running
    upload in another thread keeps its connection).
    """
    _LIMITS.connect, _LIMITS.read = float(connect), float(read)
    if _LIMITS.installed:
        return
    with _INSTALL_LOCK:
        if _LIMITS.installed:
            return
        from huggingface_hub import set_client_factory
        from huggingface_hub.utils import _http

        previous = getattr(_http, "_GLOBAL_CLIENT_FACTORY", None) or _http.default_client_factory

        def factory():
            client = previous()
            client.event_hooks["request"] = [*client.event_hooks["request"], _apply_limits]
            return client

        set_client_factory(factory)
        _LIMITS.installed = True


def unreachable_reason(endpoint: str, exc: BaseException) -> str:
    """``"The Hub at URL did not answer within 120 s (ReadTimeout)"`` or ``"Cannot reach the Hub at URL (...)"``."""
    import httpx

    if isinstance(exc, httpx.TimeoutException):
        which = "connect" if isinstance(exc, httpx.ConnectTimeout) else "read"
        limit = _LIMITS.connect if which == "connect" else _LIMITS.read
        return (f"The Hub at {endpoint} did not answer within {limit:g} s ({type(exc).__name__}; the limit is "
                "HF_HUB_UPLOAD_TIMEOUT / request_timeout)")
    return f"Cannot reach the Hub at {endpoint} ({type(exc).__name__})"
