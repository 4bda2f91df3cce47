"""The uploader end to end: real FSDP2 shards -> consolidation -> the real huggingface_hub client -> the local Hub
server, checked against bytes on disk (sha256), logits, and the server's own request counters.

The reference for every comparison is an independent local consolidation of the same checkpoint by the engine (itself
tested against the gathered ground truth in test_consolidate.py); the Hub side is read back through the client.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from utils.hf_uploader import HuggingFaceUploader, resume_pending, upload_checkpoint_to_hf
from utils.hub.card import CARD_MARKER
from utils.hub.errors import (
    InvalidTokenError,
    InvalidUploadConfigError,
    MissingRepoIdError,
    MissingTokenError,
    NamespaceAccessError,
    ReadOnlyTokenError,
    UploadFailedError,
)
from utils.load_fsdp_to_hf import consolidate_checkpoint

ALICE = "hf_alice_local_token"
FAST = dict(retry_base_delay=0.01, progress=False)  # tests do not wait for real backoff delays


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _hub_files(repo_id: str, revision: str, tmp: Path, token: str = ALICE) -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, revision=revision, token=token, local_dir=tmp))


@pytest.fixture(scope="module")
def ckpt(fsdp_checkpoints):
    """A real world-size-2 FSDP2 checkpoint in veRL's layout (`global_step_2/actor/...`)."""
    return fsdp_checkpoints["w2_untied"]


@pytest.fixture(scope="module")
def reference(ckpt, tmp_path_factory) -> Path:
    """The same checkpoint consolidated locally (bin, auto dtype): what the Hub must hold byte for byte."""
    out = tmp_path_factory.mktemp("reference") / "model"
    consolidate_checkpoint(ckpt.actor_dir, out, progress=False)
    return out


@pytest.fixture
def run_copy(ckpt, tmp_path) -> Path:
    """A private copy of the run directory (markers and locks are written into step directories)."""
    dst = tmp_path / "run"
    shutil.copytree(ckpt.root, dst)
    return dst


def _logits(model_dir_or_repo, **kw) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir_or_repo, **kw)
    with torch.no_grad():
        return model(input_ids=torch.tensor([[2, 7, 11, 42, 5]])).logits


def test_round_trip_sha256_logits_tags_private(hub, ckpt, reference, tmp_path):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    res = upload_checkpoint_to_hf(ckpt.step_dir, repo_id="alice/round-trip", private=True, token=ALICE,
                                  metrics={"val/reward": 0.625}, **FAST)
    assert (res.repo_id, res.step, res.tag, res.on_main, res.skipped) == ("alice/round-trip", 2, "step-2", True, False)
    assert res.url.endswith("/alice/round-trip/tree/step-2") and len(res.commit_sha) == 40

    api = HfApi(token=ALICE)
    refs = api.list_repo_refs("alice/round-trip")
    assert {t.name: t.target_commit for t in refs.tags} == {"step-2": res.commit_sha}
    assert {b.name: b.target_commit for b in refs.branches}["main"] == res.commit_sha
    assert api.list_repo_commits("alice/round-trip")[0].title == "Upload step 2 (val/reward=0.625)"

    hub_dir = _hub_files("alice/round-trip", "step-2", tmp_path / "hub")
    ref_files = sorted(p.relative_to(reference).as_posix() for p in reference.rglob("*") if p.is_file())
    assert ref_files and set(ref_files) <= {p.relative_to(hub_dir).as_posix() for p in hub_dir.rglob("*")
                                            if p.is_file() and ".cache" not in p.parts}
    for name in ref_files:
        assert _sha256(hub_dir / name) == _sha256(reference / name), name

    card = (hub_dir / "README.md").read_text()
    assert CARD_MARKER in card and "training_step: 2" in card and "world_size: 2" in card
    assert 'revision="step-2"' in card and "val/reward: 0.625" in card

    expected = _logits(reference)
    torch.testing.assert_close(_logits("alice/round-trip", revision="step-2", token=ALICE), expected, rtol=0, atol=0)
    torch.testing.assert_close(_logits("alice/round-trip", token=ALICE), expected, rtol=0, atol=0)  # main

    with pytest.raises(RepositoryNotFoundError):  # private: invisible to anonymous reads
        HfApi(token=False).model_info("alice/round-trip")


