"""Disk space before a write, and plain words for a write that failed because of the disk or a vanished input.

Without this, a full disk surfaces as whatever the writer happened to be doing (``unexpected pos 4480 vs 4374`` from
torch's zip writer, a bare ``OSError: [Errno 28]``), and a checkpoint deleted mid-merge (checkpoint rotation, a user
cleaning up) as a raw ``FileNotFoundError`` or an unrelated error from a later step.

Example:
    >>> check_free_space(Path("out/model"), need=3_000_000_000)  # doctest: +SKIP
"""

from __future__ import annotations

import errno
import shutil
from collections.abc import Sequence
from pathlib import Path

from utils.checkpoint.errors import CheckpointVanishedError, OutputSpaceError

__all__ = ["check_free_space", "explain_write_failure", "free_bytes"]

# After a failed write, less free space than this (bytes) means the disk is what failed: torch's zip writer reports
# ENOSPC as a RuntimeError about file positions, not as an OSError.
_NEARLY_FULL = 64 << 20


def _existing(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: str | Path) -> int:
    """Free bytes on the filesystem that holds ``path`` (or its nearest existing parent)."""
    return shutil.disk_usage(_existing(Path(path))).free


def check_free_space(out_dir: str | Path, need: int) -> None:
    """Raise :class:`OutputSpaceError` before writing when ``out_dir``'s filesystem has less than ``need`` bytes free.

    ``need`` is the planned size of the weights (+ the optimizer rank files' size when ``optimizer.pt`` is written,
    an upper bound): the output is built beside ``out_dir`` and renamed, so it all lives there at once.
    """
    free = free_bytes(Path(out_dir).parent)
    if need > free:
        raise OutputSpaceError(
            f"{out_dir}: the consolidated model needs about {need / 1e9:.2f} GB, but {_existing(Path(out_dir))} has "
            f"only {free / 1e9:.2f} GB free. Free space there or choose an OUT_DIR on a larger disk.")


def explain_write_failure(exc: BaseException, actor_dir: Path, inputs: Sequence[Path],
                          out_dir: Path) -> Exception | None:
    """A clear error for a failed consolidation when the cause is the disk or a vanished checkpoint, else ``None``.

    Call it before the temporary folder is removed: a disk that filled up still shows (almost) no free space.
    """
    if isinstance(exc, KeyboardInterrupt | SystemExit | OutputSpaceError | CheckpointVanishedError):
        return None
    gone = [p for p in inputs if not p.exists()]
    if not Path(actor_dir).is_dir() or gone:
        what = str(actor_dir) if not Path(actor_dir).is_dir() else f"{len(gone)} rank file(s), e.g. {gone[0]}"
        return CheckpointVanishedError(
            f"{what} disappeared while the checkpoint was being consolidated (deleted or moved - checkpoint rotation "
            f"or a clean-up?). Nothing was written to {out_dir}; consolidate a step that still exists.")
    no_space = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(exc)
    if no_space or (isinstance(exc, RuntimeError) and ("unexpected pos" in text or "write" in text.lower())
                    and free_bytes(out_dir) < _NEARLY_FULL):
        return OutputSpaceError(
            f"{out_dir}: the disk ran out of space while writing ({type(exc).__name__}: "
            f"{text.splitlines()[0][:120] if text else ''}). Nothing was left behind. Free space there or choose an "
            "OUT_DIR on a larger disk.")
    return None
