"""Resume snapshots on the local Hub server through the real client: upload with strategy=checkpoint, pull and
reshard (CLI), an interrupted upload and a tag with tampered files are never taken for a resume point, namespaces
stay independent. The checkpoint is a real FSDP2 one (tests/fsdp_writer.py, W=2)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.consolidation_checks import load_ground_truth
from utils.hf_uploader import HuggingFaceUploader
from utils.hub.cli import main as cli_main
from utils.hub.errors import UploadFailedError
from utils.hub.snapshots import IncompleteSnapshotError, find_resume_snapshot, list_snapshots

pytestmark = pytest.mark.slow  # ~30 s: a few uploads and two resharding runs


@pytest.fixture(scope="module")
def run_dir(fsdp_checkpoints, tmp_path_factory):
    """A run directory with global_step_2 (the real W=2 checkpoint) and a copy of it as global_step_4."""
    ck = fsdp_checkpoints["w2_untied"]
    root = tmp_path_factory.mktemp("run")
    shutil.copytree(ck.step_dir, root / "global_step_2")
    shutil.copytree(ck.step_dir, root / "global_step_4")
    (root / "global_step_4" / "lineage.json").write_text(json.dumps({"tracking": {"wandb_run_id": "abc123"}}))
    return ck, root


def _uploader(hub, repo, namespace, **kw):
    return HuggingFaceUploader(repo, token=hub.token_for("alice"), strategy="checkpoint", namespace=namespace,
                               private=True, progress=False, retry_base_delay=0.01, **kw)


def test_checkpoint_upload_then_pull_at_another_world_size(hub, run_dir, tmp_path, monkeypatch):
    ck, root = run_dir
    repo = "alice/resume-pull"
    res = _uploader(hub, repo, "exp-a").upload_from_checkpoint_dir(root / "global_step_2")
    assert res.tag == "exp-a-step-2"
    # another experiment in the same repo: must not be downloaded by exp-a's pull
    _uploader(hub, repo, "exp-b").upload_from_checkpoint_dir(root / "global_step_4")
    sent = set(res.files)
    assert {"exp-a/optimizer.pt", "exp-a/trainer_state.json", "exp-a/resume/extra_state_rank_0.pt",
            "exp-a/resume/extra_state_rank_1.pt", "exp-a/resume/data.pt"} <= sent

    monkeypatch.setenv("HF_TOKEN", hub.token_for("alice"))
    out = tmp_path / "pulled"
    assert cli_main(["pull", "--repo-id", repo, "--namespace", "exp-a", "--world-size", "3", "--out", str(out)]) == 0
    step_dir = out / "global_step_2"
    assert (out / "latest_checkpointed_iteration.txt").read_text() == "2"
    # validated and re-serialized, not copied (utils/checkpoint/safe_state.py): the same state, not the same bytes
    assert torch.load(step_dir / "data.pt", weights_only=True) == torch.load(ck.step_dir / "data.pt", weights_only=True)
    truth = load_ground_truth(ck)
    shards = [torch.load(step_dir / "actor" / f"model_world_size_3_rank_{r}.pt", weights_only=False) for r in range(3)]
    for key, full in truth["model"].items():
        assert torch.equal(torch.cat([s[key].to_local() for s in shards]), full), key
    hub_source = json.loads((step_dir / "hub_source.json").read_text())
    assert hub_source["tag"] == "exp-a-step-2"
    # only exp-a's files came down
    snap = find_resume_snapshot(repo, "exp-a", token=hub.token_for("alice"))
    downloaded = {p.relative_to(snap.folder.parent).as_posix() for p in snap.folder.parent.rglob("*") if p.is_file()}
    assert downloaded and all(p.startswith("exp-a/") for p in downloaded), sorted(downloaded)[:5]

    # a second pull into a directory that already has the step refuses and leaves it alone
    assert cli_main(["pull", "--repo-id", repo, "--namespace", "exp-a", "--world-size", "1", "--out", str(out)]) == 1
    assert not (step_dir / "actor" / "model_world_size_1_rank_0.pt").exists()


def test_interrupted_upload_leaves_no_resume_point(hub, run_dir):
    _, root = run_dir
    repo = "alice/resume-interrupt"
    _uploader(hub, repo, "exp").upload_from_checkpoint_dir(root / "global_step_2")
    # The step-4 upload dies halfway: its LFS files go up, then every commit attempt is cut mid-body.
    hub.fail_next("commit", times=10, error="reset_mid_body")
    with pytest.raises(UploadFailedError):
        _uploader(hub, repo, "exp", max_attempts=2).upload_from_checkpoint_dir(root / "global_step_4")
    hub.clear_faults()
    assert [t for _, t, _ in list_snapshots(_uploader(hub, repo, "exp").client, repo, "exp")] == ["exp-step-2"]
    snap = find_resume_snapshot(repo, "exp", token=hub.token_for("alice"))
    assert snap.step == 2 and snap.resumable


def test_tag_whose_files_do_not_match_trainer_state_is_skipped(hub, run_dir, tmp_path, caplog):
    _, root = run_dir
    repo = "alice/resume-tampered"
    up = _uploader(hub, repo, "exp")
    up.upload_from_checkpoint_dir(root / "global_step_2")
    up.upload_from_checkpoint_dir(root / "global_step_4")
    # Someone overwrites optimizer.pt by hand at main, and tags that commit as the newest step.
    bad = tmp_path / "optimizer.pt"
    bad.write_bytes(b"not an optimizer")
    api = up.client.api
    commit = api.upload_file(path_or_fileobj=str(bad), path_in_repo="exp/optimizer.pt", repo_id=repo)
    api.create_tag(repo, tag="exp-step-6", revision=commit.oid)
    with caplog.at_level("WARNING"):
        snap = find_resume_snapshot(repo, "exp", token=hub.token_for("alice"))
    assert snap.step == 4 and snap.state["tracking"] == {"wandb_run_id": "abc123"}
    assert "exp-step-6 is incomplete" in caplog.text and "optimizer.pt" in caplog.text
    with pytest.raises(IncompleteSnapshotError, match="optimizer.pt"):
        find_resume_snapshot(repo, "exp", revision="step-6", token=hub.token_for("alice"))


def test_two_namespaces_stay_independent(hub, run_dir):
    _, root = run_dir
    repo = "alice/resume-two-ns"
    a, b = _uploader(hub, repo, "exp-a"), _uploader(hub, repo, "exp-b")
    a.upload_from_checkpoint_dir(root / "global_step_4")
    tree_a = a.client.tree(repo, "exp-a-step-4", prefix="exp-a")
    b.upload_from_checkpoint_dir(root / "global_step_2")
    head = a.client.refs(repo)[0]["main"]
    assert {p: f.sha256 or f.blob_id for p, f in a.client.tree(repo, head, prefix="exp-a").items()} == \
        {p: f.sha256 or f.blob_id for p, f in tree_a.items()}
    token = hub.token_for("alice")
    assert find_resume_snapshot(repo, "exp-a", token=token).step == 4
    assert find_resume_snapshot(repo, "exp-b", token=token).step == 2
    assert find_resume_snapshot(repo, "exp-c", token=token) is None
