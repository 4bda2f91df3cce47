"""Checkpoint files of other nodes, through Ray: one small reader actor per node, streaming files in chunks.

With node-local disks each node holds only its own ranks' ``actor/*_rank_r.pt`` (and the trainer's node its
``data.pt``, ``lineage.json``, ...). The upload runs on actor rank 0's node; before it consolidates, the files it needs
from other nodes are copied there through :class:`ShardReader` actors (``utils.checkpoint.sources.gather_files`` over
:class:`RayRankSource`): a few chunks in flight per file, never a whole file in the object store. On shared storage
every file is already there with the same size and nothing moves.

Which node holds which rank comes from veRL's actor worker group (each worker reports its ``RANK`` and Ray node id:
:func:`locate_ranks`), or, after the run, from asking a reader on every alive node (:func:`probe_holders`).

Example:
    >>> layout = locate_ranks(trainer.actor_rollout_wg)  # doctest: +SKIP
    >>> readers = start_readers(layout.nodes(), root="/ckpt")  # doctest: +SKIP
    >>> wanted = wanted_files(step_dir, layout, readers, here=layout.rank_nodes[0], kinds=["model"])  # doctest: +SKIP
"""

from __future__ import annotations

import os
import shutil
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from utils.checkpoint.errors import RankSourceError
from utils.checkpoint.sources import (
    CHUNK_BYTES,
    LocalDirSource,
    RankSource,
    WantedFile,
    gather_files,
    rank_file_names,
)

__all__ = ["ShardReader", "RayRankSource", "ClusterLayout", "answering_readers", "locate_ranks", "start_readers",
           "wanted_files", "probe_holders", "place_rank_files", "TRAINER_FILES", "IN_FLIGHT", "CALL_TIMEOUT_S"]

# Files the trainer process (veRL's TaskRunner) writes into global_step_N, on its own node; optional ones may be absent.
TRAINER_FILES = {"data.pt": False, "lineage.json": False, "curriculum_state.json": False}
IN_FLIGHT = 3  # chunk requests ahead per file: keeps the pipe full; memory ~ IN_FLIGHT x CHUNK_BYTES
CALL_TIMEOUT_S = 120.0  # one chunk or one stat; longer means the node is gone (Ray reports a dead node sooner)


@ray.remote(num_cpus=0, max_restarts=0)
class ShardReader:
    """Runs on one node; reads (and, for rotation, deletes) files under the run directory on that node's disk."""

    def __init__(self, root: str):
        self.root = os.path.realpath(root)

    def _path(self, path: str) -> str:
        real = os.path.realpath(path)
        if os.path.commonpath([real, self.root]) != self.root:  # the reader serves the run directory only
            raise PermissionError(f"{path} is outside the run directory {self.root}")
        return real

    def where(self) -> tuple[str, str]:
        """``(node id, node IP)`` of this reader."""
        return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()

    def sizes(self, paths: list[str]) -> dict[str, int | None]:
        out: dict[str, int | None] = {}
        for p in paths:
            try:
                out[p] = os.stat(self._path(p)).st_size
            except FileNotFoundError:
                out[p] = None
        return out

    def read(self, path: str, offset: int, length: int) -> bytes:
        with open(self._path(path), "rb") as f:
            f.seek(offset)
            return f.read(length)

    def pull(self, step_dir: str, relpaths: list[str], owners: list[str], source: Any, label: str) -> dict:
        """Copy ``relpaths`` of ``step_dir`` from another node's reader ``source`` onto this node's disk.

        Files already here with the holder's size are kept (shared storage: nothing moves); returns the
        :class:`~utils.checkpoint.sources.GatherReport` fields (``fetched``: what this call copied).
        """
        self._path(step_dir)
        src = RayRankSource(source, step_dir, label)
        report = gather_files(step_dir, [WantedFile(rel, src, owner, required=rel.startswith("actor/model_"))
                                         for rel, owner in zip(relpaths, owners, strict=True)])
        return {"fetched": report.fetched, "local": report.local, "bytes_moved": report.bytes_moved,
                "seconds": report.seconds}

    def remove_files(self, step_dir: str, relpaths: list[str]) -> None:
        """Delete ``relpaths`` of ``step_dir`` on this node."""
        for rel in relpaths:
            Path(self._path(os.path.join(step_dir, rel))).unlink(missing_ok=True)

    def remove_tree(self, path: str) -> bool:
        """Delete ``path`` (checkpoint rotation on this node); ``True`` if it existed."""
        real = self._path(path)
        existed = os.path.exists(real)
        shutil.rmtree(real, ignore_errors=True)
        return existed


def _short(node_id: str) -> str:
    return node_id[:8]


