"""Pure pieces of the uploader, no server: validators (tables), model card, pending markers, background queue."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from utils.hf_uploader import HuggingFaceUploader, resolve_repo_id, validate_optimizer_save_mode
from utils.hub.background import BackgroundUploader
from utils.hub.card import CardInfo, headline_metrics, is_generated_card, render_model_card
from utils.hub.errors import (
    InvalidOptimizerSaveModeError,
    InvalidRepoIdError,
    InvalidUploadConfigError,
    MissingRepoIdError,
    StepNotFoundError,
    redact,
)
from utils.hub.pending import PendingUpload, find_pending, read_pending, step_from_path, write_pending
from utils.hub.push import _is_managed, tag_for_step
from utils.hub.uploader import _default_message


@pytest.mark.parametrize(("repo_id", "org", "expected"), [
    ("alice/m", None, "alice/m"),
    ("m", "acme", "acme/m"),
    ("  alice/m-1.b_c ", None, "alice/m-1.b_c"),
])  # fmt: skip
def test_resolve_repo_id_valid(repo_id, org, expected):
    assert resolve_repo_id(repo_id, org) == expected


@pytest.mark.parametrize(("repo_id", "org", "error", "fragment"), [
    (None, None, MissingRepoIdError, "No repo_id given"),
    ("", "acme", MissingRepoIdError, "No repo_id given"),
    ("alice/m", "acme", InvalidRepoIdError, "already has a namespace"),
    ("m", None, InvalidRepoIdError, "needs a namespace"),
    ("alice/m/x", None, InvalidRepoIdError, "not a valid Hub repo id"),
    ("alice/bad name", None, InvalidRepoIdError, "not a valid Hub repo id"),
    ("alice/m--x", None, InvalidRepoIdError, "not a valid Hub repo id"),
])  # fmt: skip
def test_resolve_repo_id_invalid(repo_id, org, error, fragment):
    with pytest.raises(error, match=fragment):
        resolve_repo_id(repo_id, org)


@pytest.mark.parametrize(("mode", "expected"), [(None, None), ("full", "full"), ("none", None)])
def test_optimizer_save_mode_valid(mode, expected):
    assert validate_optimizer_save_mode(mode) == expected


@pytest.mark.parametrize("mode", ["sharded", "FULL", "optimizer", 1])
def test_optimizer_save_mode_invalid_lists_valid_values(mode):
    with pytest.raises(InvalidOptimizerSaveModeError, match=r"valid values: None \(weights only\) or 'full'"):
        validate_optimizer_save_mode(mode)


@pytest.mark.parametrize(("kwargs", "fragment"), [
    ({"weights_format": "gguf"}, "weights_format='gguf' is not supported; valid values: bin, safetensors"),
    ({"strategy": "all_checkpoints"}, "strategy='all_checkpoints' is not supported; valid values: end, every_save"),
])  # fmt: skip
def test_uploader_rejects_bad_settings(kwargs, fragment):
    with pytest.raises(InvalidUploadConfigError, match=fragment):
        HuggingFaceUploader("alice/m", **kwargs)


def test_step_inferred_from_global_step_dir(tmp_path):
    assert step_from_path(tmp_path / "global_step_300" / "actor") == 300
    assert step_from_path(tmp_path / "global_step_7") == 7
    assert step_from_path(tmp_path / "run") is None
    with pytest.raises(StepNotFoundError, match="Pass step=N"):
        HuggingFaceUploader._infer_step(tmp_path / "run", None)
    assert HuggingFaceUploader._infer_step(tmp_path / "run", 5) == 5


def test_tags_and_managed_files():
    assert tag_for_step(100) == "step-100"
    assert tag_for_step(100, "exp-a/") == "exp-a-step-100"
    assert _is_managed("pytorch_model-00001-of-00002.bin", "")
    assert _is_managed("model.safetensors.index.json", "")
    assert not _is_managed("LICENSE", "") and not _is_managed("exp-a/model.safetensors", "")
    assert _is_managed("exp-a/model.safetensors", "exp-a") and not _is_managed("exp-b/model.safetensors", "exp-a")


def test_commit_message_has_step_and_headline_metrics():
    metrics = {"actor/lr": 1e-6, "critic/score/mean": 0.25, "val/reward": 0.5, "val/acc": 0.75, "perf/s": 3.0}
    assert headline_metrics(metrics) == {"val/reward": 0.5, "critic/score/mean": 0.25, "val/acc": 0.75}
    assert _default_message(300, metrics) == "Upload step 300 (val/reward=0.5, critic/score/mean=0.25, val/acc=0.75)"
    assert _default_message(3, None) == "Upload step 3"


def test_model_card_metadata_and_marker():
    from huggingface_hub import ModelCard

    text = render_model_card(CardInfo(
        repo_id="acme/qwen-grpo", step=300, revision="step-300", base_model="Qwen/Qwen2.5-3B-Instruct",
        dtype="bfloat16", world_size=4, weights_format="safetensors", metrics={"val/reward": 0.41},
        datasets={"spell_backward": 0.33, "word_sorting": 0.67}, optimizer=True))  # fmt: skip
    data = ModelCard(text).data.to_dict()  # parsed back by huggingface_hub, not by our code
    assert data["base_model"] == "Qwen/Qwen2.5-3B-Instruct" and data["library_name"] == "transformers"
    assert {"verl", "grpo", "reasoning-gym"} <= set(data["tags"])
    assert data["training_step"] == 300 and data["torch_dtype"] == "bfloat16" and data["world_size"] == 4
    assert data["reasoning_gym_datasets"] == {"spell_backward": 0.33, "word_sorting": 0.67}
    assert data["metrics"] == {"val/reward": 0.41}
    assert 'AutoModelForCausalLM.from_pretrained("acme/qwen-grpo", revision="step-300")' in text
    assert "| transformers |" in text and "| torch |" in text
    assert is_generated_card(text) and is_generated_card(None)
    assert not is_generated_card(text.replace("step 300", "step 300, my notes"))  # edited by a person
    assert not is_generated_card("# My model\nhand written")
    local = render_model_card(CardInfo(repo_id="a/m", step=1, revision="step-1", base_model="/data/models/qwen"))
    assert "base_model" not in ModelCard(local).data.to_dict()  # a local path is not valid Hub metadata
    assert "| base model | /data/models/qwen |" in local


def test_redact_hides_token_and_hf_looking_words():
    assert redact("bad token hf_abc in url", "hf_abc") == "bad token *** in url"
    assert redact("leak hf_" + "ABCDEFGHIJKLMNOPQRSTUVWXYZ012345", None) == "leak ***"


def test_pending_marker_roundtrip_refuses_tokens(tmp_path):
    step_dir = tmp_path / "run" / "global_step_3"
    step_dir.mkdir(parents=True)
    write_pending(step_dir, PendingUpload(str(step_dir), "alice/m", 3, {"private": True}, error="boom"))
    write_pending(step_dir, PendingUpload(str(step_dir), "alice/m", 3, {"private": True}, error="boom again"))
    got = read_pending(step_dir)
    assert (got.repo_id, got.step, got.attempts, got.error) == ("alice/m", 3, 2, "boom again")
    assert json.loads((step_dir / "upload_pending.json").read_text())["options"] == {"private": True}
    assert find_pending(tmp_path / "run") == [step_dir]
    assert [p.name for p in step_dir.iterdir()] == ["upload_pending.json"]  # no temp file left behind
    with pytest.raises(ValueError, match="refusing to write secret"):
        write_pending(step_dir, PendingUpload(str(step_dir), "alice/m", 3, {"token": "hf_x"}))


class _GatedUploads:
    """An upload function that blocks until the test releases it, recording the order of uploaded steps."""

    def __init__(self):
        self.started, self.release, self.done = threading.Event(), threading.Event(), []

    def __call__(self, checkpoint_dir: Path, step: int, metrics):
        self.started.set()
        assert self.release.wait(10)
        if step == 13:
            raise RuntimeError("upload of 13 failed")
        self.done.append(step)
        return f"uploaded {step}"


def test_background_uploader_one_in_flight_newest_replaces_queued_final_never_dropped(tmp_path):
    gate = _GatedUploads()
    bg = BackgroundUploader(gate)
    first = bg.submit(tmp_path / "global_step_1", 1)
    assert gate.started.wait(10)  # step 1 is running
    queued = [bg.submit(tmp_path / f"global_step_{s}", s) for s in (2, 3)]
    assert bg.pinned_dirs() == {tmp_path / "global_step_1", tmp_path / "global_step_3"}
    final = bg.submit(tmp_path / "global_step_4", 4, final=True)
    late = bg.submit(tmp_path / "global_step_5", 5)  # a non-final save after the final one cannot evict it
    assert [j.state for j in queued] == ["replaced", "replaced"] and late.state == "replaced"
    gate.release.set()
    jobs = bg.finish(timeout=10)
    assert gate.done == [1, 4]
    assert first.result == "uploaded 1" and final.state == "done" and final.result == "uploaded 4"
    assert len(jobs) == 5 and not bg.busy


def test_background_uploader_records_failures_and_keeps_going(tmp_path):
    gate = _GatedUploads()
    gate.release.set()
    bg = BackgroundUploader(gate)
    failed = bg.submit(tmp_path / "global_step_13", 13)
    assert bg.wait(10)
    bg.finish(tmp_path / "global_step_14", 14, timeout=10)
    assert failed.state == "failed" and "13 failed" in str(failed.error)
    assert gate.done == [14]


@pytest.mark.parametrize("module", ["utils.hf_uploader", "utils.hub.uploader", "utils.hub.errors", "utils.hub.push", "utils.hub.card",
                                    "utils.hub.pending"])
def test_docstring_examples_run(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


def test_staging_space_is_checked_before_consolidating(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from utils.hf_uploader import check_staging_space
    from utils.hub.errors import StagingSpaceError

    actor = tmp_path / "global_step_1" / "actor"
    actor.mkdir(parents=True)
    for r in range(2):
        (actor / f"model_world_size_2_rank_{r}.pt").write_bytes(b"x" * 1000)
        (actor / f"optim_world_size_2_rank_{r}.pt").write_bytes(b"x" * 3000)
    assert check_staging_space(actor.parent, tmp_path) == 2000
    assert check_staging_space(actor.parent, tmp_path, include_optimizer=True) == 8000
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**4, 10**4 - 5000, 5000))  # a nearly full disk
    with pytest.raises(StagingSpaceError, match=r"needs up to 0.0 GB in .* Free space there, or pass staging_dir"):
        check_staging_space(actor.parent, tmp_path, include_optimizer=True)
