"""Where a checkpoint's files come from when they are not all on this machine's disk (multi-node, node-local disks).

veRL's ranks each save their own ``actor/{model,optim,extra_state}_world_size_W_rank_r.pt`` on the node they run
on; with node-local disks, the node that consolidates sees only its own ranks' files. A :class:`RankSource` answers
"where do rank r's bytes come from": it reports the size of the files it holds and streams them in chunks. Before the
engine runs, :func:`gather_files` copies every wanted file that is not already here (same name, same size) into the
step directory, chunk by chunk (memory: a few chunks, whatever the file size), each file under a temporary name and
renamed when complete. The engine then reads local files exactly as on shared storage, where nothing is copied.

:class:`LocalDirSource` is the plain-files implementation (another directory: a mounted disk of another machine);
``training/`` supplies a Ray-backed one (a reader actor on each node). Nothing here imports Ray.

Example:
    >>> wanted = [WantedFile("actor/model_world_size_2_rank_1.pt", LocalDirSource("/mnt/node_b/global_step_2"),
    ...                      owner="rank 1")]  # doctest: +SKIP
    >>> report = gather_files("/ckpt/global_step_2", wanted)  # doctest: +SKIP
    >>> report.bytes_moved, report.fetched  # doctest: +SKIP
    (1048576, ['actor/model_world_size_2_rank_1.pt'])
    >>> report.remove_fetched()  # doctest: +SKIP
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from utils.checkpoint.errors import RankFileUnavailableError, RankSourceError

__all__ = ["RankSource", "LocalDirSource", "WantedFile", "GatherReport", "gather_files", "rank_file_names",
           "CHUNK_BYTES"]

CHUNK_BYTES = 16 * 1024 * 1024  # per streamed chunk: amortizes a round trip; a few fit in memory at once


@runtime_checkable
class RankSource(Protocol):
    """One place that holds some of a checkpoint's files, addressed by paths relative to the step directory."""

    def describe(self) -> str:
        """Where this is, for error messages (e.g. ``node 3f2a9c1b (10.0.0.2)``)."""
        ...

    def sizes(self, relpaths: Sequence[str]) -> dict[str, int | None]:
        """The size in bytes of each path, ``None`` where the file is not there.

        Raises:
            RankSourceError: the source cannot be reached (a dead node).
        """
        ...

    def chunks(self, relpath: str, size: int) -> Iterator[bytes]:
        """The bytes of ``relpath`` (``size`` bytes long), in order, in chunks of at most :data:`CHUNK_BYTES`.

        Raises:
            RankSourceError: the source died or the file changed while streaming.
        """
        ...


class LocalDirSource:
    """A :class:`RankSource` over a directory on this machine (a step directory of another node, mounted here).

    Args:
        root: The directory that plays the step directory (``global_step_N``) of the other node.
        label: How errors name it (default: the directory).
    """

    def __init__(self, root: str | Path, label: str | None = None):
        self.root = Path(root)
        self.label = label or f"directory {self.root}"

    def describe(self) -> str:
        return self.label

    def sizes(self, relpaths: Sequence[str]) -> dict[str, int | None]:
        out: dict[str, int | None] = {}
        for rel in relpaths:
            try:
                out[rel] = (self.root / rel).stat().st_size
            except FileNotFoundError:
                out[rel] = None
            except OSError as e:
                raise RankSourceError(f"{self.label}: cannot stat {rel} ({e})") from e
        return out

    def chunks(self, relpath: str, size: int) -> Iterator[bytes]:
        try:
            with open(self.root / relpath, "rb") as f:
                while chunk := f.read(CHUNK_BYTES):
                    yield chunk
        except OSError as e:
            raise RankSourceError(f"{self.label}: cannot read {relpath} ({e})") from e


@dataclass(frozen=True)
class WantedFile:
    """A file the consolidation needs, and where it lives.

    Attributes:
        relpath: Relative to the step directory (``actor/model_world_size_2_rank_1.pt``, ``data.pt``).
        source: The holder of the file.
        owner: Who wrote it, for messages (``rank 1``, ``the trainer``).
        required: Missing everywhere is an error (``False``: optional files such as ``curriculum_state.json``).
    """

    relpath: str
    source: RankSource
    owner: str
    required: bool = True