class RayRankSource:
    """A :class:`utils.checkpoint.sources.RankSource` over the step directory of another node, via its reader."""

    def __init__(self, reader: Any, step_dir: str | Path, label: str, *, timeout: float = CALL_TIMEOUT_S):
        self.reader = reader
        self.step_dir = str(step_dir)
        self.label = label
        self.timeout = timeout

    def describe(self) -> str:
        return self.label

    def _get(self, ref: Any) -> Any:
        try:
            return ray.get(ref, timeout=self.timeout)
        except ray.exceptions.RayTaskError as e:  # the reader ran and failed (e.g. the file vanished)
            raise RankSourceError(f"{self.label}: {str(e.cause if e.cause else e).splitlines()[0]}") from None
        except ray.exceptions.RayError as e:  # actor or node died, object lost, no answer in time
            raise RankSourceError(f"{self.label} is unreachable ({type(e).__name__})") from None

    def sizes(self, relpaths: Sequence[str]) -> dict[str, int | None]:
        full = {os.path.join(self.step_dir, rel): rel for rel in relpaths}
        got = self._get(self.reader.sizes.remote(list(full)))
        return {full[p]: size for p, size in got.items()}

    def chunks(self, relpath: str, size: int) -> Iterator[bytes]:
        path = os.path.join(self.step_dir, relpath)
        offsets = iter(range(0, size, CHUNK_BYTES))
        pending: deque = deque()
        for offset in offsets:  # keep IN_FLIGHT reads queued on the far node while this one writes
            pending.append(self.reader.read.remote(path, offset, CHUNK_BYTES))
            if len(pending) >= IN_FLIGHT:
                break
        while pending:
            data = self._get(pending.popleft())
            nxt = next(offsets, None)
            if nxt is not None:
                pending.append(self.reader.read.remote(path, nxt, CHUNK_BYTES))
            yield data


@dataclass(frozen=True)
class ClusterLayout:
    """Where a run's files are written: ``rank_nodes[r]`` is the Ray node id of actor rank r; ``trainer_node`` the
    node of the trainer process (``data.pt``, ``lineage.json``); ``ips`` node id -> IP, for messages."""

    rank_nodes: tuple[str, ...]
    trainer_node: str
    ips: Mapping[str, str]

    def nodes(self) -> list[str]:
        """Every node that holds files of this run, rank 0's first."""
        return list(dict.fromkeys([*self.rank_nodes, self.trainer_node]))

    def multi_node(self) -> bool:
        return len(self.nodes()) > 1

    def label(self, node_id: str) -> str:
        return f"node {_short(node_id)} ({self.ips.get(node_id, '?')})"


def _rank_and_node(worker_self: Any) -> tuple[int, str, str]:
    return (int(os.environ["RANK"]), ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address())


def locate_ranks(worker_group: Any) -> ClusterLayout:
    """Ask every actor worker of veRL's worker group for its rank and node (no assumption about placement).

    Raises:
        RuntimeError: the workers do not report ranks 0..W-1 exactly once.
    """
    answers = ray.get([w.__ray_call__.remote(_rank_and_node) for w in worker_group.workers])
    by_rank = {rank: (node, ip) for rank, node, ip in answers}
    if sorted(by_rank) != list(range(len(answers))):
        raise RuntimeError(f"actor workers report ranks {sorted(by_rank)}, expected 0..{len(answers) - 1}")
    ips = {node: ip for node, ip in by_rank.values()}
    trainer_node = ray.get_runtime_context().get_node_id()
    ips.setdefault(trainer_node, ray.util.get_node_ip_address())
    return ClusterLayout(tuple(by_rank[r][0] for r in range(len(answers))), trainer_node, ips)