def test_reupload_of_an_unchanged_step_sends_nothing(hub, run_copy):
    up = HuggingFaceUploader("alice/idempotent", private=True, token=ALICE, **FAST)
    first = up.upload_from_checkpoint_dir(run_copy / "global_step_2")
    hub.reset_counters()
    again = up.upload_from_checkpoint_dir(run_copy / "global_step_2" / "actor")  # actor dir works too
    assert again.skipped and again.bytes == 0 and again.files == [] and again.commit_sha == first.commit_sha
    assert sum(hub.completed[k] for k in ("preupload", "lfs_batch", "lfs_put", "commit", "tag", "create_repo")) == 0


def test_optimizer_uploaded_when_asked_and_stale_weights_replaced(hub, run_copy, tmp_path):
    from huggingface_hub import HfApi

    up = HuggingFaceUploader("alice/formats", private=True, token=ALICE, **FAST)
    up.upload_from_checkpoint_dir(run_copy / "global_step_2")
    shutil.copytree(run_copy / "global_step_2", run_copy / "global_step_3")
    up2 = HuggingFaceUploader("alice/formats", private=True, optimizer_save_mode="full",
                              weights_format="safetensors", token=ALICE, **FAST)
    res = up2.upload_from_checkpoint_dir(run_copy / "global_step_3")
    files = set(HfApi(token=ALICE).list_repo_files("alice/formats"))
    assert "optimizer.pt" in files and "model.safetensors" in files
    assert "pytorch_model.bin" not in files  # the old format's weights do not linger next to the new ones
    assert "pytorch_model.bin" in HfApi(token=ALICE).list_repo_files("alice/formats", revision="step-2")
    state = torch.load(_hub_files("alice/formats", "step-3", tmp_path / "h") / "optimizer.pt", weights_only=True)
    assert set(state) == {"state", "param_groups"} and "model.embed_tokens.weight" in state["state"]
    assert "optimizer.pt" in res.files


def test_hand_written_readme_is_never_replaced(hub, run_copy):
    from huggingface_hub import HfApi

    api = HfApi(token=ALICE)
    api.create_repo("alice/own-readme", private=True)
    api.upload_file(path_or_fileobj=b"# My model\nWritten by hand.\n", path_in_repo="README.md",
                    repo_id="alice/own-readme")
    HuggingFaceUploader("alice/own-readme", private=True, token=ALICE, **FAST).upload_from_checkpoint_dir(
        run_copy / "global_step_2")
    from huggingface_hub import hf_hub_download

    readme = Path(hf_hub_download("alice/own-readme", "README.md", revision="step-2", token=ALICE)).read_text()
    assert readme == "# My model\nWritten by hand.\n"


@pytest.mark.parametrize(("kwargs", "error", "fragment"), [
    (dict(repo_id="alice/x", token="hf_not_a_real_token"), InvalidTokenError, "rejected the token"),
    (dict(repo_id="bob/x", token=ALICE), NamespaceAccessError, "User 'alice' cannot write to namespace 'bob'"),
    (dict(repo_id="x", organization="other-org", token=ALICE), NamespaceAccessError, "organizations (acme)"),
    (dict(repo_id=None, token=ALICE), MissingRepoIdError, "Set hf_upload.repo_id"),
    (dict(repo_id="alice/x", token=None), MissingTokenError, "Set HF_TOKEN"),
    (dict(repo_id="carol/x", token="hf_carol_read_only"), ReadOnlyTokenError, "read-only"),
])  # fmt: skip
def test_preflight_failures_are_specific_and_write_nothing(hub, kwargs, error, fragment):
    with pytest.raises(error) as info:
        HuggingFaceUploader(private=True, **kwargs, **FAST).preflight()
    assert fragment in str(info.value)
    assert hub.completed["create_repo"] == 0 and hub.requests["commit"] == 0


