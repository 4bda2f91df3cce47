"""`hf_upload.resume` before Ray, without Ray: bootstrap once, required with nothing, incompatible snapshots, weights
only, a resumable snapshot resharded for the run's world size with the tracking run id restored. Against the local
Hub server through the real client; the snapshot comes from a real FSDP2 checkpoint (tests/fsdp_writer.py)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from huggingface_hub import HfApi
from omegaconf import OmegaConf

from training.hub_resume import IncompatibleResumeError, ResumeError, resume_from_hub
from utils.hf_uploader import HuggingFaceUploader

pytestmark = pytest.mark.slow  # ~25 s: uploads and one resharding run


def _cfg(tmp_path, repo, namespace, model_path, *, resume="auto", world=1, optimizer="AdamW", strategy="checkpoint"):
    return OmegaConf.create({
        "hf_upload": {"enabled": True, "repo_id": repo, "namespace": namespace, "resume": resume, "private": True,
                      "strategy": strategy},
        "trainer": {"n_gpus_per_node": world, "nnodes": 1, "default_local_dir": str(tmp_path / "ckpt"),
                    "project_name": "p", "experiment_name": "e", "logger": ["console"], "resume_mode": "auto"},
        "actor_rollout_ref": {"model": {"path": str(model_path)},
                              "actor": {"optim": {"optimizer": optimizer, "optimizer_impl": "torch.optim"}}},
    })


@pytest.fixture
def alice(hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", hub.token_for("alice"))
    for var in ("WANDB_RUN_ID", "WANDB_RESUME", "TENSORBOARD_DIR"):
        monkeypatch.delenv(var, raising=False)
    return hub.token_for("alice")


@pytest.fixture(scope="module")
def step_dir(fsdp_checkpoints, tmp_path_factory):
    """The real W=2 checkpoint as global_step_2, with the lineage file the trainer writes."""
    ck = fsdp_checkpoints["w2_untied"]
    dst = tmp_path_factory.mktemp("run") / "global_step_2"
    shutil.copytree(ck.step_dir, dst)
    (dst / "lineage.json").write_text(json.dumps({
        "tracking": {"wandb_run_id": "run-abc", "tensorboard_dir": "tb/p/e"},
        "compat": {"optimizer": {"optimizer": "AdamW", "optimizer_impl": "torch.optim"}}}))
    return dst


def test_empty_namespace_is_bootstrapped_once(alice, tmp_path, tiny_model_dir):
    repo = "alice/bootstrap-once"
    out = resume_from_hub(_cfg(tmp_path, repo, "exp", tiny_model_dir))
    assert out.action == "bootstrap" and out.tag == "exp-step-0"
    api = HuggingFaceUploader(repo, token=alice).client.api
    commits = [c.commit_id for c in api.list_repo_commits(repo)]
    files = set(api.list_repo_files(repo, revision="exp-step-0"))
    assert {"exp/config.json", "exp/model.safetensors", "exp/tokenizer.json"} <= files

    cfg = _cfg(tmp_path, repo, "exp", tiny_model_dir)
    again = resume_from_hub(cfg)  # the second start: step-0 exists, nothing is pushed, the Hub copy is the model
    assert again.action == "weights_only" and again.step == 0
    assert [c.commit_id for c in api.list_repo_commits(repo)] == commits
    assert [t.name for t in api.list_repo_refs(repo).tags] == ["exp-step-0"]
    assert (open(f"{cfg.actor_rollout_ref.model.path}/model.safetensors", "rb").read() ==
            open(f"{tiny_model_dir}/model.safetensors", "rb").read())


def test_required_with_nothing_on_the_hub_fails_clearly(alice, tmp_path, tiny_model_dir):
    with pytest.raises(ResumeError, match="required.*no snapshot"):
        resume_from_hub(_cfg(tmp_path, "alice/required-empty", "exp", tiny_model_dir, resume="required"))
    with pytest.raises(ResumeError, match="hf_upload.resume='sometimes'"):
        resume_from_hub(_cfg(tmp_path, "alice/required-empty", "exp", tiny_model_dir, resume="sometimes"))


def test_strategies_without_resume_state_neither_bootstrap_nor_pull(alice, tmp_path, tiny_model_dir):
    # end/every_save upload weights only: a rerun must not silently restart from them (and collide with the tags)
    repo = "alice/resume-end"
    out = resume_from_hub(_cfg(tmp_path, repo, "", tiny_model_dir, strategy="end"))
    assert out.action == "none"
    assert not HfApi(token=alice).repo_exists(repo)  # no bootstrap: not even the repo was created
    with pytest.raises(ResumeError, match="required needs hf_upload.strategy=checkpoint"):
        resume_from_hub(_cfg(tmp_path, repo, "", tiny_model_dir, strategy="every_save", resume="required"))


def test_resumable_snapshot_is_resharded_for_this_world_size(alice, tmp_path, step_dir, fsdp_checkpoints):
    repo = "alice/resume-train"
    HuggingFaceUploader(repo, token=alice, strategy="checkpoint", namespace="exp", private=True,
                        progress=False).upload_from_checkpoint_dir(step_dir)
    hf_dir = fsdp_checkpoints["w2_untied"].actor_dir / "huggingface"
    cfg = _cfg(tmp_path, repo, "exp", hf_dir, world=2, resume="required")
    out = resume_from_hub(cfg)
    assert out.action == "resumed" and out.step == 2 and out.run_id == "run-abc"
    import os

    assert os.environ["WANDB_RUN_ID"] == "run-abc" and os.environ["WANDB_RESUME"] == "allow"
    assert os.environ["TENSORBOARD_DIR"] == "tb/p/e"
    assert cfg.trainer.resume_mode == "resume_path" and cfg.trainer.resume_from_path == out.step_dir
    actor = tmp_path / "ckpt" / "global_step_2" / "actor"
    assert sorted(p.name for p in actor.glob("*_rank_*.pt")) == sorted(
        f"{k}_world_size_2_rank_{r}.pt" for k in ("model", "optim", "extra_state") for r in range(2))
    for r in (0, 1):  # the saved world size: each rank gets its own RNG stream and scheduler back (validated and
        name = f"extra_state_world_size_2_rank_{r}.pt"  # re-serialized: the same state, not the same bytes)
        got, saved = (torch.load(d / name, weights_only=False) for d in (actor, step_dir / "actor"))
        assert got["lr_scheduler"] == saved["lr_scheduler"] and torch.equal(got["rng"]["cpu"], saved["rng"]["cpu"])

    # the same start again: the local checkpoint is as new as the Hub's, veRL resumes it, nothing is rewritten
    again = resume_from_hub(_cfg(tmp_path, repo, "exp", hf_dir, world=2))
    assert again.action == "local" and again.step == 2

    # another optimizer, another architecture: clear errors naming the difference
    with pytest.raises(IncompatibleResumeError, match="actor.optim.optimizer: Hub 'AdamW' vs this run 'SGD'"):
        resume_from_hub(_cfg(tmp_path / "b", repo, "exp", hf_dir, optimizer="SGD"))


def test_incompatible_architecture_and_weights_only(alice, tmp_path, step_dir, tiny_model_dir):
    repo = "alice/resume-weights-only"
    # strategy=end: weights only at step 2
    HuggingFaceUploader(repo, token=alice, namespace="exp", private=True,
                        progress=False).upload_from_checkpoint_dir(step_dir)
    with pytest.raises(IncompatibleResumeError, match="model.hidden_size: Hub 35 vs this run"):
        resume_from_hub(_cfg(tmp_path, repo, "exp", tiny_model_dir))
    hf_dir = step_dir / "actor" / "huggingface"
    with pytest.raises(ResumeError, match="weights only"):
        resume_from_hub(_cfg(tmp_path, repo, "exp", hf_dir, resume="required"))
    cfg = _cfg(tmp_path, repo, "exp", hf_dir)
    out = resume_from_hub(cfg)
    assert out.action == "weights_only" and out.step == 2
    assert cfg.actor_rollout_ref.model.path != str(hf_dir) and cfg.trainer.resume_mode == "auto"


def test_local_checkpoint_seeds_only_a_new_namespace(alice, tmp_path, step_dir, tiny_model_dir):
    repo = "alice/bootstrap-local"
    hf_dir = step_dir / "actor" / "huggingface"
    cfg = _cfg(tmp_path, repo, "exp", hf_dir)
    cfg.hf_upload.bootstrap_from = str(step_dir)  # a veRL global_step_N: consolidated, pushed as step-0
    assert resume_from_hub(cfg).action == "bootstrap"
    api = HuggingFaceUploader(repo, token=alice).client.api
    files = set(api.list_repo_files(repo, revision="exp-step-0"))
    assert "exp/pytorch_model.bin" in files and "exp/optimizer.pt" not in files
    head = api.list_repo_refs(repo).branches[0].target_commit

    cfg = _cfg(tmp_path, repo, "exp", hf_dir)
    cfg.hf_upload.bootstrap_from = str(tiny_model_dir)  # the namespace exists: the Hub wins, nothing is pushed
    assert resume_from_hub(cfg).action == "weights_only"
    assert api.list_repo_refs(repo).branches[0].target_commit == head
