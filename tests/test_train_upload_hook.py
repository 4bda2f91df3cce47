"""`HubUploadCallback` scheduling without Ray: what is uploaded when, and what rotation may delete.

The Ray actor call (consolidate + push, covered for real in test_train_upload_e2e.py) is replaced by a gated function at
that boundary, so the order of events is deterministic: step 1 is still uploading while steps 2 and 3 are saved.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from training.hub_upload_hook import HubUploadCallback, UploadOutcome
from utils.hub.errors import UploadFailedError


class _Trainer:
    total_training_steps = 3  # no actor_rollout_wg: uploads run "on any node"


def _config(strategy: str, keep: int | None = 1, fail_on_error: bool = False):
    return OmegaConf.create({
        "hf_upload": {"enabled": True, "repo_id": "alice/hook", "strategy": strategy, "fail_on_error": fail_on_error},
        "trainer": {"max_actor_ckpt_to_keep": keep, "experiment_name": "t"},
    })


def _save(root: Path, step: int) -> Path:
    d = root / f"global_step_{step}"
    (d / "actor").mkdir(parents=True)
    (d / "actor" / "model_world_size_2_rank_0.pt").write_bytes(b"x")
    return d


def test_every_save_pins_shards_replaces_queued_and_keeps_the_final(tmp_path):
    config = _config("every_save", keep=1)
    cb = HubUploadCallback(config)
    assert config.trainer.max_actor_ckpt_to_keep is None  # veRL's own rotation is off; the callback rotates
    started, gate, calls = threading.Event(), threading.Event(), []

    def upload(checkpoint_dir, step, metrics):
        calls.append((step, metrics))
        if step == 1:
            started.set()
            assert gate.wait(30)
        assert (checkpoint_dir / "actor").is_dir()  # never deleted under a running upload
        return UploadOutcome(step, "uploaded", summary=f"step {step}")

    cb._upload_on_rank0_node = upload
    trainer = _Trainer()
    dirs = {}
    for step in (1, 2, 3):
        dirs[step] = _save(tmp_path, step)
        cb.on_save(trainer, step, str(dirs[step]))
        cb.on_step_metrics(step, {"critic/score/mean": float(step), "timing_s/step": 1.0})
        if step == 1:
            assert started.wait(30)  # step 1 is running before step 2 is saved (else step 2 would replace it)
        # step 1 is uploading, 2 (then 3) queued: rotation (keep=1) must leave their shards alone
        assert all((dirs[s] / "actor").is_dir() for s in dirs)
    gate.set()
    jobs = cb.finish()
    assert [(j.step, j.state) for j in jobs] == [(1, "done"), (2, "replaced"), (3, "done")]
    assert calls == [(1, {"critic/score/mean": 1.0}), (3, {"critic/score/mean": 3.0})]
    assert jobs[-1].final
    # once released, rotation catches up: only the newest step keeps its shards
    assert [s for s in dirs if (dirs[s] / "actor").exists()] == [3]


def test_end_uploads_only_the_last_step_and_leaves_rotation_to_verl(tmp_path):
    config = _config("end", keep=2)
    cb = HubUploadCallback(config)
    assert config.trainer.max_actor_ckpt_to_keep == 2
    calls = []
    cb._upload_on_rank0_node = lambda d, s, m: calls.append(s) or UploadOutcome(s, "uploaded")
    for step in (1, 2, 3):
        cb.on_save(_Trainer(), step, str(_save(tmp_path, step)))
        cb.on_step_metrics(step, {})
    cb.finish()
    assert calls == [3]


def test_failed_upload_prints_the_command_and_fails_the_run_only_with_fail_on_error(tmp_path, capsys):
    for fail_on_error in (False, True):
        root = tmp_path / str(fail_on_error)
        cb = HubUploadCallback(_config("end", fail_on_error=fail_on_error))

        def upload(d, s, m):
            raise UploadFailedError("Upload of step 3 to alice/hook failed: ConnectError",
                                    pending_marker=str(d / "upload_pending.json"))

        cb._upload_on_rank0_node = upload
        step_dir = _save(root, 3)
        cb.on_save(_Trainer(), 3, str(step_dir))
        if fail_on_error:
            with pytest.raises(UploadFailedError, match="fail_on_error"):
                cb.finish()
        else:
            assert [j.state for j in cb.finish()] == ["failed"]
        err = capsys.readouterr().err
        assert f"finish the job with: python utils/hf_uploader.py resume {step_dir.resolve()}" in err


def test_the_actor_outcome_carries_the_reason_and_marker_without_parsing_the_message():
    failed = UploadOutcome(3, "failed", error_class="UploadFailedError", pending_marker="/run/global_step_3/m.json",
                           message="Upload of step 3 to alice/hook failed: ConnectError: refused")
    with pytest.raises(UploadFailedError) as info:
        failed.raise_if_failed()
    assert info.value.reason == "Upload of step 3 to alice/hook failed: ConnectError: refused"
    assert info.value.pending_marker == "/run/global_step_3/m.json"
    ok = UploadOutcome(4, "uploaded", summary="alice/hook step-4")
    assert ok.raise_if_failed() is ok


def test_the_actor_body_returns_typed_outcomes_for_success_and_a_dead_hub(fsdp_checkpoints, hub, tmp_path,
                                                                          monkeypatch):
    """What `_UploadActor.upload` runs, without Ray: a real upload, then one with the Hub down (marker, no token)."""
    import shutil

    from training.upload_actor import upload_outcome

    token = "hf_alice_local_token"
    monkeypatch.setenv("HF_TOKEN", token)
    ckpt = fsdp_checkpoints["w2_untied"]
    run = tmp_path / "run"
    shutil.copytree(ckpt.root, run)
    step_dir = run / f"global_step_{ckpt.step}"
    settings = {"repo_id": "alice/hook-outcome", "private": True, "progress": False, "retry_base_delay": 0.01,
                "max_attempts": 1}
    ok = upload_outcome(settings, step_dir, ckpt.step, {"critic/score/mean": 0.5})
    assert (ok.status, ok.tag, ok.error_class) == ("uploaded", f"step-{ckpt.step}", "") and len(ok.commit) == 40
    hub.go_down()
    try:
        failed = upload_outcome({**settings, "repo_id": "alice/hook-outcome-2"}, step_dir, ckpt.step, None)
    finally:
        hub.come_up()
    assert failed.status == "failed" and failed.error_class == "UploadFailedError"
    assert failed.message.startswith(f"Upload of step {ckpt.step} to alice/hook-outcome-2 failed: ")
    assert "finish it later" not in failed.message and failed.pending_marker == str(step_dir / "upload_pending.json")
    assert "Traceback" in failed.traceback and token not in failed.traceback + failed.message
    with pytest.raises(UploadFailedError):
        failed.raise_if_failed()