def test_preflight_creates_repo_with_visibility_and_announces_public(hub, caplog):
    from huggingface_hub import HfApi

    with caplog.at_level(logging.INFO):
        report = HuggingFaceUploader("m-public", organization="acme", token=ALICE, **FAST).preflight()
    assert (report.repo_id, report.private, report.created, report.user) == ("acme/m-public", False, True, "alice")
    assert not HfApi(token=False).model_info("acme/m-public").private  # anonymous can see it: it is public
    assert any(r.levelno == logging.WARNING and "PUBLIC Hub repo" in r.getMessage() for r in caplog.records)
    assert HuggingFaceUploader("alice/m-private", private=True, token=ALICE, **FAST).preflight().private
    assert HfApi(token=ALICE).model_info("alice/m-private").private
    with pytest.raises(InvalidUploadConfigError, match="already exists and is PUBLIC"):
        HuggingFaceUploader("acme/m-public", private=True, token=ALICE, **FAST).preflight()


def test_burst_of_500s_and_429s_is_retried(hub, run_copy):
    hub.fail_next("preupload", times=1, error=429)
    hub.fail_next("lfs_put", times=2, error=500)
    hub.fail_next("commit", times=2, error=503)
    res = HuggingFaceUploader("alice/flaky", private=True, token=ALICE, **FAST).upload_from_checkpoint_dir(
        run_copy / "global_step_2")
    assert res.tag == "step-2" and hub.completed["commit"] == 1 and hub.requests["commit"] == 3
    assert set(hub.lfs_stored.values()) == {1}  # every LFS object stored exactly once


def test_connection_reset_mid_lfs_put_is_recovered(hub, run_copy):
    hub.fail_next("lfs_put", times=1, error="reset_mid_body")
    res = HuggingFaceUploader("alice/resets", private=True, token=ALICE, **FAST).upload_from_checkpoint_dir(
        run_copy / "global_step_2")
    assert res.tag == "step-2" and hub.requests["lfs_put"] == 2 and hub.completed["commit"] == 1
    assert set(hub.lfs_stored.values()) == {1}


def test_lost_commit_answer_is_not_committed_twice(hub, run_copy):
    from huggingface_hub import HfApi

    hub.fail_next("commit", times=1, error="drop_answer")  # the commit lands, its answer is lost
    hub.fail_next("tag", times=1, error="drop_answer")  # so does the tag's
    res = HuggingFaceUploader("alice/lost-answer", private=True, token=ALICE, **FAST).upload_from_checkpoint_dir(
        run_copy / "global_step_2")
    commits = HfApi(token=ALICE).list_repo_commits("alice/lost-answer")
    assert [c.title for c in commits] == ["Upload step 2", "initial commit"]  # not committed twice
    assert commits[0].commit_id == res.commit_sha and hub.requests["commit"] == 1
    assert set(hub.lfs_stored.values()) == {1}
    tags = HfApi(token=ALICE).list_repo_refs("alice/lost-answer").tags
    assert [(t.name, t.target_commit) for t in tags] == [("step-2", res.commit_sha)]


def test_server_down_leaves_pending_marker_then_resume_completes(hub, run_copy, reference, tmp_path, monkeypatch):
    up = HuggingFaceUploader("alice/outage", private=True, token=ALICE, max_attempts=2, **FAST)
    up.preflight()
    hub.go_down()
    with pytest.raises(UploadFailedError) as info:
        up.upload_from_checkpoint_dir(run_copy / "global_step_2", metrics={"val/reward": 0.5})
    marker = run_copy / "global_step_2" / "upload_pending.json"
    assert info.value.pending_marker == str(marker) and marker.exists()
    assert f"python utils/hf_uploader.py resume {run_copy / 'global_step_2'}" in str(info.value)
    content = json.loads(marker.read_text())
    assert content["repo_id"] == "alice/outage" and content["step"] == 2 and content["options"]["private"] is True
    assert ALICE not in marker.read_text()
    assert not list(run_copy.rglob("hf_upload_step*"))  # staging is cleaned up

    hub.come_up()
    monkeypatch.setenv("HF_TOKEN", ALICE)  # resume reads the token again; the marker never had it
    [(step_dir, result)] = resume_pending(run_copy)
    assert step_dir == run_copy / "global_step_2" and not marker.exists()
    assert result.tag == "step-2" and not result.skipped
    hub_dir = _hub_files("alice/outage", "step-2", tmp_path / "hub")
    for p in reference.rglob("*"):
        if p.is_file():
            assert _sha256(hub_dir / p.relative_to(reference)) == _sha256(p)
    assert resume_pending(run_copy) == []  # nothing left to do


