"""Fault injection: a pickle that would run code, planted in every pickled file of a local step folder and of a
resume snapshot on the Hub, never runs - not in `upload`, not in `pull`, not in `hf_upload.resume`, and not in veRL's
own `torch.load(weights_only=False)` of what `pull` writes. Each refusal is one line naming the file and the refused
global, without torch's hint to retry with `weights_only=False`.

The payload is a real one (`os.system("touch MARKER")`): the marker file existing afterwards would prove it ran.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import CommitOperationAdd

from utils.checkpoint.errors import UnsafePickleError
from utils.checkpoint.safe_state import load_trainer_state
from utils.hf_uploader import HuggingFaceUploader
from utils.hub.cli import main as cli_main

pytestmark = pytest.mark.slow  # ~40 s: a handful of small consolidations and uploads, one resharding run


class _Payload:
    """Unpickling this runs ``touch <marker>``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _poison(path: Path, marker: Path) -> None:
    """Replace ``path`` with a torch file whose pickle calls os.system (the shape of each file kept plausible)."""
    name = path.name
    if name.startswith("extra_state"):
        obj = {"lr_scheduler": {"last_epoch": 1}, "rng": _Payload(marker)}
    elif name.startswith("optim"):
        obj = {"state": {}, "param_groups": [{"params": [], "x": _Payload(marker)}]}
    elif name == "data.pt":
        obj = {"_num_yielded": 1, "x": _Payload(marker)}
    else:  # model rank file / pytorch_model.bin
        obj = {"model.embed_tokens.weight": _Payload(marker)}
    torch.save(obj, path)


def _unsafe_globals(path: Path) -> set[str]:
    return set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))


SAFE_NUMPY = {"numpy.ndarray", "numpy.dtype", "numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct"}


@pytest.fixture(scope="module")
def run_dir(fsdp_checkpoints, tmp_path_factory):
    ck = fsdp_checkpoints["w2_untied"]
    root = tmp_path_factory.mktemp("run")
    shutil.copytree(ck.step_dir, root / "global_step_2")
    return ck, root


def _uploader(hub, repo, **kw):
    return HuggingFaceUploader(repo, token=hub.token_for("alice"), strategy="checkpoint", private=True,
                               progress=False, retry_base_delay=0.01, max_attempts=2, **kw)


@pytest.mark.parametrize("rel", ["actor/extra_state_world_size_2_rank_1.pt", "data.pt",
                                 "actor/model_world_size_2_rank_0.pt", "actor/optim_world_size_2_rank_1.pt"])
def test_poisoned_local_step_file_is_refused_at_upload(hub, run_dir, tmp_path, rel):
    _, root = run_dir
    step = tmp_path / "run" / "global_step_2"
    shutil.copytree(root / "global_step_2", step)
    marker = tmp_path / "PWNED"
    _poison(step / rel, marker)
    staging = tmp_path / "staging"
    staging.mkdir()
    repo = f"alice/poison-local-{rel.split('/')[-1].split('_')[0].replace('.', '-')}"
    with pytest.raises(UnsafePickleError) as err:
        _uploader(hub, repo, staging_dir=staging).upload_from_checkpoint_dir(step)
    msg = str(err.value)
    assert str(step / rel) in msg and "posix.system" in msg and "refused" in msg, msg
    assert "weights_only` set to `False" not in msg and "\n" not in msg
    assert not marker.exists(), "the payload ran"
    assert list(staging.iterdir()) == [], "staging folder left behind"
    assert not (step / "upload_pending.json").exists()  # not a Hub failure: nothing to resume


@pytest.fixture(scope="module")
def clean_snapshot(hub_server, run_dir):
    """A genuine resume snapshot (namespace exp) of step 2 on the Hub."""
    hub_server.come_up()
    hub_server.clear_faults()
    _, root = run_dir
    repo = "alice/poison-hub"
    up = _uploader(hub_server, repo, namespace="exp")
    up.upload_from_checkpoint_dir(root / "global_step_2")
    return repo, up


@pytest.mark.parametrize("rel", ["resume/extra_state_rank_0.pt", "resume/data.pt", "optimizer.pt",
                                 "pytorch_model.bin"])
