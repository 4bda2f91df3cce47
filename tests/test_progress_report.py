"""The per-step progress line and the run report (curves PNG + before/after table) from veRL's metric log."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from training.progress import ProgressLine, format_progress, format_seconds
from training.report import (
    PANELS,
    ReportError,
    accuracy_table,
    card_metrics,
    find_metric_logs,
    plot_curves,
    read_metrics,
    write_report,
)

ROOT = Path(__file__).resolve().parents[1]
VAL = "val-aux/chain_sum/exact/mean@1"

# What veRL's FileLogger writes: one {"step", "data"} object per line; step 0 = validation before training.
RECORDS = [
    {"step": 0, "data": {VAL: 0.25, "val-core/chain_sum/acc/mean@1": 0.25}},
    *({"step": s, "data": {"critic/score/mean": 0.5 + s / 10, "train/exact_acc": s / 10, "response_length/mean": 9.0,
                           "actor/kl_loss": 0.001 * s, "timing_s/step": 1.0, "training/global_step": s}}
      for s in (1, 2, 3, 4)),
    {"step": 2, "data": {VAL: 0.375}},
    {"step": 4, "data": {VAL: 0.5625}},
]


def write_log(folder: Path, records=RECORDS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


LINE_RE = re.compile(
    r"^step +\d+/\d+ \| reward -?\d+\.\d{3} \| exact \d\.\d\d( \| val exact \d\.\d\d)? \| len \d+\.\d \| "
    r"kl -?\d\.\d{4} \| \d+\.\d s/step \| ETA (\d+s|\d+m\d\ds|\d+h\d\dm)$"
)


def test_progress_line_has_step_reward_accuracy_speed_and_eta():
    metrics = {"critic/score/mean": 0.8423, "train/exact_acc": 0.3125, VAL: 0.28125, "response_length/mean": 9.06,
               "actor/kl_loss": 0.00123, **{f"noise/{i}": i for i in range(100)}}
    line = format_progress(12, 30, metrics, 3.42, 61.56)
    assert line == "step 12/30 | reward 0.842 | exact 0.31 | val exact 0.28 | len 9.1 | kl 0.0012 | 3.4 s/step | ETA 1m02s"
    assert LINE_RE.match(line)
    assert len(line) < 120  # veRL's console line for the same step was ~3,800 characters


def test_progress_line_leaves_out_what_was_not_measured():
    assert format_progress(1, 4, {}, None, None) == "step 1/4"
    assert "val exact" not in format_progress(1, 4, {"critic/score/mean": 0.1}, 1.0, 3.0)


@pytest.mark.parametrize(("seconds", "text"), [(0, "0s"), (59.4, "59s"), (60, "1m00s"), (3599, "59m59s"),
                                               (3600, "1h00m"), (-5, "0s")])
def test_format_seconds(seconds, text):
    assert format_seconds(seconds) == text


def test_progress_tracker_times_steps_by_the_wall_clock_and_counts_down():
    now = [100.0]
    lines = []
    progress = ProgressLine(10, start_step=0, clock=lambda: now[0], emit=lines.append)
    for step in (1, 2, 3, 4):
        now[0] += 2.0
        progress.update(step, {"critic/score/mean": 0.5})
    assert lines[-1] == "step  4/10 | reward 0.500 | 2.0 s/step | ETA 12s"
    resumed = ProgressLine(10, start_step=6, clock=lambda: now[0], emit=lines.append)
    now[0] += 3.0
    assert resumed.update(7, {}).endswith("3.0 s/step | ETA 9s")


def test_read_metrics_merges_records_of_a_step(tmp_path):
    records = read_metrics([write_log(tmp_path)])
    assert list(records) == [0, 1, 2, 3, 4]
    assert records[2][VAL] == 0.375 and records[2]["critic/score/mean"] == pytest.approx(0.7)


def test_resumed_run_segments_are_read_oldest_first_and_later_records_win(tmp_path):
    import os

    old = tmp_path / "metrics-20250101-000000.jsonl"
    old.write_text(json.dumps({"step": 1, "data": {"critic/score/mean": -1.0}}) + "\n")
    os.utime(old, (1, 1))
    write_log(tmp_path)
    logs = find_metric_logs(tmp_path)
    assert logs == [old, tmp_path / "metrics.jsonl"]
    assert read_metrics(logs)[1]["critic/score/mean"] == pytest.approx(0.6)


def test_missing_or_broken_log_is_one_clear_error(tmp_path):
    with pytest.raises(ReportError, match=r"no metrics.jsonl here or in .*checkpoints.*trainer.logger includes 'file'"):
        find_metric_logs(tmp_path)
    bad = tmp_path / "metrics.jsonl"
    bad.write_text('{"step": 1, "data": {}}\nnot json\n')
    with pytest.raises(ReportError, match=r"metrics.jsonl:2: not a veRL file-logger record"):
        read_metrics([bad])


def test_figure_has_one_curve_per_metric(tmp_path):
    fig = plot_curves(read_metrics([write_log(tmp_path)]))
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == [title for title, _, _ in PANELS]
    labels = [[line.get_label() for line in ax.lines] for ax in axes]
    assert labels == [["train reward"], ["train (rollouts)", "val chain_sum (greedy)"], ["mean response length"],
                      ["actor/kl_loss"]]
    val_line = axes[1].lines[1]
    assert list(val_line.get_xdata()) == [0, 2, 4] and list(val_line.get_ydata()) == [0.25, 0.375, 0.5625]
    assert list(axes[0].lines[0].get_ydata()) == pytest.approx([0.6, 0.7, 0.8, 0.9])


def test_report_writes_a_png_that_decodes_and_the_before_after_table(tmp_path):
    import matplotlib.image

    write_log(tmp_path / "checkpoints")
    png, table = write_report(tmp_path)  # the demo's run folder: the log is in checkpoints/
    assert png == tmp_path / "checkpoints" / "training_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(png)
    assert image.shape[0] > 300 and image.shape[1] > 400 and image.std() > 0  # decodes, and is not blank
    assert table.splitlines() == [
        "exact-answer accuracy on the val split (greedy)",
        "  task         step 0   step 2   step 4   change",
        "  chain_sum     25.0%    37.5%    56.2%   +31.2 points",
    ]
    assert not list((tmp_path / "checkpoints").glob(".*tmp"))


def test_table_says_when_validation_never_ran():
    assert "not measured" in accuracy_table({1: {"critic/score/mean": 0.1}})


def test_card_metrics_carry_start_and_current_val_accuracy():
    records = read_metrics_from(RECORDS)
    assert card_metrics(4, {VAL: 0.5625, "critic/score/mean": 0.9}, records) == {
        "train/reward": 0.9, "val/chain_sum/exact_acc": 0.5625, "val/chain_sum/exact_acc_at_start": 0.25,
        "val_start_step": 0.0, "val_samples": 1.0}
    # a step without validation shows the newest measurement before it
    assert card_metrics(3, {}, records)["val/chain_sum/exact_acc"] == 0.375


def test_sampled_validation_is_labelled_as_sampled_not_greedy(tmp_path):
    """`val_kwargs.n=4` (sampling) makes veRL log `mean@4`: table, legend and card must not call it greedy."""
    from utils.hub.card import CardInfo, render_model_card

    sampled = [{"step": r["step"], "data": {k.replace("mean@1", "mean@4"): v for k, v in r["data"].items()}}
               for r in RECORDS]
    records = read_metrics([write_log(tmp_path, sampled)])
    label = "mean of 4 sampled answers per question"
    assert accuracy_table(records).splitlines()[0] == f"exact-answer accuracy on the val split ({label})"
    assert plot_curves(records).axes[1].lines[1].get_label() == f"val chain_sum ({label})"
    metrics = card_metrics(4, {"val-aux/chain_sum/exact/mean@4": 0.5625}, records)
    assert metrics["val_samples"] == 4.0
    card = render_model_card(CardInfo(repo_id="a/m", step=4, revision="step-4", metrics=metrics))
    assert f"Exact-answer accuracy on the validation split ({label}):" in card and "greedy" not in card
    greedy = render_model_card(CardInfo(repo_id="a/m", step=4, revision="step-4",
                                        metrics=card_metrics(4, {VAL: 0.5625}, read_metrics_from(RECORDS))))
    assert "Exact-answer accuracy on the validation split (greedy):" in greedy


def read_metrics_from(records):
    out = {}
    for r in records:
        out.setdefault(r["step"], {}).update(r["data"])
    return dict(sorted(out.items()))


def test_cli_prints_the_table_and_where_the_png_is(tmp_path):
    write_log(tmp_path)
    run = subprocess.run([sys.executable, "-m", "training.report", str(tmp_path)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "+31.2 points" in run.stdout
    assert run.stdout.strip().endswith(f"curves: {tmp_path / 'training_curves.png'}")
    empty = subprocess.run([sys.executable, "-m", "training.report", str(tmp_path / "nope")], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert empty.returncode == 1 and empty.stderr.startswith("error: ") and len(empty.stderr.splitlines()) == 1
