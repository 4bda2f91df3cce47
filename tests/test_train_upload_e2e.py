"""The trainer's Hub upload end to end: `train_grpo.py` (Ray, veRL, 2 FSDP2 ranks on gloo) -> the upload callback ->
a Ray actor on rank 0's node -> the real huggingface_hub client -> the local Hub server of conftest.

Two real runs, shared with the training end-to-end tests (`tests/shared_runs.py`, session fixtures):
- `trained_run`: 2 steps, save_freq=1, max_actor_ckpt_to_keep=1, `strategy=checkpoint` (an upload at every save,
  with the optimizer and trainer state), the token given on the command line as a marker (`hf_upload.token=...`)
  that must appear nowhere;
- `resumed_run`: that run resumed from the Hub at W=3 and trained to step 3; the server goes down as soon as the
  snapshot is pulled, so step 3's upload fails: the run exits 0 with `upload_pending.json`, then
  `python utils/hf_uploader.py resume` finishes it.
Ground truth: an independent local consolidation of the same checkpoint (sha256 of every file, logits).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests.shared_runs import ALICE, MARKER, RUN_REPO

pytestmark = pytest.mark.slow


def _sha256_tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and ".cache" not in p.parts}


def _consolidate(step_dir: Path, out: Path) -> Path:
    from utils.load_fsdp_to_hf import consolidate_checkpoint

    # fp32: what strategy=checkpoint uploads (the weights as trained, for an exact resume)
    consolidate_checkpoint(step_dir / "actor", out, dtype="fp32", progress=False)
    return out


def _download(repo_id: str, revision: str, dest: Path) -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, revision=revision, token=ALICE, local_dir=dest))


@pytest.fixture(scope="module")
def runs(trained_run, e2e_dir):
    return {"tmp": e2e_dir, "every": trained_run.extra["ckpt"], "log_every": trained_run.log,
            "tags": trained_run.extra["tags"]}


@pytest.fixture(scope="module")
def end_runs(resumed_run):
    return {"end": resumed_run.extra["ckpt"], "log_end": resumed_run.log, "was_down": resumed_run.extra["was_down"],
            "pending_after_run": resumed_run.extra["pending_after_run"], "resume": resumed_run.extra["resume"]}


def test_each_save_is_tagged_after_the_step_0_bootstrap(runs):
    from huggingface_hub import HfApi

    # tags right after the first run: step-0 (the model training started from, pushed before step 1) and each save
    assert runs["tags"] == ["step-0", "step-1", "step-2"]
    api = HfApi(token=ALICE)
    assert api.repo_info(RUN_REPO).private  # the configs default to private repos
    log = runs["log_every"]
    assert "[hf_upload] step 1: uploaded" in log and "[hf_upload] step 2: uploaded" in log
    commits = {c.commit_id: c.title for c in api.list_repo_commits(RUN_REPO)}
    step2 = {t.name: t.target_commit for t in api.list_repo_refs(RUN_REPO).tags}["step-2"]
    assert commits[step2].startswith("Upload step 2 (") and "reward" in commits[step2], commits  # step's metrics


def test_uploaded_files_and_logits_equal_a_local_consolidation(runs, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    local = _consolidate(runs["every"] / "global_step_2", tmp_path / "local")
    hub = _download(RUN_REPO, "step-2", tmp_path / "hub")
    local_sha, hub_sha = _sha256_tree(local), _sha256_tree(hub)
    assert local_sha  # weights, config, tokenizer
    for name, digest in local_sha.items():
        assert hub_sha.get(name) == digest, name
    # plus what a resume needs (strategy=checkpoint), the generated model card, the .gitattributes every new repo
    # starts with, and the tiny model's build record (manifest.json) that step-0 pushed: an upload deletes only the
    # stale files it owns (weights, optimizer, trainer state; utils/hub/push.MANAGED_PATTERNS). Nothing else.
    extra = set(hub_sha) - set(local_sha)
    resume_files = {"optimizer.pt", "trainer_state.json", "manifest.json"}
    assert {"README.md", *resume_files} <= extra
    assert all(n in {"README.md", ".gitattributes", *resume_files} or n.startswith("resume/") for n in extra), extra

    ids = torch.tensor([[1, 5, 9, 42, 7, 3, 11, 2]])
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(local).eval()(ids).logits
        got = AutoModelForCausalLM.from_pretrained(RUN_REPO, revision="step-2", token=ALICE).eval()(ids).logits
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
    saved = runs["tmp"] / "trained" / "hydra"
    assert (saved / ".hydra" / "config.yaml").is_file() and (saved / ".hydra" / "overrides.yaml").is_file()
    for folder in (saved, runs["every"]):
        for path in folder.rglob("*"):
            if path.is_file():
                assert MARKER.encode() not in path.read_bytes(), path
    assert "hf_upload.token=<redacted" in (saved / ".hydra" / "overrides.yaml").read_text()
    api = HfApi(token=ALICE)
    for commit in api.list_repo_commits(RUN_REPO):
        assert MARKER not in f"{commit.title}\n{commit.message}"
    for revision in ("step-0", "step-1", "step-2"):
        card = _download(RUN_REPO, revision, tmp_path / revision) / "README.md"
        assert "step" in card.read_text() and MARKER not in card.read_text()


def test_the_uploaded_cards_name_the_base_model_as_the_run_config_wrote_it(runs):
    """The run loads tiny://qwen2 from a cache folder (prepare_config); its cards name tiny://qwen2, not the folder."""
    from huggingface_hub import hf_hub_download

    for revision in ("step-0", "step-2"):  # the bootstrap upload (hub_resume) and the trainer's hook
        card = Path(hf_hub_download(RUN_REPO, "README.md", revision=revision, token=ALICE)).read_text()
        [row] = [line for line in card.splitlines() if line.startswith("| base model |")]
        assert "`tiny://qwen2`" in row and "randomly initialised" in row, row
        assert "tiny-qwen2-" not in card  # no cache folder (tiny-qwen2-<hash>)


def test_server_down_at_the_end_exits_0_with_a_pending_marker_and_the_command(end_runs):
    assert end_runs["was_down"]
    assert end_runs["pending_after_run"] == ["global_step_3/upload_pending.json"]
    step_dir = end_runs["end"].resolve() / "global_step_3"
    assert f"finish the job with: python utils/hf_uploader.py resume {step_dir}" in end_runs["log_end"]
    assert ALICE not in end_runs["log_end"]


def test_resume_finishes_the_pending_upload_with_identical_files(end_runs, tmp_path):
    assert end_runs["resume"].returncode == 0, end_runs["resume"].stdout + end_runs["resume"].stderr
    assert not list(end_runs["end"].rglob("upload_pending.json"))
    local = _consolidate(end_runs["end"] / "global_step_3", tmp_path / "local")
    hub = _download(RUN_REPO, "step-3", tmp_path / "hub")
    local_sha, hub_sha = _sha256_tree(local), _sha256_tree(hub)
    assert {k: hub_sha.get(k) for k in local_sha} == local_sha
    from huggingface_hub import HfApi

    refs = HfApi(token=ALICE).list_repo_refs(RUN_REPO)
    tags = {t.name: t.target_commit for t in refs.tags}
    assert sorted(tags) == ["step-0", "step-1", "step-2", "step-3"]
    assert {b.name: b.target_commit for b in refs.branches}["main"] == tags["step-3"]