def test_poisoned_hub_snapshot_file_never_runs_in_pull(hub, clean_snapshot, tmp_path, monkeypatch, capsys, rel):
    repo, up = clean_snapshot
    marker = tmp_path / "PWNED"
    evil = tmp_path / Path(rel).name
    _poison(evil, marker)
    # The attacker may write to the repo: they replace the file AND fix its sha256 in trainer_state.json, then tag
    # the commit as a newer step, which is what pull picks.
    api = up.client.api
    state = json.loads(Path(api.hf_hub_download(repo, "exp/trainer_state.json", revision="exp-step-2")).read_text())
    state["files"][rel] = {"sha256": hashlib.sha256(evil.read_bytes()).hexdigest(), "size": evil.stat().st_size}
    new_step = {"resume/extra_state_rank_0.pt": 9, "resume/data.pt": 10, "optimizer.pt": 11}.get(rel, 12)
    state["global_step"] = new_step
    branch = f"evil-{new_step}"  # each case starts from the genuine snapshot
    api.create_branch(repo, branch=branch, revision="exp-step-2")
    commit = api.create_commit(repo, [CommitOperationAdd(f"exp/{rel}", str(evil)),
                                      CommitOperationAdd("exp/trainer_state.json", json.dumps(state).encode())],
                               commit_message="innocent", revision=branch)
    tag = f"exp-step-{new_step}"
    api.create_tag(repo, tag=tag, revision=commit.oid)
    monkeypatch.setenv("HF_TOKEN", hub.token_for("alice"))
    out = tmp_path / "pulled"
    code = cli_main(["pull", "--repo-id", repo, "--namespace", "exp", "--revision", tag, "--world-size", "2",
                     "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert "refused" in err and "posix.system" in err and rel.split("/")[-1] in err, err
    assert "weights_only` set to `False" not in err and "ProcessRaisedException" not in err
    assert not marker.exists(), "the payload ran"
    assert not out.exists() or list(out.iterdir()) == [], "pull left files behind"
    api.delete_tag(repo, tag=tag)


def test_hf_upload_resume_refuses_a_poisoned_snapshot(hub, run_dir, tmp_path, monkeypatch):
    """`hf_upload.resume=auto` (training/hub_resume.py) pulls through the same checks: the run stops with one line."""
    from omegaconf import OmegaConf

    from training.hub_resume import resume_from_hub

    ck, root = run_dir
    repo = "alice/poison-resume"
    up = _uploader(hub, repo, namespace="exp")
    up.upload_from_checkpoint_dir(root / "global_step_2")
    marker = tmp_path / "PWNED"
    evil = tmp_path / "data.pt"
    _poison(evil, marker)
    api = up.client.api
    state = json.loads(Path(api.hf_hub_download(repo, "exp/trainer_state.json", revision="exp-step-2")).read_text())
    state["files"]["resume/data.pt"] = {"sha256": hashlib.sha256(evil.read_bytes()).hexdigest(),
                                        "size": evil.stat().st_size}
    state["global_step"] = 5
    commit = api.create_commit(repo, [CommitOperationAdd("exp/resume/data.pt", str(evil)),
                                      CommitOperationAdd("exp/trainer_state.json", json.dumps(state).encode())],
                               commit_message="innocent")
    api.create_tag(repo, tag="exp-step-5", revision=commit.oid)
    monkeypatch.setenv("HF_TOKEN", hub.token_for("alice"))
    for var in ("WANDB_RUN_ID", "WANDB_RESUME", "TENSORBOARD_DIR"):
        monkeypatch.delenv(var, raising=False)
    cfg = OmegaConf.create({
        "hf_upload": {"enabled": True, "repo_id": repo, "namespace": "exp", "resume": "auto", "private": True,
                      "strategy": "checkpoint"},
        "trainer": {"n_gpus_per_node": 2, "nnodes": 1, "default_local_dir": str(tmp_path / "ckpt"),
                    "project_name": "p", "experiment_name": "e", "logger": ["console"], "resume_mode": "auto"},
        "actor_rollout_ref": {"model": {"path": str(ck.actor_dir / "huggingface")},
                              "actor": {"optim": {"optimizer": "AdamW", "optimizer_impl": "torch.optim"}}}})
    with pytest.raises(UnsafePickleError, match="posix.system"):
        resume_from_hub(cfg)
    assert not marker.exists(), "the payload ran"
    assert not any((tmp_path / "ckpt").glob("global_step_*"))


def test_what_pull_writes_for_verl_holds_only_allow_listed_types(hub, clean_snapshot, tmp_path, monkeypatch):
    """veRL loads every file pull writes with weights_only=False: each must hold torch's safe types (+ numpy's
    array reconstruction for RNG state) only, and load with veRL's own call."""
    repo, _ = clean_snapshot
    monkeypatch.setenv("HF_TOKEN", hub.token_for("alice"))
    out = tmp_path / "pulled"
    assert cli_main(["pull", "--repo-id", repo, "--namespace", "exp", "--revision", "exp-step-2", "--world-size",
                     "2", "--out", str(out)]) == 0
    pickles = sorted((out / "global_step_2").rglob("*.pt"))
    assert {p.name for p in pickles} >= {"data.pt", "extra_state_world_size_2_rank_0.pt",
                                         "model_world_size_2_rank_1.pt", "optim_world_size_2_rank_0.pt"}
    for p in pickles:
        foreign = _unsafe_globals(p) - SAFE_NUMPY
        assert not foreign or all(g.startswith("torch.") for g in foreign), (p, foreign)
        torch.load(p, weights_only=False)  # what veRL's checkpoint manager and trainer do
    load_trainer_state(out / "global_step_2" / "actor" / "extra_state_world_size_2_rank_0.pt")


def test_verify_understands_a_resume_snapshot_in_a_namespace(hub, clean_snapshot, run_dir, monkeypatch, capsys):
    """`verify --namespace exp --against STEP` on a strategy=checkpoint upload: resume files are expected, compared
    with the local step's re-serialized state, and the model in the subfolder loads."""
    repo, _ = clean_snapshot
    _, root = run_dir
    monkeypatch.setenv("HF_TOKEN", hub.token_for("alice"))
    code = cli_main(["verify", "--repo-id", repo, "--namespace", "exp", "--revision", "step-2", "--against",
                     str(root / "global_step_2")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "loadable: True" in out and "OK" in out and "PROBLEM" not in out
