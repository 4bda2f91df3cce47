"""Full tracebacks go to a log file; the console gets one line that names it.

Every entry point of this project (the two CLIs, the trainer's upload actor) prints one clear line per failure. The
details a maintainer needs - the whole exception chain - are written here, with the Hugging Face token removed, and
the one-line message ends with ``(details: PATH)``.

Example:
    >>> path = log_traceback(exc, name="hf_uploader")  # doctest: +SKIP
    >>> print(f"error: {exc} (details: {path})")  # doctest: +SKIP
"""

from __future__ import annotations

import os
import re
import tempfile
import time
import traceback
from pathlib import Path

__all__ = ["log_traceback", "default_log_dir"]

_TOKEN_LIKE = re.compile(r"\bhf_[A-Za-z0-9]{20,}\b")


def default_log_dir() -> Path:
    """``$VERL_GRPO_HUB_LOG_DIR``, else ``<TMPDIR>/verl-grpo-hub-logs``."""
    return Path(os.environ.get("VERL_GRPO_HUB_LOG_DIR") or Path(tempfile.gettempdir()) / "verl-grpo-hub-logs")


def log_traceback(exc: BaseException, *, name: str = "error", where: str | Path | None = None) -> Path | None:
    """Write ``exc``'s full traceback (causes included, tokens removed) to a new log file and return its path.

    Args:
        exc: The exception (its ``__cause__``/``__context__`` chain is written too).
        name: File name prefix, e.g. ``"hf_uploader"``.
        where: Directory for the file (default :func:`default_log_dir`); created if needed.

    Returns:
        The log file, or ``None`` when it cannot be written (logging must never hide the original failure).
    """
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    token = os.environ.get("HF_TOKEN")
    if token:
        text = text.replace(token, "***")
    text = _TOKEN_LIKE.sub("***", text)
    try:
        directory = Path(where) if where else default_log_dir()
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)
        return path
    except OSError:
        return None