def test_token_never_leaks_into_logs_marker_card_or_commits(hub, run_copy, caplog, capfd, tmp_path):
    from huggingface_hub import HfApi

    secret = "hf_" + "MARKERtokenNEVERleak0123456789abcdef"  # split: not a token to secret scanners
    hub.users[secret] = "dave"
    caplog.set_level(logging.DEBUG)
    up = HuggingFaceUploader("dave/leak-check", private=True, token=secret, max_attempts=2, **FAST)
    assert secret not in repr(up)
    hub.fail_next("any", times=50, error="reset")  # fail every request of the first attempt -> marker
    with pytest.raises(Exception) as info:  # preflight or upload failure, both must be clean
        up.upload_from_checkpoint_dir(run_copy / "global_step_2", commit_message=f"step 2 by {secret}")
    assert secret not in str(info.value)
    hub.clear_faults()
    res = HuggingFaceUploader("dave/leak-check", private=True, token=secret, **FAST).upload_from_checkpoint_dir(
        run_copy / "global_step_2", commit_message=f"step 2 by {secret}")
    assert secret not in repr(res)
    api = HfApi(token=secret)
    texts = [c.title + "\n" + c.message for c in api.list_repo_commits("dave/leak-check")]
    texts.append((_hub_files("dave/leak-check", "step-2", tmp_path / "hub", token=secret) / "README.md").read_text())
    texts += [p.read_text() for p in run_copy.rglob("upload_pending.json")]
    out, err = capfd.readouterr()
    texts += [out, err, caplog.text] + [str(r.args) for r in caplog.records]
    assert any("step 2 by ***" in t for t in texts)  # the commit message was redacted, not dropped
    assert [i for i, t in enumerate(texts) if secret in t] == []


def test_background_uploads_from_the_uploader_never_drop_the_final_one(hub, run_copy):
    from huggingface_hub import HfApi

    shutil.copytree(run_copy / "global_step_2", run_copy / "global_step_3")
    up = HuggingFaceUploader("alice/background", private=True, token=ALICE, **FAST)
    up.preflight()
    bg = up.background()
    first = bg.submit(run_copy / "global_step_2", 2)
    jobs = bg.finish(run_copy / "global_step_3", 3, timeout=120)
    assert jobs[-1].state == "done" and jobs[-1].result.tag == "step-3"
    tags = {t.name for t in HfApi(token=ALICE).list_repo_refs("alice/background").tags}
    # step 2 is either uploaded (it started before step 3 arrived) or replaced by it - never lost silently
    assert tags == {"step-3"} | ({"step-2"} if first.state == "done" else set())
    assert first.state in ("done", "replaced")


def test_two_namespaces_in_one_repo_stay_independent(hub, run_copy, reference):
    """Namespaces: each experiment in its own subfolder with its own `<namespace>-step-N` tags."""
    from huggingface_hub import HfApi, hf_hub_download

    for ns in ("exp-a", "exp-b"):
        HuggingFaceUploader("alice/shared", private=True, namespace=ns, token=ALICE, **FAST).upload_from_checkpoint_dir(
            run_copy / "global_step_2")
    shutil.copytree(run_copy / "global_step_2", run_copy / "global_step_5")
    HuggingFaceUploader("alice/shared", private=True, namespace="exp-a", weights_format="safetensors", token=ALICE,
                        **FAST).upload_from_checkpoint_dir(run_copy / "global_step_5")
    api = HfApi(token=ALICE)
    assert sorted(t.name for t in api.list_repo_refs("alice/shared").tags) == ["exp-a-step-2", "exp-a-step-5",
                                                                               "exp-b-step-2"]
    files = set(api.list_repo_files("alice/shared"))
    assert {"exp-a/model.safetensors", "exp-b/pytorch_model.bin", "exp-a/README.md", "exp-b/README.md"} <= files
    assert "exp-a/pytorch_model.bin" not in files  # replaced within exp-a only
    card = Path(hf_hub_download("alice/shared", "exp-a/README.md", token=ALICE)).read_text()
    assert 'revision="exp-a-step-5", subfolder="exp-a")' in card
    got = hf_hub_download("alice/shared", "exp-b/pytorch_model.bin", revision="exp-a-step-5", token=ALICE)
    assert _sha256(Path(got)) == _sha256(reference / "pytorch_model.bin")


