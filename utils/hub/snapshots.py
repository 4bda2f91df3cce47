"""Find the newest *complete* resume snapshot of a repo/namespace on the Hub, download it, reshard it for veRL.

    python utils/hf_uploader.py pull --repo-id alice/qwen-grpo [--namespace exp-a] [--revision step-300] \\
        --world-size 8 --out checkpoints/run

A snapshot is a ``step-N`` tag (``<namespace>-step-N`` in a namespace). The tag is created only after its commit
landed, so an interrupted upload never leaves a tag; and each snapshot's ``trainer_state.json`` lists the sha256 of
every file, checked after download, so a tag whose files do not match is skipped with a warning and the previous one
is used. Only the files the snapshot needs are downloaded (``snapshot_download`` with the exact paths as
``allow_patterns``, through the normal Hugging Face cache, so a second pull of the same tag downloads nothing).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from utils.hub.client import HubClient
from utils.hub.errors import IncompleteSnapshotError, SnapshotNotFoundError
from utils.hub.push import _step_of_tag, tag_for_step
from utils.hub.resume_state import TRAINER_STATE_FILE, read_trainer_state, snapshot_problems

__all__ = ["ResumeSnapshot", "SnapshotNotFoundError", "IncompleteSnapshotError", "list_snapshots",
           "find_resume_snapshot", "pull_snapshot"]

logger = logging.getLogger(__name__)


@dataclass
class ResumeSnapshot:
    """One downloaded snapshot.

    Attributes:
        repo_id, namespace, tag, step, commit: where it came from.
        folder: the local folder holding it (the namespace's subfolder of the downloaded snapshot).
        state: ``trainer_state.json`` parsed; ``None`` for a weights-only upload (``strategy`` end/every_save, or
            the ``step-0`` bootstrap).
    """

    repo_id: str
    namespace: str
    tag: str
    step: int
    commit: str
    folder: Path
    state: dict[str, Any] | None

    @property
    def has_optimizer(self) -> bool:
        return bool(self.state and self.state.get("has_optimizer") and (self.folder / "optimizer.pt").is_file())

    @property
    def resumable(self) -> bool:
        """Model, optimizer and trainer state are all there: veRL can continue exactly."""
        return self.state is not None and self.has_optimizer


def list_snapshots(client: HubClient, repo_id: str, namespace: str = "") -> list[tuple[int, str, str]]:
    """``(step, tag, commit)`` of every snapshot of ``namespace``, newest first (empty for a new repo/namespace)."""
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        _, tags = client.refs(repo_id)
    except RepositoryNotFoundError:
        return []
    found = [(s, t, c) for t, c in tags.items() if (s := _step_of_tag(t, namespace)) is not None]
    return sorted(found, reverse=True)


def _download(client: HubClient, repo_id: str, commit: str, paths: list[str], cache_dir: str | None) -> Path:
    return Path(client._read(lambda: client.api.snapshot_download(
        repo_id, revision=commit, allow_patterns=paths, cache_dir=cache_dir)))


def _fetch(client: HubClient, repo_id: str, namespace: str, step: int, tag: str, commit: str,
           cache_dir: str | None) -> tuple[ResumeSnapshot, list[str]]:
    """Download one snapshot (only its own files) and check it; returns it with its problems (empty: complete)."""
    ns = namespace.strip("/")
    prefix = f"{ns}/" if ns else ""
    remote = client.tree(repo_id, commit, prefix=ns)
    state_path = prefix + TRAINER_STATE_FILE
    if state_path in remote:
        root = _download(client, repo_id, commit, [state_path], cache_dir)
        state = read_trainer_state(root / ns if ns else root)
        wanted = [state_path] + [prefix + rel for rel in state.get("files", {})]
    else:  # weights only: the model folder's own files (not other namespaces' subfolders, not the card)
        state = None
        wanted = [p for p in remote if "/" not in p[len(prefix):] and not p.endswith("README.md")]
    if not wanted:
        return ResumeSnapshot(repo_id, ns, tag, step, commit, Path(), None), [f"{tag} holds no files under {prefix!r}"]
    missing_remote = [p for p in wanted if p not in remote]
    root = _download(client, repo_id, commit, [p for p in wanted if p in remote], cache_dir)
    folder = root / ns if ns else root
    snap = ResumeSnapshot(repo_id, ns, tag, step, commit, folder, state)
    problems = [f"{p}: listed in trainer_state.json but not in the commit" for p in missing_remote]
    if state is not None:
        problems += snapshot_problems(folder, state)
        if int(state.get("global_step", -1)) != step:
            problems.append(f"trainer_state.json says global_step {state.get('global_step')}, the tag says {step}")
    elif not (folder / "config.json").is_file() and not (folder / "adapter_config.json").is_file():
        problems.append("config.json missing")  # (a LoRA upload's PEFT folder has adapter_config.json instead)
    return snap, problems


def find_resume_snapshot(
    repo_id: str,
    namespace: str = "",
    *,
    revision: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    cache_dir: str | None = None,
    client: HubClient | None = None,
) -> ResumeSnapshot | None:
    """Download the newest complete snapshot of ``repo_id``/``namespace`` (or exactly ``revision``).

    Args:
        repo_id: The repo.
        namespace: The experiment's subfolder (``""``: the repo root).
        revision: A tag (``step-N`` / ``<namespace>-step-N``) or a bare step number; ``None``: the newest complete.
        token, endpoint: As for the uploader (``HF_TOKEN`` / ``HF_ENDPOINT`` by default).
        cache_dir: Hugging Face cache (default: ``HF_HUB_CACHE``).
        client: A ready :class:`HubClient` (else one is built from token/endpoint).

    Returns:
        The :class:`ResumeSnapshot`, or ``None`` when the namespace has no snapshot at all.

    Raises:
        SnapshotNotFoundError: ``revision`` names a tag that does not exist.
        IncompleteSnapshotError: ``revision`` names a snapshot whose files do not match its trainer_state.json.

    Example:
        >>> snap = find_resume_snapshot("alice/qwen-grpo", "exp-a")  # doctest: +SKIP
        >>> snap.tag, snap.resumable  # doctest: +SKIP
        ('exp-a-step-300', True)
    """
    client = client or HubClient(token=token, endpoint=endpoint)
    snapshots = list_snapshots(client, repo_id, namespace)
    if revision is not None:
        wanted = tag_for_step(int(revision), namespace) if str(revision).isdigit() else str(revision)
        if wanted.startswith("step-") and namespace:
            wanted = tag_for_step(int(wanted[5:]), namespace) if wanted[5:].isdigit() else wanted
        snapshots = [s for s in snapshots if s[1] == wanted]
        if not snapshots:
            raise SnapshotNotFoundError(f"{repo_id} has no tag '{wanted}' for namespace {namespace or '(root)'}; "
                                        f"tags there: {[t for _, t, _ in list_snapshots(client, repo_id, namespace)]}")
    for step, tag, commit in snapshots:
        snap, problems = _fetch(client, repo_id, namespace, step, tag, commit, cache_dir)
        if not problems:
            logger.info("Hub snapshot %s@%s (%s): step %d, %s", repo_id, tag, commit[:8], step,
                        "model + optimizer + trainer state" if snap.resumable else "weights only")
            return snap
        if revision is not None:
            raise IncompleteSnapshotError(f"{repo_id}@{tag} is incomplete: {'; '.join(problems[:5])}")
        logger.warning("Hub snapshot %s@%s is incomplete (%s); trying the previous one", repo_id, tag,
                       "; ".join(problems[:3]))
    return None


def pull_snapshot(
    repo_id: str,
    out_dir: str | Path,
    world_size: int,
    namespace: str = "",
    *,
    revision: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    cache_dir: str | None = None,
    allow_weights_only: bool = False,
) -> tuple[ResumeSnapshot, Path]:
    """Download the newest complete snapshot and write it as veRL's checkpoint for ``world_size`` in ``out_dir``.

    Args:
        repo_id, namespace, revision, token, endpoint, cache_dir: see :func:`find_resume_snapshot`.
        out_dir: veRL's ``trainer.default_local_dir`` (``global_step_N`` is written inside it).
        world_size: The world size of the run that will load it.
        allow_weights_only: Accept a snapshot without optimizer/trainer state (only model shards are written).

    Returns:
        ``(snapshot, global_step_N directory)``.

    Raises:
        SnapshotNotFoundError: nothing to pull, or only weights when ``allow_weights_only`` is false.
        IncompleteSnapshotError, utils.checkpoint.reshard.ReshardError, utils.checkpoint.errors.OptimizerMismatchError.
    """
    from utils.checkpoint.reshard import write_verl_checkpoint

    # A missing token, a rejected one and a repo that does not exist each get their own message (a new repo is
    # "no snapshot" only for a training run's resume=auto, not for an explicit pull).
    HubClient(token=token, endpoint=endpoint).check_readable(repo_id)
    snap = find_resume_snapshot(repo_id, namespace, revision=revision, token=token, endpoint=endpoint,
                                cache_dir=cache_dir)
    where = f"{repo_id}" + (f" (namespace {namespace})" if namespace else "")
    if snap is None:
        raise SnapshotNotFoundError(f"{where} holds no complete snapshot to pull.")
    if not snap.resumable and not allow_weights_only:
        raise SnapshotNotFoundError(
            f"{where}@{snap.tag} holds weights only (no optimizer.pt / trainer_state.json: it was not uploaded with "
            "strategy=checkpoint). Pass --weights-only to write the model shards alone.")
    step_dir = write_verl_checkpoint(snap.folder, out_dir, world_size, step=snap.step,
                                     weights_only=not snap.resumable)
    (step_dir / "hub_source.json").write_text(json.dumps(
        {"repo_id": repo_id, "namespace": namespace, "tag": snap.tag, "commit": snap.commit}, indent=2))
    return snap, step_dir
