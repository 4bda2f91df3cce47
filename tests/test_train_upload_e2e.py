"""The trainer's Hub upload end to end: `train_grpo.py` (Ray, veRL, 2 FSDP2 ranks on gloo) -> the upload callback ->
a Ray actor on rank 0's node -> the real huggingface_hub client -> the local Hub server of conftest.

Two real runs, shared by the tests:
- `every_save`: 2 steps, save_freq=1, max_actor_ckpt_to_keep=1, the token given on the command line as a marker
  (`hf_upload.token=...`) that must appear nowhere;
- `end_down`: 1 step, strategy=end; the server goes down as soon as preflight passed, so the final upload fails:
  the run exits 0 with `upload_pending.json`, then `python utils/hf_uploader.py resume` finishes it.
Ground truth: an independent local consolidation of the same checkpoint (sha256 of every file, logits).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.test_train_grpo_e2e import SMALL as E2E_SMALL

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

# A valid token of alice's on the test server that no code path may print or write anywhere.
# Built at run time so that secret scanners reading the repository do not take it for a leaked token.
MARKER = "hf_" + "MarkerTokenE2e7Q9zX4vB2nM8kL5pR3tY6w"
ALICE = "hf_alice_local_token"
# The training e2e's small batch settings; each run here sets its own save_freq.
SMALL = [o for o in E2E_SMALL if not o.startswith("trainer.save_freq=")]


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}  # only the token a run is given
    return {**env, "PYTHONPATH": str(REPO), "VERL_GRPO_HUB_CACHE": str(tmp / "model-cache"), **extra}


def _train(tmp: Path, name: str, overrides: list[str], *, env: dict[str, str], on_line=None) -> str:
    """Run train_grpo.py; return its whole output (also saved as NAME.log). `on_line(line)` sees each line live."""
    cmd = [sys.executable, str(REPO / "train_grpo.py"), f"hydra.run.dir={tmp / name / 'hydra'}", *SMALL, *overrides]
    proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    timer = threading.Timer(480, proc.kill)
    timer.start()
    try:
        for line in proc.stdout:
            lines.append(line)
            if on_line is not None:
                on_line(line)
        proc.wait()
    finally:
        timer.cancel()
    log = "".join(lines)
    (tmp / f"{name}.log").write_text(log)
    assert proc.returncode == 0, log[-6000:]
    return log


def _sha256_tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and ".cache" not in p.parts}


def _consolidate(step_dir: Path, out: Path) -> Path:
    from utils.load_fsdp_to_hf import consolidate_checkpoint

    consolidate_checkpoint(step_dir / "actor", out, progress=False)
    return out


def _download(repo_id: str, revision: str, dest: Path) -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, revision=revision, token=ALICE, local_dir=dest))


@pytest.fixture(scope="module")
def runs(hub_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("upload_e2e")
    hub_server.users[MARKER] = "alice"  # the marker is a real, valid token of alice on the test server
    hub_server.come_up()
    hub_server.clear_faults()

    # 1. every_save, the token on the command line
    every = tmp / "ckpt_every"
    log_every = _train(tmp, "every_save", [
        "trainer.total_training_steps=2", "trainer.save_freq=1", "+trainer.max_actor_ckpt_to_keep=1",
        f"trainer.default_local_dir={every}", "hf_upload.enabled=true", "hf_upload.repo_id=alice/e2e-every",
        "hf_upload.strategy=every_save", f"hf_upload.token={MARKER}",
    ], env=_env(tmp))

    # 2. strategy=end; the Hub goes down once preflight passed, so the upload at the end of training fails
    def down_after_preflight(line: str) -> None:
        if "preflight ok" in line:
            hub_server.go_down("refuse")

    end = tmp / "ckpt_end"
    try:
        started = time.monotonic()
        log_end = _train(tmp, "end_down", [
            "trainer.total_training_steps=1", "trainer.save_freq=-1", f"trainer.default_local_dir={end}",
            "hf_upload.enabled=true", "hf_upload.repo_id=alice/e2e-end", "hf_upload.strategy=end",
            "hf_upload.resume=never",  # explicit: the Hub goes down right after preflight, before resume would look
        ], env=_env(tmp, HF_TOKEN=ALICE), on_line=down_after_preflight)
        end_seconds = time.monotonic() - started
        pending_after_run = sorted(p.relative_to(end).as_posix() for p in end.rglob("upload_pending.json"))
        was_down = not hub_server.is_up
    finally:
        hub_server.come_up()
    resume = subprocess.run([sys.executable, str(REPO / "utils" / "hf_uploader.py"), "resume", str(end)], cwd=tmp,
                            env=_env(tmp, HF_TOKEN=ALICE), capture_output=True, text=True, timeout=300)
    (tmp / "resume.log").write_text(resume.stdout + resume.stderr)
    return {"tmp": tmp, "every": every, "log_every": log_every, "end": end, "log_end": log_end,
            "end_seconds": end_seconds, "pending_after_run": pending_after_run, "was_down": was_down,
            "resume": resume}


def test_every_save_tags_each_save_and_main_holds_the_last(runs):
    from huggingface_hub import HfApi

    api = HfApi(token=ALICE)
    refs = api.list_repo_refs("alice/e2e-every")
    tags = {t.name: t.target_commit for t in refs.tags}
    branches = {b.name: b.target_commit for b in refs.branches}
    assert set(tags) == {"step-1", "step-2"}
    assert branches["main"] == tags["step-2"]
    assert api.repo_info("alice/e2e-every").private  # the configs default to private repos
    log = runs["log_every"]
    assert "[hf_upload] step 1: uploaded" in log and "[hf_upload] step 2: uploaded" in log
    messages = [c.title for c in api.list_repo_commits("alice/e2e-every")]
    assert any(m.startswith("Upload step 2 (") and "reward" in m for m in messages), messages  # step's metrics


def test_every_save_files_and_logits_equal_a_local_consolidation(runs, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    local = _consolidate(runs["every"] / "global_step_2", tmp_path / "local")
    hub = _download("alice/e2e-every", "step-2", tmp_path / "hub")
    local_sha, hub_sha = _sha256_tree(local), _sha256_tree(hub)
    assert local_sha  # weights, config, tokenizer
    for name, digest in local_sha.items():
        assert hub_sha.get(name) == digest, name
    # plus the generated model card and the .gitattributes every new repo starts with, nothing else
    assert set(hub_sha) - set(local_sha) <= {"README.md", ".gitattributes"} and "README.md" in hub_sha

    ids = torch.tensor([[1, 5, 9, 42, 7, 3, 11, 2]])
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(local).eval()(ids).logits
        got = AutoModelForCausalLM.from_pretrained("alice/e2e-every", revision="step-2", token=ALICE).eval()(ids).logits
    assert torch.equal(got, want)


def test_rotation_waits_for_the_upload_then_removes_old_shards(runs):
    # max_actor_ckpt_to_keep=1: step 1's shards go, but only after its upload read them (it succeeded above)
    assert not (runs["every"] / "global_step_1" / "actor").exists()
    assert (runs["every"] / "global_step_2" / "actor" / "model_world_size_2_rank_1.pt").is_file()
    log = runs["log_every"]
    assert log.index("[hf_upload] step 1: uploaded") < log.index("rotation: removing")


def test_marker_token_appears_in_no_log_config_card_or_commit(runs, tmp_path):
    from huggingface_hub import HfApi

    assert MARKER not in runs["log_every"]
    saved = runs["tmp"] / "every_save" / "hydra"
    assert (saved / ".hydra" / "config.yaml").is_file() and (saved / ".hydra" / "overrides.yaml").is_file()
    for folder in (saved, runs["every"]):
        for path in folder.rglob("*"):
            if path.is_file():
                assert MARKER.encode() not in path.read_bytes(), path
    assert "hf_upload.token=<redacted" in (saved / ".hydra" / "overrides.yaml").read_text()
    api = HfApi(token=ALICE)
    for commit in api.list_repo_commits("alice/e2e-every"):
        assert MARKER not in f"{commit.title}\n{commit.message}"
    for revision in ("main", "step-1", "step-2"):
        card = _download("alice/e2e-every", revision, tmp_path / revision) / "README.md"
        assert "step" in card.read_text() and MARKER not in card.read_text()


def test_server_down_at_the_end_exits_0_with_a_pending_marker_and_the_command(runs):
    assert runs["was_down"]
    assert runs["pending_after_run"] == ["global_step_1/upload_pending.json"]
    step_dir = runs["end"].resolve() / "global_step_1"
    assert f"finish the job with: python utils/hf_uploader.py resume {step_dir}" in runs["log_end"]
    assert ALICE not in runs["log_end"]


def test_resume_finishes_the_pending_upload_with_identical_files(runs, tmp_path):
    assert runs["resume"].returncode == 0, runs["resume"].stdout + runs["resume"].stderr
    assert not list(runs["end"].rglob("upload_pending.json"))
    local = _consolidate(runs["end"] / "global_step_1", tmp_path / "local")
    hub = _download("alice/e2e-end", "step-1", tmp_path / "hub")
    local_sha, hub_sha = _sha256_tree(local), _sha256_tree(hub)
    assert {k: hub_sha.get(k) for k in local_sha} == local_sha
    from huggingface_hub import HfApi

    refs = HfApi(token=ALICE).list_repo_refs("alice/e2e-end")
    assert {t.name for t in refs.tags} == {"step-1"}
    assert {b.name: b.target_commit for b in refs.branches}["main"] == refs.tags[0].target_commit
