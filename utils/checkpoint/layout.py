"""Find and validate a veRL FSDP checkpoint on disk: which directory, which step, which world size, which files.

veRL 0.9.1 writes, per save::

    <run>/latest_checkpointed_iteration.txt                 "N"
    <run>/global_step_N/actor/fsdp_config.json              {"FSDP_version": 2, "world_size": W}  (newer veRL only)
    <run>/global_step_N/actor/model_world_size_W_rank_r.pt  r = 0..W-1
    <run>/global_step_N/actor/optim_world_size_W_rank_r.pt
    <run>/global_step_N/actor/huggingface/                  config, generation config, tokenizer

Everything here reads only names and small JSON files; no tensor is loaded.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from utils.checkpoint.errors import (
    CorruptShardError,
    MissingRankFileError,
    MixedWorldSizeError,
    NotACheckpointError,
    WorldSizeMismatchError,
)

__all__ = ["CheckpointLayout", "find_step_dirs", "latest_step", "step_from_path", "resolve_actor_dir", "detect_layout"]

_STEP_DIR = re.compile(r"^global_step_(\d+)$")
_RANK_FILE = re.compile(r"^(model|optim)_world_size_(\d+)_rank_(\d+)\.pt$")


@dataclass(frozen=True)
class CheckpointLayout:
    """A validated checkpoint: every rank file of one world size is present.

    Attributes:
        actor_dir: the directory holding the rank files.
        world_size: W, the number of ranks that wrote the checkpoint.
        fsdp_version: 1 or 2 from ``fsdp_config.json``; ``None`` for older layouts without that file.
        step: N of the enclosing ``global_step_N`` directory, if the path has one.
        model_files: ``model_world_size_W_rank_r.pt`` for r = 0..W-1, in rank order.
        optim_files: the matching optimizer files, or an empty tuple if none were saved.
        hf_dir: the ``huggingface/`` folder beside the rank files, if present.
    """

    actor_dir: Path
    world_size: int
    fsdp_version: int | None
    step: int | None
    model_files: tuple[Path, ...]
    optim_files: tuple[Path, ...]
    hf_dir: Path | None


def find_step_dirs(run_dir: str | Path) -> list[tuple[int, Path]]:
    """List the ``global_step_N`` directories of a run, sorted by N.

    Args:
        run_dir: veRL's ``trainer.default_local_dir`` (the folder holding ``global_step_*``).

    Returns:
        ``[(N, path), ...]`` in increasing N; empty if there are none.

    Example:
        >>> find_step_dirs("checkpoints/my_run")  # doctest: +SKIP
        [(50, PosixPath('checkpoints/my_run/global_step_50')), (100, ...)]
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found)


def step_from_path(path: str | Path) -> int | None:
    """The ``N`` of the nearest ``global_step_N`` component of ``path`` (itself or a parent), else ``None``.

    Example:
        >>> step_from_path(Path("/runs/x/global_step_300/actor"))
        300
    """
    for part in reversed(Path(path).parts):
        if m := _STEP_DIR.match(part):
            return int(m.group(1))
    return None


def latest_step(run_dir: str | Path) -> int | None:
    """The step to use by default: ``latest_checkpointed_iteration.txt`` if it names an existing step directory,
    else the highest ``global_step_N`` present; ``None`` if the run has no step directory.

    veRL writes the tracker file after the step directory is complete, so it is the better signal; the fallback
    covers runs copied without it.
    """
    run_dir = Path(run_dir)
    steps = dict(find_step_dirs(run_dir))
    tracker = run_dir / "latest_checkpointed_iteration.txt"
    if tracker.is_file():
        text = tracker.read_text().strip()
        if text.isdigit() and int(text) in steps:
            return int(text)
    return max(steps) if steps else None


def _has_rank_files(d: Path) -> bool:
    return d.is_dir() and any(_RANK_FILE.match(p.name) for p in d.iterdir())


def resolve_actor_dir(path: str | Path, step: int | None = None) -> Path:
    """Accept ``global_step_N/actor``, ``global_step_N`` or a run directory (plus an optional step) and return the
    directory holding the rank files.

    Raises:
        NotACheckpointError: nothing under ``path`` looks like a veRL checkpoint, or ``step`` does not exist.
    """
    path = Path(path)
    if not path.is_dir():
        raise NotACheckpointError(f"{path}: no such directory")
    for candidate in (path, path / "actor"):
        if _has_rank_files(candidate):
            own = step_from_path(candidate.resolve())
            if step is None or step == own:
                return candidate
            here = f"the checkpoint of step {own}" if own is not None else "one checkpoint"
            run = f" ({candidate.resolve().parents[1]})" if own is not None else ""
            raise NotACheckpointError(
                f"{path} is {here}; --step {step} (step=) picks a step inside a run directory. Drop --step, or pass "
                f"the run directory that holds global_step_{step}/{run}.")
    steps = dict(find_step_dirs(path))
    if steps:
        chosen = latest_step(path) if step is None else step
        if chosen not in steps:
            raise NotACheckpointError(
                f"{path}: no global_step_{chosen} directory; steps present: {sorted(steps)}")
        step_dir = steps[chosen]
        return step_dir / "actor" if (step_dir / "actor").is_dir() else step_dir
    raise NotACheckpointError(
        f"{path} is not a veRL checkpoint: expected model_world_size_W_rank_r.pt files, an actor/ folder, or "
        "global_step_N/ folders. Point at <run>/global_step_N/actor (or the run directory).")


