"""Temporary folders that are provably ours: removed on every exit path the process controls, swept when stale.

Consolidation builds its output in a hidden folder beside the target, uploads stage in ``TMPDIR``, ``pull`` builds
``global_step_N`` beside the run's other steps. ``try/finally`` removes them on exceptions and Ctrl-C; SIGTERM is
turned into the same unwinding by :func:`terminate_as_interrupt` (the CLIs install it). What no process can clean up
after itself - kill -9, a lost node, a Ray actor killed at the end of a run - is swept by the next run:

- every temporary folder ``X`` gets an owner record ``X.owner.json`` *beside* it (never inside: the folder is renamed
  into the result), written *before* the folder exists: host name, pid and that pid's start time;
- :func:`sweep_stale` removes a folder (and its record) only when the record says it was made on this host by a
  process that no longer runs (the pid is gone, or now belongs to a process started at another time). Folders
  without a record, or from another host, are never touched.

Example:
    >>> tmp = make_owned_temp_dir(out.parent, f".{out.name}.tmp-")  # doctest: +SKIP
    >>> try: ...; os.rename(tmp, out)  # doctest: +SKIP
    ... finally: remove_owned(tmp)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["OWNER_SUFFIX", "make_owned_temp_dir", "remove_owned", "release_owner", "sweep_stale",
           "terminate_as_interrupt", "Terminated", "write_text_atomic"]

logger = logging.getLogger(__name__)

OWNER_SUFFIX = ".owner.json"
_TOOL = "verl-grpo-hub"


class Terminated(KeyboardInterrupt):
    """SIGTERM (or SIGHUP) arrived: unwinds like Ctrl-C so every ``finally`` cleans up. ``signum`` is kept."""

    def __init__(self, signum: int):
        super().__init__(f"terminated by signal {signum}")
        self.signum = signum


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to a temporary file beside ``path``, fsync it, and rename it over ``path``.

    A reader (or a crash) never sees half a file: the old content or the new one. Returns ``path``.
    """
    import tempfile

    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (Linux ``/proc``), which tells a reused pid from the original."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22 (starttime), counted after the "(comm)" field


def _alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    now = _start_time(pid)
    return started is None or now is None or now == started


def make_owned_temp_dir(parent: str | Path, prefix: str) -> Path:
    """Create ``parent/<prefix><random>`` with its owner record beside it (record first, then the folder).

    Raises:
        OSError: ``parent`` cannot be written.
    """
    parent = Path(parent)
    for _ in range(100):
        path = parent / f"{prefix}{secrets.token_hex(4)}"
        owner = Path(f"{path}{OWNER_SUFFIX}")
        try:
            fd = os.open(owner, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            continue
        with os.fdopen(fd, "w") as f:
            json.dump({"tool": _TOOL, "host": socket.gethostname(), "pid": os.getpid(),
                       "started": _start_time(os.getpid())}, f)
        try:
            path.mkdir(mode=0o700)
        except BaseException:
            owner.unlink(missing_ok=True)
            raise
        return path
    raise FileExistsError(f"cannot create a unique temporary folder {prefix}* in {parent}")


def release_owner(path: str | Path) -> None:
    """Drop the owner record of ``path`` (after the folder was renamed into place or removed)."""
    Path(f"{path}{OWNER_SUFFIX}").unlink(missing_ok=True)


def remove_owned(path: str | Path) -> None:
    """Remove a temporary folder of ours and its owner record; errors are logged, never raised (cleanup path)."""
    path = Path(path)
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        logger.warning("could not remove the temporary folder %s (%s); the next run removes it", path, e)
        return  # keep the record so the sweep can still prove it is ours
    release_owner(path)


def sweep_stale(parent: str | Path, prefix: str) -> list[Path]:
    """Remove ``parent/<prefix>*`` folders whose owner record names a dead process on this host.

    Returns:
        The folders removed (each also logged).
    """
    parent = Path(parent)
    removed: list[Path] = []
    if not parent.is_dir():
        return removed
    host = socket.gethostname()
    for owner in parent.glob(f"{prefix}*{OWNER_SUFFIX}"):
        try:
            rec = json.loads(owner.read_text())
        except (OSError, ValueError):
            continue  # being written right now, or not ours
        if rec.get("tool") != _TOOL or rec.get("host") != host or _alive(int(rec.get("pid", 0)), rec.get("started")):
            continue
        folder = Path(str(owner)[: -len(OWNER_SUFFIX)])
        if folder.exists():
            logger.warning("removing %s, left behind by process %s (no longer running)", folder, rec.get("pid"))
            try:
                shutil.rmtree(folder)
            except OSError as e:
                logger.warning("could not remove %s (%s)", folder, e)
                continue
            removed.append(folder)
        owner.unlink(missing_ok=True)
    return removed


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise :class:`Terminated` (a ``KeyboardInterrupt``) in the main thread,
    so the same cleanup as Ctrl-C runs. Outside the main thread it does nothing (signals go to the main thread).
    """
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
