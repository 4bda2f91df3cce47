"""Real training runs (`train_grpo.py` -> Ray -> veRL -> 2 FSDP2 ranks on gloo) shared by the end-to-end tests.

Each Ray run costs about a minute of fixed start-up on 2 cores, so the suite starts each kind of run ONCE per test
session and every test that needs it reads its outputs (session fixtures in `tests/conftest.py`):

- `trained_run` -> :func:`train_every_save`: W=2, 2 GRPO steps, curriculum on, a save at every step, the Hub upload
  with `strategy=every_save` (token given on the command line as a marker that must appear nowhere), and
  `max_actor_ckpt_to_keep=1`. It is at once "the plain training run" (checkpoint layout, curriculum state, weight
  sync) and "the every_save upload run" (tags, files, rotation, redaction): the upload runs off the training path,
  so the training it checks is the same.
- `resumed_run` -> :func:`resume_with_hub_down`: the same command continued to step 3 in the same directory (veRL
  resumes from step 2) with `strategy=end`, and the Hub taken down right after preflight: the run still exits 0
  with `upload_pending.json`, then `python utils/hf_uploader.py resume` finishes the upload. veRL also saves its
  own gathered `huggingface/` model at step 3: the independent ground truth for consolidating a checkpoint the
  real trainer wrote.
- `no_sync_run` -> :func:`train_without_weight_sync` (only with VERL_GRPO_E2E_FULL=1): the negative control for
  "weight sync is real" (the HF rollout's sync switched off: the rollout then lags the actor).

New end-to-end tests should take one of these fixtures (a finished W=2 checkpoint with two steps, its Hub repo,
the veRL-gathered reference model at step 3) before adding a run of their own; a new run belongs here, as a session fixture,
only when no existing run can honestly prove the same thing. Use :func:`run_train` for it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

# 4 prompts x 4 samples = 8 sequences per rank at W=2: micro batches must divide that. Each run sets its save_freq.
SMALL = [
    "data.train_batch_size=4",
    "actor_rollout_ref.actor.ppo_mini_batch_size=4",
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8",
    "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=8",
    "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=8",
    "reasoning_gym.val_size=4",
    "data.val_batch_size=4",
]
CURRICULUM = [
    "curriculum.enabled=true",
    "curriculum.last_k=1000",  # the hook runs every step; no level moves in 3 steps
    "+curriculum.curricula.chain_sum.attribute_levels.num_terms=0",
]

# A valid token of alice's on the test server that no code path may print or write anywhere.
# Built at run time so that secret scanners reading the repository do not take it for a leaked token.
MARKER = "hf_" + "MarkerTokenE2e7Q9zX4vB2nM8kL5pR3tY6w"
ALICE = "hf_alice_local_token"
EVERY_REPO = "alice/e2e-every"
END_REPO = "alice/e2e-end"


@dataclass
class TrainRun:
    """One finished `train_grpo.py` run: its console output and veRL's per-step console metrics."""

    name: str
    log: str
    steps: dict[int, dict[str, float]]
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


def parse_step_metrics(log: str) -> dict[int, dict[str, float]]:
    """veRL's console lines `step:N - key:value - ...` -> {N: {key: value}} (non-numeric values skipped)."""
    steps: dict[int, dict[str, float]] = {}
    for m in re.finditer(r"\bstep:(\d+) - (.*)", log):
        metrics = {}
        for kv in m.group(2).split(" - "):
            key, _, value = kv.partition(":")
            try:
                metrics[key.strip()] = float(value)
            except ValueError:
                pass
        steps[int(m.group(1))] = metrics
    return steps


def train_env(tmp: Path, *, drop_token: bool = False, **extra: str) -> dict[str, str]:
    """The environment of a run: this repo first on PYTHONPATH (driver and Ray workers), a per-run model cache."""
    env = {k: v for k, v in os.environ.items() if not (drop_token and k == "HF_TOKEN")}
    return {**env, "PYTHONPATH": str(REPO), "VERL_GRPO_HUB_CACHE": str(tmp / "model-cache"), **extra}


