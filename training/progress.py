"""One line per training step that a person can follow, instead of veRL's console dump of ~100 keys.

    step 12/30 | reward 0.842 | exact 0.31 | val exact 0.28 | len 9.1 | kl 0.0012 | 3.4 s/step | ETA 1m05s

Read from the step's metric dict as veRL computed it (the same dict its loggers receive): ``critic/score/mean``
(the mean total reward), ``train/exact_acc`` (added by :class:`training.trainer.ReasoningGymTrainer`), the mean of
``val-*/<task>/exact/mean@N`` when validation ran this step, ``response_length/mean`` and ``actor/kl_loss``. A
missing metric is left out of the line, never shown as 0. Seconds per step are wall-clock between lines
(validation and checkpoint saves included), and the ETA is that average times the steps left.

Example:
    >>> format_progress(12, 30, {"critic/score/mean": 0.8423, "train/exact_acc": 0.3125}, 3.4, 61.2)
    'step 12/30 | reward 0.842 | exact 0.31 | 3.4 s/step | ETA 1m01s'
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from typing import Any

__all__ = ["ProgressLine", "format_progress", "format_seconds", "val_exact", "val_samples"]

_VAL_EXACT_RE = re.compile(r"^val-(?:core|aux)/(?P<task>[^/]+)/exact/mean@(?P<n>\d+)$")


def format_seconds(seconds: float) -> str:
    """``61.2`` -> ``'1m01s'``; ``3725`` -> ``'1h02m'``; ``9`` -> ``'9s'``.

    Example:
        >>> format_seconds(61.2), format_seconds(3725), format_seconds(9)
        ('1m01s', '1h02m', '9s')
    """
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def val_exact(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Per-task exact-answer accuracy on the val split, from veRL's ``val-*/<task>/exact/mean@N`` keys.

    Example:
        >>> val_exact({"val-aux/chain_sum/exact/mean@1": 0.5, "val-core/chain_sum/acc/mean@1": 0.5})
        {'chain_sum': 0.5}
    """
    out = {}
    for key, value in metrics.items():
        match = _VAL_EXACT_RE.match(str(key))
        if match:
            out[match["task"]] = float(value)
    return out


def val_samples(metrics: Mapping[str, Any]) -> int | None:
    """How many answers per val question the exact accuracy averages (the ``N`` of veRL's ``mean@N``), or None.

    Example:
        >>> val_samples({"val-aux/chain_sum/exact/mean@4": 0.5}), val_samples({"critic/score/mean": 0.1})
        (4, None)
    """
    ns = [int(m["n"]) for m in map(_VAL_EXACT_RE.match, map(str, metrics)) if m]
    return max(ns) if ns else None


def _num(metrics: Mapping[str, Any], key: str) -> float | None:
    try:
        return float(metrics[key])
    except (KeyError, TypeError, ValueError):
        return None


def format_progress(step: int, total: int, metrics: Mapping[str, Any], seconds_per_step: float | None,
                    eta_seconds: float | None) -> str:
    """The progress line of one step (see the module docstring); metrics that are absent are left out."""
    width = len(str(total))
    parts = [f"step {step:>{width}}/{total}"]
    for label, key, fmt in (("reward", "critic/score/mean", ".3f"), ("exact", "train/exact_acc", ".2f")):
        value = _num(metrics, key)
        if value is not None:
            parts.append(f"{label} {value:{fmt}}")
    val = val_exact(metrics)
    if val:
        parts.append(f"val exact {sum(val.values()) / len(val):.2f}")
    for label, key, fmt in (("len", "response_length/mean", ".1f"), ("kl", "actor/kl_loss", ".4f")):
        value = _num(metrics, key)
        if value is not None:
            parts.append(f"{label} {value:{fmt}}")
    if seconds_per_step is not None:
        parts.append(f"{seconds_per_step:.1f} s/step")
    if eta_seconds is not None:
        parts.append(f"ETA {format_seconds(eta_seconds)}")
    return " | ".join(parts)


class ProgressLine:
    """Prints :func:`format_progress` once per step, timing steps by the wall clock between calls.

    Args:
        total_steps: The run's last step.
        start_step: The step before the first one this process runs (> 0 after a resume).
        clock: Seconds source (tests pass a fake).
        emit: Where lines go (default ``print(..., flush=True)``).
    """

    def __init__(self, total_steps: int, start_step: int = 0, *, clock=time.monotonic, emit=None):
        self.total = int(total_steps)
        self.start_step = int(start_step)
        self._clock = clock
        self._started = clock()
        self._emit = emit or (lambda line: print(line, flush=True))

    def restart_clock(self, start_step: int | None = None) -> None:
        """Start timing now (call when the first step begins, after setup and the initial validation)."""
        if start_step is not None:
            self.start_step = int(start_step)
        self._started = self._clock()

    def update(self, step: int, metrics: Mapping[str, Any]) -> str:
        """Format, print and return the line of ``step``."""
        done = max(1, int(step) - self.start_step)
        per_step = (self._clock() - self._started) / done
        eta = per_step * max(0, self.total - int(step))
        line = format_progress(int(step), self.total, metrics, per_step, eta)
        self._emit(line)
        return line