@pytest.mark.parametrize("weights_format", ["safetensors", "bin"])
def test_pipeline_preuploads_each_shard_once_before_the_single_commit(hub, run_copy, reference, tmp_path,
                                                                      monkeypatch, weights_format):
    """Shards -> Hub as one pipeline: every weight shard is sent to LFS storage while the consolidation
    still runs (before the commit), exactly once, never hashed by re-reading it (safetensors: hashed while written);
    one commit, then the tag; the Hub's bytes equal an independent consolidation's."""
    import huggingface_hub.lfs as hf_lfs

    import utils.checkpoint.consolidate as engine
    import utils.checkpoint.writer as writer

    reread: list[str] = []  # files the client hashed by reading them again (UploadInfo.sha256 computed lazily)
    real_sha = hf_lfs.sha_fileobj
    monkeypatch.setattr(hf_lfs, "sha_fileobj", lambda f, *a, **k: reread.append(getattr(f, "name", "?"))
                        or real_sha(f, *a, **k))
    read_back: list[str] = []  # files the engine hashed from the page cache after writing them
    real_file_sha = writer.sha256_of_file
    monkeypatch.setattr(writer, "sha256_of_file", lambda p, *a: read_back.append(Path(p).name) or real_file_sha(p, *a))
    # The engine reports the second shard only once the Hub stored the first one: a pipeline that uploaded after
    # the consolidation (not during it) would stall here and fail, whatever the machine's speed.
    import time

    from utils.hub.pipeline import PreUploader

    reported: list[str] = []
    real_call = PreUploader.__call__

    def gated(self, path, sha256):
        if len(reported) == 1:
            deadline = time.monotonic() + 120
            while not hub.lfs_stored and time.monotonic() < deadline:
                time.sleep(0.05)
            assert hub.lfs_stored, "the first shard was not uploaded while the consolidation was still running"
        reported.append(Path(path).name)
        return real_call(self, path, sha256)

    monkeypatch.setattr(PreUploader, "__call__", gated)
    commits_when_built: list[int] = []
    real_move = engine._move_into_place
    monkeypatch.setattr(engine, "_move_into_place",
                        lambda tmp, out: commits_when_built.append(hub.requests["commit"]) or real_move(tmp, out))

    up = HuggingFaceUploader(f"alice/pipeline-{weights_format}", private=True, token=ALICE,
                             weights_format=weights_format, max_shard_size="20KB", **FAST)
    res = up.upload_from_checkpoint_dir(run_copy / "global_step_2")

    local = consolidate_checkpoint(run_copy / "global_step_2", tmp_path / "local", weights_format=weights_format,
                                   max_shard_size="20KB", progress=False)
    shards = [f for f in local.weight_files if not f.endswith(".json")]
    assert len(shards) >= 2  # several shards: later ones are written while earlier ones upload
    hub_dir = _hub_files(f"alice/pipeline-{weights_format}", "step-2", tmp_path / "hub")
    for name in local.files:
        assert _sha256(hub_dir / name) == _sha256(local.out_dir / name), name
    assert reported[: len(shards)] == shards  # weight shards first, in write order
    assert commits_when_built[0] == 0  # the upload committed nothing while building: commit, tag, card come last
    assert set(hub.lfs_stored.values()) == {1}  # each LFS object stored exactly once
    assert hub.completed["commit"] == 1 and hub.completed["tag"] == 1 and res.tag == "step-2"
    assert reread == []  # the client never re-read a file to hash it
    if weights_format == "safetensors":
        assert not set(read_back) & set(shards)  # hashed while written, not read back
    else:  # torch.save writes .bin itself: hashed from the page cache, overlapping the next shard's assembly
        assert set(shards) <= set(read_back)


def test_pipeline_off_still_uploads_the_same_bytes(hub, run_copy, reference, tmp_path):
    res = HuggingFaceUploader("alice/two-pass", private=True, token=ALICE, pipeline=False,
                              **FAST).upload_from_checkpoint_dir(run_copy / "global_step_2")
    hub_dir = _hub_files("alice/two-pass", "step-2", tmp_path / "hub")
    for p in reference.rglob("*"):
        if p.is_file():
            assert _sha256(hub_dir / p.relative_to(reference)) == _sha256(p)
    assert res.tag == "step-2" and set(hub.lfs_stored.values()) == {1}
