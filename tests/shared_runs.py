"""Real training runs (`train_grpo.py` -> Ray -> veRL -> FSDP2 ranks on gloo) shared by the end-to-end tests.

Each Ray run costs about a minute of fixed start-up on 2 cores, so the suite starts each kind of run ONCE per test
session and every test that needs it reads its outputs (session fixtures in `tests/conftest.py`):

- `trained_run` -> :func:`train_with_snapshots`: W=2, 2 GRPO steps, curriculum on, a save at every step, and the
  Hub upload with `strategy=checkpoint` and `resume=auto` into an empty repo (so the tiny model is pushed as `step-0`
  before training, then a resume snapshot - model, optimizer.pt, trainer state - at each save), the token given on
  the command line as a marker that must appear nowhere, and `max_actor_ckpt_to_keep=1`. It is at once "the plain
  training run" (checkpoint layout, curriculum state, weight sync), "the upload-every-save run" (tags, files,
  rotation, redaction) and "the run a later one resumes from": the upload runs off the training path, so the
  training it checks is the same.
- `resumed_run` -> :func:`resume_from_the_hub`: the same command in a FRESH directory at world size 3 (uneven
  shards, more ranks than saved), to step 3: it pulls the step-2 snapshot, reshards it, and veRL trains step 3 only.
  The Hub is taken down as soon as the pull is done, so step 3's upload fails: the run still exits 0 with
  `upload_pending.json`, then `python utils/hf_uploader.py resume` finishes the upload. veRL also saves its own
  gathered `huggingface/` model at step 3: the independent ground truth for consolidating a checkpoint the real
  trainer wrote (after a resume, at W=3).
- `no_sync_run` -> :func:`train_without_weight_sync` (only with VERL_GRPO_E2E_FULL=1): the negative control for
  "weight sync is real" (the HF rollout's sync switched off: the rollout then lags the actor).

New end-to-end tests should take one of these fixtures (a finished W=2 checkpoint with two steps, its Hub repo with
resume snapshots, a W=3 run resumed from it, the veRL-gathered reference model at step 3) before adding a run of
their own; a new run belongs here, as a session fixture, only when no existing run can honestly prove the same thing.
Use :func:`run_train` for it.
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

# Every test run is plumbing: the random tiny model (no warm-up build), no validation, veRL's console lines (parsed
# below), and what makes the random model move from the first update (the weight-sync checks need it): dense
# partial credit (exact answers alone are all 0: no advantage, no gradient) and a large step (the demo's warm model
# takes 3e-4 and KL 0.01).
PLUMBING = [
    "actor_rollout_ref.model.path=tiny://qwen2",
    "trainer.val_before_train=false",
    "trainer.test_freq=-1",
    "trainer.logger=[console]",
    "actor_rollout_ref.actor.optim.lr=3e-3",
    "actor_rollout_ref.actor.kl_loss_coef=0.001",
    "reward.custom_reward_function.reward_kwargs.secondary_rewards=[{name:format,scaling_factor:0.2},"
    "{name:partial,scaling_factor:0.5}]",
]
# 4 prompts x 4 samples = 8 sequences per rank at W=2: micro batches must divide that. Each run sets its save_freq.
# (The LoRA and entry-point tests use it; the shared runs use SHARED below.)
SMALL = [
    "data.train_batch_size=4",
    "actor_rollout_ref.actor.ppo_mini_batch_size=4",
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8",
    "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=8",
    "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=8",
    "reasoning_gym.val_size=4",
    "data.val_batch_size=4",
    *PLUMBING,
]
# The shared runs: 6 prompts x 4 samples = 24 sequences, divisible by world sizes 1, 2 and 3 (micro batches of 4).
# No lr warmup: veRL's warmup gives the FIRST update lr 0, and then the step-2 weight-sync check could not tell a
# synced rollout from a stale one (measured: a stale rollout 2.3e-9 off the actor, like a synced one). The lr
# schedule's continuation is read from veRL's saved scheduler state instead.
SHARED = [
    "data.train_batch_size=6",
    "actor_rollout_ref.actor.ppo_mini_batch_size=6",
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4",
    "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4",
    "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=4",
    "reasoning_gym.val_size=4",
    "data.val_batch_size=4",
    "trainer.save_freq=1",
    *PLUMBING,
]
SEQS_PER_STEP = 6 * 4
CURRICULUM = [
    "curriculum.enabled=true",
    "curriculum.last_k=1000",  # the hook runs every step; no level moves in 3 steps
    "+curriculum.curricula.chain_sum.attribute_levels.num_terms=0",
]

# A valid token of alice's on the test server that no code path may print or write anywhere.
# Built at run time so that secret scanners reading the repository do not take it for a leaked token.
MARKER = "hf_" + "MarkerTokenE2e7Q9zX4vB2nM8kL5pR3tY6w"
ALICE = "hf_alice_local_token"
RUN_REPO = "alice/e2e-run"  # the shared runs' repo: resume snapshots at its root, tags step-0 ... step-3
# The hf_upload settings of both shared runs (the resumed run must match the first for `resume=auto`).
HUB = ["hf_upload.enabled=true", f"hf_upload.repo_id={RUN_REPO}", "hf_upload.strategy=checkpoint",
       "hf_upload.resume=auto"]


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
    rc, log = run_streamed(cmd, cwd=tmp, env=env if env is not None else train_env(tmp), on_line=on_line,
                           timeout=timeout, log_path=tmp / f"{name}.log")
    assert rc == 0, log[-6000:]
    return TrainRun(name, log, parse_step_metrics(log), time.monotonic() - started)


def run_streamed(cmd: list[str], *, cwd: Path, env: dict[str, str], log_path: Path,
                 on_line: Callable[[str], None] | None = None, timeout: float = 480) -> tuple[int, str]:
    """Run ``cmd`` (stdout and stderr merged), handing each line to ``on_line`` as it comes; kill it after ``timeout``.

    Returns (exit code, output). The output is saved at ``log_path``, and beside it (suffix ``.times``) the same lines
    prefixed with the seconds since start: where a run spends its time.
    """
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
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
    log_path.write_text(log)
    log_path.with_suffix(".times").write_text("".join(times))
    return proc.returncode, log


def train_with_snapshots(tmp: Path, hub_server) -> TrainRun:
    """The shared W=2 run (see the module docstring); checkpoints in `tmp/ckpt`, uploads to RUN_REPO.

    `run.extra["tags"]`: the repo's tags right after the run.
    """
    from huggingface_hub import HfApi

    hub_server.users[MARKER] = "alice"  # the marker is a real, valid token of alice on the test server
    hub_server.come_up()
    hub_server.clear_faults()
    ckpt = tmp / "ckpt"
    run = run_train(tmp, "trained", [
        *SHARED, *CURRICULUM, *HUB, "trainer.total_training_steps=2", "trainer.n_gpus_per_node=2",
        "+trainer.max_actor_ckpt_to_keep=1", f"trainer.default_local_dir={ckpt}", f"hf_upload.token={MARKER}",
    ], env=train_env(tmp, drop_token=True))  # only the token the run is given
    run.extra.update(ckpt=ckpt, listing=sorted(p.name for p in ckpt.iterdir()),
                     tags=sorted(t.name for t in HfApi(token=ALICE).list_repo_refs(RUN_REPO).tags))
    return run


def resume_from_the_hub(tmp: Path, hub_server, world: int = 3, *, steps: int = 3, finish: bool = True) -> TrainRun:
    """A fresh directory `tmp/wWORLD` at W=`world` resumes RUN_REPO's newest snapshot (step 2 after the first run)
    and trains up to `steps`; the Hub goes down once the snapshot is pulled, so the last upload is left pending.

    With `finish`, `python utils/hf_uploader.py resume tmp/wWORLD` (Hub up again) then finishes the pending upload;
    its CompletedProcess is `run.extra["resume"]`.
    """
    def down_once_pulled(line: str) -> None:
        # training/hub_resume.py logs "Resuming from REPO@TAG ..." after the snapshot is written into veRL's layout
        if "Resuming from" in line and hub_server.is_up:
            hub_server.go_down("refuse")

    hub_server.come_up()
    hub_server.clear_faults()
    env = train_env(tmp, HF_TOKEN=ALICE)
    ckpt = tmp / f"w{world}"
    try:
        run = run_train(tmp, f"resumed_w{world}", [
            *SHARED, *CURRICULUM, *HUB, f"trainer.total_training_steps={steps}", f"trainer.n_gpus_per_node={world}",
            f"trainer.default_local_dir={ckpt}",
            "hf_upload.max_attempts=2",  # step 3's upload meets a Hub that is down: one retry, not three (~10 s)
            # veRL also gathers the full state dict itself and saves it with save_pretrained (fp32, as trained) at
            # step 3: the independent ground truth for consolidating a checkpoint the real trainer wrote
            "actor_rollout_ref.actor.checkpoint.save_contents=[model,optimizer,extra,hf_model]",
            "actor_rollout_ref.actor.checkpoint.load_contents=[model,optimizer,extra]",
        ], env=env, on_line=down_once_pulled)
        run.extra["ckpt"] = ckpt
        run.extra["pending_after_run"] = sorted(p.relative_to(ckpt).as_posix()
                                                for p in ckpt.rglob("upload_pending.json"))
        run.extra["was_down"] = not hub_server.is_up
    finally:
        hub_server.come_up()
    if not finish:
        return run
    resume = subprocess.run([sys.executable, str(REPO / "utils" / "hf_uploader.py"), "resume", str(ckpt)], cwd=tmp,
                            env=env, capture_output=True, text=True, timeout=300)
    (tmp / "resume.log").write_text(resume.stdout + resume.stderr)
    run.extra["resume"] = resume
    return run


def train_without_weight_sync(tmp: Path) -> TrainRun:
    """2 steps at W=2 with the HF rollout's weight sync off (the shared run's batch and lr, no upload)."""
    ckpt = tmp / "ckpt_no_sync"
    run = run_train(tmp, "no_sync", [
        *SHARED, f"trainer.default_local_dir={ckpt}", "trainer.total_training_steps=2", "trainer.n_gpus_per_node=2",
        "actor_rollout_ref.rollout.engine_kwargs.hf.sync_weights=false",
    ])
    run.extra["ckpt"] = ckpt
    return run
