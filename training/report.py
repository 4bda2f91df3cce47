"""Curves and a before/after table of a run, read from veRL's own metric log.

    python -m training.report RUN_DIR            # writes RUN_DIR/training_curves.png, prints the accuracy table
    python -m training.report RUN_DIR --out curves.png

The log is veRL's ``file`` logger (``trainer.logger`` includes ``file``): one JSON object per line, ``{"step": N,
"data": {metric: value}}``, written by ``verl.utils.tracking.FileLogger`` to ``VERL_FILE_LOGGER_PATH``. The trainer
points that at ``<trainer.default_local_dir>/metrics.jsonl``; a resumed run first moves the previous file aside to
``metrics-<time>.jsonl``, and this module reads every segment in time order (a later record of a step wins).

The figure has four panels, one curve per metric: mean reward (``critic/score/mean``); exact-answer accuracy, on
the training rollouts (``train/exact_acc``) and on the val split per task (veRL's ``val-*/<task>/exact/mean@N``,
measured before training and every ``trainer.test_freq`` steps); mean response length (``response_length/mean``);
and the KL loss to the reference policy (``actor/kl_loss``).

Example:
    >>> records = {0: {"val-aux/chain_sum/exact/mean@1": 0.2}, 1: {"critic/score/mean": 0.5, "train/exact_acc": 0.25},
    ...            2: {"critic/score/mean": 0.7, "val-aux/chain_sum/exact/mean@1": 0.5}}
    >>> print(accuracy_table(records))
    exact-answer accuracy on the val split (greedy)
      task         step 0   step 2   change
      chain_sum     20.0%    50.0%   +30.0 points
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from training.progress import val_exact, val_samples
from utils.hub.card import decoding_label

__all__ = ["CURVES_FILE", "METRICS_FILE", "PANELS", "ReportError", "accuracy_table", "card_metrics", "curves_for_step",
           "find_metric_logs", "plot_curves", "read_metrics", "write_report"]

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "training_curves.png"

# (panel title, y label, [(metric key, legend label)]); the val accuracy curves are added per task.
PANELS: tuple[tuple[str, str, tuple[tuple[str, str], ...]], ...] = (
    ("reward", "mean reward", (("critic/score/mean", "train reward"),)),
    ("exact-answer accuracy", "fraction exact", (("train/exact_acc", "train (rollouts)"),)),
    ("response length", "tokens", (("response_length/mean", "mean response length"),)),
    ("KL to the reference policy", "KL loss", (("actor/kl_loss", "actor/kl_loss"),)),
)


class ReportError(ValueError):
    """No metric log where one was expected, or one that cannot be read."""


def find_metric_logs(run_dir: str | Path) -> list[Path]:
    """The metric log segments of a run, oldest first.

    Args:
        run_dir: A ``metrics.jsonl`` file, the folder holding it (``trainer.default_local_dir``), or a folder whose
            ``checkpoints/`` subfolder holds it (the demo's run folder).

    Raises:
        ReportError: nothing found, with where it looked and how to get a log.
    """
    path = Path(run_dir)
    if path.is_file():
        return [path]
    for folder in (path, path / "checkpoints"):
        current = folder / METRICS_FILE
        if current.is_file():
            older = sorted(folder.glob("metrics-*.jsonl"), key=lambda p: p.stat().st_mtime)
            return [*older, current]
    raise ReportError(
        f"{path}: no {METRICS_FILE} here or in {path / 'checkpoints'}; it is written by veRL's file logger when "
        "trainer.logger includes 'file' (the CPU demo's default). Pass the run's trainer.default_local_dir."
    )


def read_metrics(paths: list[Path]) -> dict[int, dict[str, float]]:
    """``{step: {metric: value}}`` from veRL file-logger JSONL segments (records of one step are merged).

    Raises:
        ReportError: a line that is not a veRL file-logger record (names the file and line).
    """
    steps: dict[int, dict[str, float]] = {}
    for path in paths:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                step, data = int(record["step"]), record["data"]
            except (ValueError, KeyError, TypeError) as e:
                raise ReportError(f"{path}:{n}: not a veRL file-logger record ({type(e).__name__}: {e})") from e
            row = steps.setdefault(step, {})
            for key, value in data.items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    row[key] = float(value)
    return dict(sorted(steps.items()))


def _series(records: Mapping[int, Mapping[str, float]], key: str) -> tuple[list[int], list[float]]:
    points = [(step, row[key]) for step, row in records.items() if key in row]
    return [s for s, _ in points], [v for _, v in points]


def _val_tasks(records: Mapping[int, Mapping[str, float]]) -> list[str]:
    return sorted({task for row in records.values() for task in val_exact(row)})


def _val_samples(records: Mapping[int, Mapping[str, float]]) -> int:
    """Answers per val question in this run (veRL's ``mean@N``); 1 when none was logged."""
    return max((val_samples(row) or 1 for row in records.values()), default=1)


def plot_curves(records: Mapping[int, Mapping[str, float]], title: str = ""):
    """A matplotlib figure with one panel per :data:`PANELS` entry and one line per metric present.

    Returns:
        The ``matplotlib.figure.Figure`` (tests inspect its axes and lines; :func:`write_report` saves it).
    """
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5), constrained_layout=True)
    for ax, (panel, ylabel, curves) in zip(axes.flat, PANELS, strict=True):
        for key, label in curves:
            xs, ys = _series(records, key)
            if xs:
                ax.plot(xs, ys, marker="." if len(xs) < 40 else None, label=label)
        if panel == "exact-answer accuracy":
            decoding = decoding_label(_val_samples(records))
            for task in _val_tasks(records):
                points = [(s, val_exact(row)[task]) for s, row in records.items() if task in val_exact(row)]
                ax.plot([s for s, _ in points], [v for _, v in points], marker="o", label=f"val {task} ({decoding})")
            ax.set_ylim(-0.02, 1.02)
        ax.set_title(panel)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
    if title:
        fig.suptitle(title)
    return fig