def start_readers(node_ids: Sequence[str], root: str | Path) -> dict[str, Any]:
    """One :class:`ShardReader` per node, pinned there (hard affinity: it must read that node's disk)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {node: ShardReader.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False))
            .remote(str(root)) for node in node_ids}


def wanted_files(step_dir: str | Path, layout: ClusterLayout, readers: Mapping[str, Any], *, here: str,
                 kinds: Sequence[str]) -> list[WantedFile]:
    """The files an upload on node ``here`` needs, each with its holder (files of node ``here`` are local).

    Args:
        step_dir: ``global_step_N`` (the same path on every node).
        layout: From :func:`locate_ranks`.
        readers: From :func:`start_readers` (node id -> reader).
        here: The node that consolidates.
        kinds: Rank file kinds to gather: ``model``, plus ``optim`` / ``extra_state`` when the upload needs them.
    """
    sources: dict[str, RankSource] = {}

    def source(node: str) -> RankSource:
        if node not in sources:
            sources[node] = (LocalDirSource(step_dir, layout.label(node)) if node == here
                             else RayRankSource(readers[node], step_dir, layout.label(node)))
        return sources[node]

    world = len(layout.rank_nodes)
    out = [WantedFile(rel, source(node), f"rank {rank}")
           for rank, node in enumerate(layout.rank_nodes) for rel in rank_file_names(world, rank, kinds)]
    out += [WantedFile(name, source(layout.trainer_node), "the trainer", required)
            for name, required in TRAINER_FILES.items()]
    return out


def answering_readers(readers: Mapping[str, Any]) -> tuple[dict[str, tuple[str, str]], dict[str, Any]]:
    """``({node: (node id, IP)}, {node: reader})`` for the readers that answer; a reader that died is left out.

    A node that just died stays listed alive until Ray's health check gives up on it (seconds), so a resume started
    right after a node was lost or restarted can place a reader there; that reader dies with the node
    (``RayActorError`` once Ray notices). Its files are unreachable, as on a node no longer listed: gathering then
    reports each rank file missing by name.

    Example:
        >>> where, readers = answering_readers(start_readers(alive_nodes, run_dir))  # doctest: +SKIP
    """
    calls = {node: reader.where.remote() for node, reader in readers.items()}
    where = {}
    for node, call in calls.items():
        try:
            where[node] = ray.get(call)
        except ray.exceptions.RayActorError:
            continue
    return where, {node: readers[node] for node in where}


def probe_holders(step_dir: str | Path, world_size: int, root: str | Path, *,
                  kinds: Sequence[str] = ("model",)) -> tuple[ClusterLayout, dict[str, Any]]:
    """After the run (no worker group): find which alive node holds each rank's files by asking a reader on each.

    Returns:
        The layout (a rank held nowhere maps to this node, so gathering reports it missing) and the readers.
    """
    alive = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
    where, readers = answering_readers(start_readers(alive, root))
    here = ray.get_runtime_context().get_node_id()
    rank_nodes = []
    for rank in range(world_size):
        paths = [os.path.join(str(step_dir), rel) for rel in rank_file_names(world_size, rank, kinds[:1])]
        found = [node for node, r in readers.items() if ray.get(r.sizes.remote(paths))[paths[0]] is not None]
        rank_nodes.append(here if here in found or not found else found[0])
    trainer = [node for node, r in readers.items()
               if ray.get(r.sizes.remote([os.path.join(str(step_dir), "data.pt")])).popitem()[1] is not None]
    ips = {node: ip for node, (_, ip) in where.items()}
    return ClusterLayout(tuple(rank_nodes), here if here in trainer or not trainer else trainer[0], ips), readers


def place_rank_files(step_dir: str | Path, layout: ClusterLayout, root: str | Path) -> dict[str, int]:
    """Move each rank's files of ``step_dir`` from this node onto the node that will load them.

    ``hf_upload.resume`` reshards a Hub snapshot on the driver's node (every rank's files); veRL then loads rank r's
    files on rank r's node. With node-local disks the other nodes pull their ranks' files from here (one reader per
    node, streamed in chunks), and this node drops its copies of them. Files a node already has with the same size
    are not copied, and nothing is deleted here for them (shared storage: it is the same file).

    Returns:
        ``{node id: bytes copied there}`` for the other nodes.

    Raises:
        utils.checkpoint.errors.RankFileUnavailableError: a node cannot get its files (the message names it).
    """
    here = ray.get_runtime_context().get_node_id()
    world = len(layout.rank_nodes)
    others = {node: [r for r, n in enumerate(layout.rank_nodes) if n == node]
              for node in dict.fromkeys(layout.rank_nodes) if node != here}
    if not others:
        return {}
    readers = start_readers([here, *others], root)
    try:
        calls = {}
        for node, ranks in others.items():
            rels = [rel for r in ranks for rel in rank_file_names(world, r)]
            owners = [f"rank {r}" for r in ranks for _ in range(3)]
            calls[node] = readers[node].pull.remote(str(step_dir), rels, owners, readers[here], layout.label(here))
        moved = {}
        for node, ref in calls.items():
            try:
                out = ray.get(ref)
            except ray.exceptions.RayTaskError as e:
                raise (e.cause or e) from None  # the RankFileUnavailableError raised on that node, as is
            moved[node] = int(out["bytes_moved"])
            # copied there, so not the same file: this node keeps only its own ranks' files
            ray.get(readers[here].remove_files.remote(str(step_dir), out["fetched"]))
        return moved
    finally:
        for reader in readers.values():
            ray.kill(reader)