def _read_fsdp_config(path: Path) -> dict:
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CorruptShardError(f"{path}: cannot be parsed as JSON ({e}); fix or delete it") from e
    if not isinstance(cfg, dict):
        raise CorruptShardError(f"{path}: expected a JSON object like {{\"FSDP_version\": 2, \"world_size\": 8}}")
    return cfg


def detect_layout(path: str | Path, step: int | None = None) -> CheckpointLayout:
    """Locate the rank files under ``path`` and check that they form one complete checkpoint.

    Args:
        path: ``global_step_N/actor``, ``global_step_N``, or a run directory.
        step: with a run directory, the step to use; default: the latest (see :func:`latest_step`).

    Returns:
        The validated :class:`CheckpointLayout`.

    Raises:
        NotACheckpointError: no rank files found.
        MixedWorldSizeError: model files of more than one world size are present.
        WorldSizeMismatchError: ``fsdp_config.json`` disagrees with the files, or a rank number is >= W.
        MissingRankFileError: a model rank file in 0..W-1 (or an optimizer file, if any are present) is absent.

    Example:
        >>> layout = detect_layout("checkpoints/run/global_step_100/actor")  # doctest: +SKIP
        >>> layout.world_size, layout.fsdp_version
        (8, 2)
    """
    actor_dir = resolve_actor_dir(path, step)
    ranks: dict[str, dict[int, set[int]]] = {"model": {}, "optim": {}}
    for p in actor_dir.iterdir():
        if m := _RANK_FILE.match(p.name):
            ranks[m.group(1)].setdefault(int(m.group(2)), set()).add(int(m.group(3)))
    if not ranks["model"]:
        raise NotACheckpointError(
            f"{actor_dir}: no model_world_size_W_rank_r.pt files (found: "
            f"{sorted(p.name for p in actor_dir.iterdir())[:10]}). Is this the actor/ folder of a veRL FSDP run?")
    if len(ranks["model"]) > 1:
        listing = ", ".join(f"W={w}: {len(r)} files" for w, r in sorted(ranks["model"].items()))
        raise MixedWorldSizeError(
            f"{actor_dir}: model files of several world sizes are mixed ({listing}). A run resumed at another "
            "world size must save into a fresh directory; move the stale files away and retry.")
    (world_size, present), = ranks["model"].items()

    fsdp_version = None
    cfg_path = actor_dir / "fsdp_config.json"
    if cfg_path.is_file():
        cfg = _read_fsdp_config(cfg_path)
        if "world_size" in cfg and int(cfg["world_size"]) != world_size:
            raise WorldSizeMismatchError(
                f"{cfg_path} says world_size={cfg['world_size']} but the rank files are "
                f"model_world_size_{world_size}_rank_*.pt. The directory mixes two saves; keep the files that "
                "match the run you want, or fix fsdp_config.json.")
        fsdp_version = int(cfg["FSDP_version"]) if "FSDP_version" in cfg else None

    extra = sorted(r for r in present if r >= world_size)
    if extra:
        raise WorldSizeMismatchError(
            f"{actor_dir}: rank(s) {extra} found in model_world_size_{world_size}_rank_*.pt, but ranks must be "
            f"0..{world_size - 1}.")
    missing = sorted(set(range(world_size)) - present)
    if missing:
        names = ", ".join(f"model_world_size_{world_size}_rank_{r}.pt" for r in missing[:8])
        raise MissingRankFileError(
            f"{actor_dir}: missing {len(missing)} of {world_size} rank files: {names}. Every rank's file is needed "
            "(each holds a different slice of every tensor); copy the missing files or use another step.")

    optim_files: tuple[Path, ...] = ()
    if ranks["optim"]:
        optim_ranks = ranks["optim"].get(world_size, set())
        missing_o = sorted(set(range(world_size)) - optim_ranks)
        if missing_o or len(ranks["optim"]) > 1:
            optim_files = ()  # incomplete optimizer state: reported only if the optimizer is asked for
        else:
            optim_files = tuple(actor_dir / f"optim_world_size_{world_size}_rank_{r}.pt" for r in range(world_size))

    hf_dir = actor_dir / "huggingface"
    return CheckpointLayout(
        actor_dir=actor_dir,
        world_size=world_size,
        fsdp_version=fsdp_version,
        step=step_from_path(actor_dir),
        model_files=tuple(actor_dir / f"model_world_size_{world_size}_rank_{r}.pt" for r in range(world_size)),
        optim_files=optim_files,
        hf_dir=hf_dir if hf_dir.is_dir() else None,
    )