def accuracy_table(records: Mapping[int, Mapping[str, float]]) -> str:
    """The val exact-accuracy per task at the first and last validation (and up to 3 in between), as text.

    Returns:
        Lines ready to print; a one-line note when the run never validated.
    """
    val_steps = [s for s, row in records.items() if val_exact(row)]
    if not val_steps:
        return ("exact-answer accuracy on the val split: not measured (set trainer.val_before_train=true and "
                "trainer.test_freq > 0)")
    shown = val_steps if len(val_steps) <= 5 else [val_steps[0], *val_steps[1:-1][:: max(1, len(val_steps) // 4)][:3],
                                                    val_steps[-1]]
    tasks = _val_tasks(records)
    width = max(10, *(len(t) for t in tasks))
    lines = [f"exact-answer accuracy on the val split ({decoding_label(_val_samples(records))})",
             "  " + "task".ljust(width) + "".join(f"{'step ' + str(s):>9}" for s in shown) + "   change"]
    for task in tasks:
        values = [val_exact(records[s]).get(task) for s in shown]
        cells = "".join(f"{v * 100:8.1f}%" if v is not None else f"{'-':>9}" for v in values)
        first, last = values[0], values[-1]
        change = f"{(last - first) * 100:+.1f} points" if first is not None and last is not None else ""
        lines.append("  " + task.ljust(width) + cells + "   " + change)
    return "\n".join(lines)


def write_report(run_dir: str | Path, out: str | Path | None = None, *, title: str = "") -> tuple[Path, str]:
    """Read a run's metric log, save the curves PNG, and return ``(png_path, accuracy table text)``.

    Args:
        run_dir: See :func:`find_metric_logs`.
        out: PNG path (default: :data:`CURVES_FILE` beside the metric log).
        title: Figure title (default: the log's folder).

    Raises:
        ReportError: no log, an unreadable log, or a log without a single metric record.
    """
    logs = find_metric_logs(run_dir)
    records = read_metrics(logs)
    if not records:
        raise ReportError(f"{logs[-1]}: no metric records yet (the run logs one per step)")
    png = Path(out) if out is not None else logs[-1].parent / CURVES_FILE
    _save(plot_curves(records, title or str(logs[-1].parent)), png)
    return png, accuracy_table(records)


def _save(fig: Any, png: Path) -> None:
    import matplotlib.pyplot as plt

    png.parent.mkdir(parents=True, exist_ok=True)
    tmp = png.with_name(f".{png.name}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=100)
        tmp.replace(png)  # a reader (the Hub upload) never sees a half-written PNG
    finally:
        plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m training.report RUN_DIR [--out PNG]``; exit 0, or 1 with one ``error:`` line."""
    p = argparse.ArgumentParser(prog="python -m training.report", description=__doc__.splitlines()[0])
    p.add_argument("run_dir", help="trainer.default_local_dir of the run (or its metrics.jsonl)")
    p.add_argument("--out", default=None, help=f"PNG path (default: {CURVES_FILE} beside the metric log)")
    args = p.parse_args(argv)
    try:
        png, table = write_report(args.run_dir, args.out)
    except (ReportError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(table)
    print(f"curves: {png.resolve()}")
    return 0


def card_metrics(step: int, metrics: Mapping[str, Any], records: Mapping[int, Mapping[str, float]]) -> dict[str, float]:
    """The metrics a model card shows for ``step``: val exact accuracy per task now and at the first validation.

    Returns:
        ``{"val/<task>/exact_acc": v, "val/<task>/exact_acc_at_start": v0, "val_start_step": s0,
        "val_samples": n, "train/reward": r, "train/exact_acc": a}`` - only what was measured (``n``: answers per
        val question, the ``N`` of veRL's ``mean@N``; 1 is greedy).

    Example:
        >>> card_metrics(30, {"val-aux/chain_sum/exact/mean@1": 0.5, "critic/score/mean": 0.9},
        ...              {0: {"val-aux/chain_sum/exact/mean@1": 0.25}})  # doctest: +NORMALIZE_WHITESPACE
        {'train/reward': 0.9, 'val/chain_sum/exact_acc': 0.5, 'val/chain_sum/exact_acc_at_start': 0.25, 'val_start_step': 0.0,
         'val_samples': 1.0}
    """
    out: dict[str, float] = {}
    for key, name in (("critic/score/mean", "train/reward"), ("train/exact_acc", "train/exact_acc")):
        try:
            out[name] = float(metrics[key])
        except (KeyError, TypeError, ValueError):
            pass
    now = val_exact(metrics)
    if not now:  # validation did not run at this step: the newest measurement before it
        earlier = [s for s, row in records.items() if s <= step and val_exact(row)]
        now = val_exact(records[earlier[-1]]) if earlier else {}
    for task, value in sorted(now.items()):
        out[f"val/{task}/exact_acc"] = value
    first = next((s for s, row in records.items() if val_exact(row)), None)
    if first is not None and first < step:
        for task, value in sorted(val_exact(records[first]).items()):
            out[f"val/{task}/exact_acc_at_start"] = value
        out["val_start_step"] = float(first)
    if now:
        out["val_samples"] = float(_val_samples(records))
    return out


def curves_for_step(metric_log: str | Path, step: int, metrics: Mapping[str, Any], out: str | Path
                    ) -> dict[str, float]:
    """Draw the curves up to ``step`` into ``out`` (for an upload of that step) and return its card metrics.

    The log holds the steps before ``step``; ``metrics`` (the step's own dict, not yet logged) completes it.
    """
    records = read_metrics(find_metric_logs(metric_log)) if Path(metric_log).is_file() else {}
    row = records.setdefault(int(step), {})
    row.update({k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)})
    _save(plot_curves(records, f"step {step}"), Path(out))
    return card_metrics(int(step), metrics, records)


if __name__ == "__main__":
    sys.exit(main())