def run_train(tmp: Path, name: str, overrides: list[str], *, env: dict[str, str] | None = None,
              on_line: Callable[[str], None] | None = None, timeout: float = 480) -> TrainRun:
    """Run train_grpo.py in `tmp` (hydra dir `tmp/NAME/hydra`, output saved as `tmp/NAME.log`); assert exit 0.

    `on_line(line)` sees each output line as it comes (e.g. to take the Hub down at the right moment).
    `tmp/NAME.times` holds the same lines prefixed with the seconds since start (where a run spends its time).
    """
    cmd = [sys.executable, str(REPO / "train_grpo.py"), f"hydra.run.dir={tmp / name / 'hydra'}", *overrides]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=tmp, env=env if env is not None else train_env(tmp), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    times: list[str] = []
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        for line in proc.stdout:
            lines.append(line)
            times.append(f"{time.monotonic() - started:7.1f} {line}")
            if on_line is not None:
                on_line(line)
        proc.wait()
    finally:
        timer.cancel()
    log = "".join(lines)
    (tmp / f"{name}.log").write_text(log)
    (tmp / f"{name}.times").write_text("".join(times))
    assert proc.returncode == 0, log[-6000:]
    return TrainRun(name, log, parse_step_metrics(log), time.monotonic() - started)


def train_every_save(tmp: Path, hub_server) -> TrainRun:
    """The shared W=2 run (see the module docstring); checkpoints in `tmp/ckpt`, uploads to EVERY_REPO."""
    hub_server.users[MARKER] = "alice"  # the marker is a real, valid token of alice on the test server
    hub_server.come_up()
    hub_server.clear_faults()
    ckpt = tmp / "ckpt"
    run = run_train(tmp, "every_save", [
        *SMALL, *CURRICULUM, "trainer.total_training_steps=2", "trainer.save_freq=1",
        "+trainer.max_actor_ckpt_to_keep=1", f"trainer.default_local_dir={ckpt}",
        "hf_upload.enabled=true", f"hf_upload.repo_id={EVERY_REPO}", "hf_upload.strategy=every_save",
        f"hf_upload.token={MARKER}",
    ], env=train_env(tmp, drop_token=True))  # only the token the run is given
    run.extra.update(ckpt=ckpt, listing=sorted(p.name for p in ckpt.iterdir()))
    return run


def resume_with_hub_down(tmp: Path, hub_server, ckpt: Path) -> TrainRun:
    """Continue the shared run in `ckpt` to step 3 with `strategy=end`; the Hub goes down once preflight passed.

    Then `python utils/hf_uploader.py resume CKPT` (Hub up again) finishes the pending upload; its
    CompletedProcess is `run.extra["resume"]`.
    """
    def down_after_preflight(line: str) -> None:
        if "preflight ok" in line:
            hub_server.go_down("refuse")

    hub_server.come_up()
    hub_server.clear_faults()
    env = train_env(tmp, HF_TOKEN=ALICE)
    try:
        run = run_train(tmp, "resumed", [
            *SMALL, *CURRICULUM, "trainer.total_training_steps=3", "trainer.save_freq=1",
            f"trainer.default_local_dir={ckpt}", "hf_upload.enabled=true", f"hf_upload.repo_id={END_REPO}",
            "hf_upload.strategy=end",
            "hf_upload.resume=never",  # explicit: the Hub goes down right after preflight, before resume would look
            # veRL also gathers the full state dict itself and saves it with save_pretrained (fp32, as trained) at
            # step 3: the independent ground truth for consolidating a checkpoint the real trainer wrote
            "actor_rollout_ref.actor.checkpoint.save_contents=[model,optimizer,extra,hf_model]",
            "actor_rollout_ref.actor.checkpoint.load_contents=[model,optimizer,extra]",
        ], env=env, on_line=down_after_preflight)
        run.extra["ckpt"] = ckpt
        run.extra["pending_after_run"] = sorted(p.relative_to(ckpt).as_posix()
                                                for p in ckpt.rglob("upload_pending.json"))
        run.extra["was_down"] = not hub_server.is_up
    finally:
        hub_server.come_up()
    resume = subprocess.run([sys.executable, str(REPO / "utils" / "hf_uploader.py"), "resume", str(ckpt)], cwd=tmp,
                            env=env, capture_output=True, text=True, timeout=300)
    (tmp / "resume.log").write_text(resume.stdout + resume.stderr)
    run.extra["resume"] = resume
    return run


def train_without_weight_sync(tmp: Path) -> TrainRun:
    """2 steps at W=2 with the HF rollout's weight sync off."""
    ckpt = tmp / "ckpt_no_sync"
    run = run_train(tmp, "no_sync", [
        *SMALL, "trainer.save_freq=2", f"trainer.default_local_dir={ckpt}", "trainer.total_training_steps=2",
        "actor_rollout_ref.rollout.engine_kwargs.hf.sync_weights=false",
    ])
    run.extra["ckpt"] = ckpt
    return run
