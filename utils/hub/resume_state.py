"""What a resume snapshot on the Hub holds besides the model, and how to tell a complete one from a broken one.

With ``strategy=checkpoint`` every upload is a *resume snapshot*: the consolidated model and the name-keyed
``optimizer.pt`` (world-size free), plus the trainer state veRL keeps beside its shards, validated and re-serialized (never copied: veRL unpickles
those files with ``weights_only=False``, see :mod:`utils.checkpoint.safe_state`)::

    <namespace>/trainer_state.json              written last into the staging folder; lists every other file
    <namespace>/resume/extra_state_rank_{r}.pt  veRL's extra_state_world_size_W_rank_r.pt (lr scheduler, RNG)
    <namespace>/resume/data.pt                  veRL's dataloader state (StatefulDataLoader)
    <namespace>/resume/curriculum_state.json    the reasoning-gym curriculum levels and windows (when enabled)
    <namespace>/resume/lineage.json             tracking run id, config hash, veRL version (the trainer writes it)

Completeness, two locks: the uploader creates the ``step-N`` tag only after the whole commit landed (a commit is
atomic on the Hub, an interrupted upload leaves no tag), and ``trainer_state.json`` names the sha256 of every file
of its snapshot, so a tag whose files do not match (hand-edited, mixed up) is not taken for a resume point.
The veRL files are loaded with ``weights_only=True`` and an allow-list, then written again with ``torch.save``: what
veRL loads after a Hub round trip holds the same values it saved, and nothing else.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from utils.checkpoint.safe_state import rewrite_trainer_state
from utils.hub.errors import UnsupportedSnapshotError
from utils.hub.verify import sha256_of

__all__ = ["TRAINER_STATE_FILE", "LINEAGE_FILE", "RESUME_DIR", "FORMAT_VERSION", "stage_resume_files",
           "snapshot_problems", "read_trainer_state"]

logger = logging.getLogger(__name__)

TRAINER_STATE_FILE = "trainer_state.json"
LINEAGE_FILE = "lineage.json"  # the trainer writes it into global_step_N/ at each save
CURRICULUM_FILE = "curriculum_state.json"
RESUME_DIR = "resume"
FORMAT_VERSION = 1
_NOT_HASHED = {"README.md", TRAINER_STATE_FILE}  # the card is regenerated per upload; the state cannot hash itself


def stage_resume_files(step_dir: Path, folder: Path, *, step: int, world_size: int) -> dict[str, Any]:
    """Validate and re-serialize veRL's trainer state of ``step_dir`` into ``folder/resume/``; write
    ``folder/trainer_state.json``.

    Call it after the model (and ``optimizer.pt``) are consolidated into ``folder``: the state lists the sha256 of
    every file then in ``folder``.

    Args:
        step_dir: veRL's ``global_step_N`` directory (``actor/extra_state_*``, ``data.pt``, ...).
        folder: The consolidated model folder about to be uploaded.
        step: The training step.
        world_size: The world size the shards were saved at.

    Returns:
        The trainer state written.

    Raises:
        FileNotFoundError: an ``extra_state`` rank file is missing (veRL always writes one per rank).
        utils.checkpoint.errors.UnsafePickleError: a state file holds a type outside the allow-list (not loaded).
    """
    step_dir, folder = Path(step_dir), Path(folder)
    resume = folder / RESUME_DIR
    resume.mkdir(parents=True, exist_ok=True)
    states = []
    for rank in range(world_size):
        src = step_dir / "actor" / f"extra_state_world_size_{world_size}_rank_{rank}.pt"
        if not src.is_file():
            raise FileNotFoundError(f"{src} is missing: veRL writes one extra_state file per rank; the checkpoint "
                                    "is incomplete, so it cannot be uploaded as a resume snapshot.")
        # Validated (weights_only + allow-list) and re-serialized, never copied: see utils.checkpoint.safe_state.
        states.append(rewrite_trainer_state(src, resume / f"extra_state_rank_{rank}.pt", what="veRL's extra state"))
    dataloader = None
    if (step_dir / "data.pt").is_file():
        dataloader = rewrite_trainer_state(step_dir / "data.pt", resume / "data.pt", what="veRL's dataloader state")
    for name in (CURRICULUM_FILE, LINEAGE_FILE):  # JSON: checked to parse, then copied
        if (step_dir / name).is_file():
            _rewrite_json(step_dir / name, resume / name)
    lineage = json.loads((step_dir / LINEAGE_FILE).read_text()) if (step_dir / LINEAGE_FILE).is_file() else {}
    curriculum = json.loads((step_dir / CURRICULUM_FILE).read_text()) if (step_dir / CURRICULUM_FILE).is_file() \
        else None
    state: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "global_step": int(step),
        "world_size": int(world_size),
        "has_optimizer": (folder / "optimizer.pt").is_file(),
        "lr_scheduler": _scheduler_summary(states[0]),
        "dataloader": _dataloader_summary(dataloader),
        "rng": {"per_rank": [f"{RESUME_DIR}/extra_state_rank_{r}.pt" for r in range(world_size)]},
        "curriculum_levels": (curriculum or {}).get("levels"),
        "tracking": lineage.get("tracking", {}),
        "verl_version": lineage.get("verl_version"),
        "config_hash": lineage.get("config_hash"),
        "compat": lineage.get("compat", {}),
        "files": {p.relative_to(folder).as_posix(): {"sha256": sha256_of(p), "size": p.stat().st_size}
                  for p in sorted(folder.rglob("*")) if p.is_file() and p.relative_to(folder).as_posix()
                  not in _NOT_HASHED},
    }
    (folder / TRAINER_STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True, default=str))
    return state


def read_trainer_state(folder: Path) -> dict[str, Any] | None:
    """``folder/trainer_state.json`` parsed, or ``None`` when the folder holds weights only."""
    path = Path(folder) / TRAINER_STATE_FILE
    if not path.is_file():
        return None
    state = json.loads(path.read_text())
    if int(state.get("format_version", 0)) > FORMAT_VERSION:
        raise UnsupportedSnapshotError(f"{path}: format_version {state['format_version']} is newer than this code understands "
                         f"({FORMAT_VERSION}); update the project to resume from it.")
    return state


def snapshot_problems(folder: Path, state: dict[str, Any]) -> list[str]:
    """Every file ``state`` lists that is missing from ``folder`` or has other bytes (empty: the snapshot is whole).

    Example:
        >>> snapshot_problems(Path("snap"), {"files": {}})
        []
    """
    problems = []
    for rel, meta in sorted(state.get("files", {}).items()):
        path = Path(folder) / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
        elif path.stat().st_size != meta["size"] or sha256_of(path) != meta["sha256"]:
            problems.append(f"{rel}: sha256 differs from trainer_state.json")
    return problems


def _rewrite_json(src: Path, dst: Path) -> None:
    """Copy a JSON side file after checking it parses (JSON carries data only; nothing in it can run)."""
    raw = src.read_bytes()
    try:
        json.loads(raw)
    except ValueError as e:
        raise ValueError(f"{src}: not valid JSON ({e}); fix or delete it before uploading a resume snapshot.") from e
    dst.write_bytes(raw)


def _scheduler_summary(extra_state: Any) -> dict[str, Any]:
    """A readable view of the lr scheduler (the state itself travels in the re-serialized veRL file)."""
    sd = (extra_state.get("lr_scheduler") if isinstance(extra_state, dict) else None) or {}
    return {k: sd[k] for k in ("last_epoch", "_step_count", "_last_lr", "base_lrs") if k in sd}


def _dataloader_summary(sd: Any) -> dict[str, Any]:
    """How far the dataloader got (``StatefulDataLoader`` counters), for humans and tests."""
    if not isinstance(sd, dict):
        return {}
    # StatefulDataLoader: counters at the top level without workers, under _snapshot/_main_snapshot with workers
    main = (sd.get("_snapshot") or {}).get("_main_snapshot") or sd
    out = {"batches_yielded": main.get("_num_yielded"), "iterator_finished": sd.get("_iterator_finished")}
    return {k: v for k, v in out.items() if v is not None}