@dataclass
class GatherReport:
    """What :func:`gather_files` did: ``fetched`` (copied here), ``local`` (already here), byte and time totals."""

    step_dir: Path
    fetched: list[str] = field(default_factory=list)
    local: list[str] = field(default_factory=list)
    bytes_moved: int = 0
    seconds: float = 0.0

    def remove_fetched(self) -> None:
        """Delete the copies made here (each node keeps only its own ranks' files afterwards)."""
        for rel in self.fetched:
            (self.step_dir / rel).unlink(missing_ok=True)

    def summary(self) -> str:
        """One line for logs."""
        return (f"gathered {len(self.fetched)} file(s), {self.bytes_moved / 1e6:.1f} MB, in {self.seconds:.2f}s; "
                f"{len(self.local)} already local")


def rank_file_names(world_size: int, rank: int, kinds: Sequence[str] = ("model", "optim", "extra_state")) -> list[str]:
    """veRL's per-rank file names under ``actor/``.

    Example:
        >>> rank_file_names(2, 1, ["model"])
        ['actor/model_world_size_2_rank_1.pt']
    """
    return [f"actor/{kind}_world_size_{world_size}_rank_{rank}.pt" for kind in kinds]


def _receive(step_dir: Path, want: WantedFile, size: int) -> int:
    """Stream one file into ``step_dir`` under a temporary name, then rename; returns the bytes received."""
    dest = step_dir / want.relpath
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent)
    received = 0
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in want.source.chunks(want.relpath, size):
                f.write(chunk)
                received += len(chunk)
        if received != size:
            raise RankSourceError(f"{want.relpath}: received {received} of {size} bytes (the file changed while it "
                                  "was read?)")
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return received


def gather_files(step_dir: str | Path, wanted: Sequence[WantedFile]) -> GatherReport:
    """Copy every wanted file that is not already in ``step_dir`` (same size) from its source.

    Args:
        step_dir: The ``global_step_N`` directory on this machine.
        wanted: The files the consolidation needs, with their holders.

    Returns:
        A :class:`GatherReport`; call :meth:`GatherReport.remove_fetched` once the copies are no longer needed.

    Raises:
        RankFileUnavailableError: a required file is neither here nor at its source, or the source cannot be read
            (dead node); the message names the owner (rank) and the source (node). Nothing half-written is left.
    """
    started = time.perf_counter()
    step_dir = Path(step_dir)
    report = GatherReport(step_dir)
    by_source: dict[int, list[WantedFile]] = {}
    for want in wanted:
        by_source.setdefault(id(want.source), []).append(want)
    try:
        for group in by_source.values():
            source = group[0].source
            try:
                remote = source.sizes([w.relpath for w in group])
            except RankSourceError as e:
                owners = ", ".join(sorted({w.owner for w in group}))
                raise RankFileUnavailableError(f"cannot reach {source.describe()}, which holds the files of "
                                               f"{owners} ({e})") from e
            for want in group:
                local = step_dir / want.relpath
                size = remote.get(want.relpath)
                local_size = local.stat().st_size if local.is_file() else None
                if size is None:
                    if local_size is not None:  # written here already (shared storage, or an earlier gather)
                        report.local.append(want.relpath)
                    elif want.required:
                        raise RankFileUnavailableError(
                            f"{want.relpath} of {want.owner} is missing on {source.describe()} and in {step_dir}: "
                            "the checkpoint is incomplete there; consolidate another step.")
                    continue
                if local_size == size:  # shared storage (or a copy gathered before): read it directly
                    report.local.append(want.relpath)
                    continue
                try:
                    report.bytes_moved += _receive(step_dir, want, size)
                except RankSourceError as e:
                    raise RankFileUnavailableError(f"{want.relpath} of {want.owner} could not be read from "
                                                   f"{source.describe()}: {e}") from e
                report.fetched.append(want.relpath)
    except BaseException:
        report.remove_fetched()
        raise
    report.seconds = time.perf_counter() - started
    return report
