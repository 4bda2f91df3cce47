"""Fault injection: a Hub that accepts connections and never answers (or stalls one LFS transfer), and the trainer's
final wait for its last upload. Nothing may wait forever: each request has connect/read limits, exhausted retries
leave `upload_pending.json`, and the end-of-run wait gives up after `hf_upload.final_wait_timeout` leaving a marker.

Liveness, not speed: each call runs in a thread that must come back (a generous bound, far above the limits used).
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from utils.hf_uploader import HuggingFaceUploader
from utils.hub.errors import HubUnreachableError, UploadFailedError
from utils.hub.pending import read_pending

BOUND_S = 120  # "did not hang": the calls below give up after a few seconds


def _returns(fn):
    box: dict = {}

    def run():
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - inspected by the test
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(BOUND_S)
    assert not t.is_alive(), "the call hung"
    return box


def _folder(root: Path) -> Path:
    d = root / "model"
    d.mkdir(parents=True)
    (d / "config.json").write_text('{"model_type": "llama"}')
    (d / "pytorch_model.bin").write_bytes(b"w" * 20000)
    return d


def _uploader(hub, repo, **kw):
    return HuggingFaceUploader(repo, token=hub.token_for("alice"), private=True, progress=False, model_card=False,
                               retry_base_delay=0.01, max_attempts=2, request_timeout=1, **kw)


def test_preflight_against_a_hub_that_never_answers_fails_with_one_line(hub):
    hub.go_down("hang")
    box = _returns(lambda: _uploader(hub, "alice/hang-preflight").preflight())
    err = box.get("error")
    assert isinstance(err, HubUnreachableError), err
    assert "did not answer within 1 s" in str(err) and "\n" not in str(err)
    assert err.__cause__ is not None  # the cause is kept for the log, not hidden


def test_upload_to_a_hub_that_hangs_leaves_the_marker(hub, tmp_path, fsdp_checkpoints):
    import shutil

    step_dir = tmp_path / "run" / "global_step_4"
    shutil.copytree(fsdp_checkpoints["w2_untied"].step_dir, step_dir)  # a real checkpoint: local checks pass first
    hub.go_down("hang")
    box = _returns(lambda: _uploader(hub, "alice/hang-upload").upload_from_checkpoint_dir(step_dir))
    err = box.get("error")
    assert isinstance(err, UploadFailedError), err
    assert err.pending_marker and read_pending(step_dir).step == 4
    assert f"resume {step_dir}" in str(err)


def test_a_stalled_lfs_transfer_times_out_and_is_retried(hub, tmp_path):
    repo = "alice/hang-lfs"
    up = _uploader(hub, repo)
    up.preflight()
    gate = hub.hold_next("lfs_put")  # accepted, never answered (released at teardown by clear_faults)
    box = _returns(lambda: up.upload_folder(_folder(tmp_path), 1))
    assert "error" not in box, box.get("error")
    assert hub.requests["lfs_put"] >= 2 and hub.completed["commit"] == 1
    assert up.client.refs(repo)[1]["step-1"] == box["result"].commit_sha
    gate.set()


def test_final_wait_for_the_last_upload_has_a_limit_then_leaves_the_marker(tmp_path, capsys):
    from training.hub_upload_hook import HubUploadCallback

    config = OmegaConf.create({
        "hf_upload": {"enabled": True, "repo_id": "alice/final-wait", "strategy": "end", "final_wait_timeout": 1},
        "trainer": {"max_actor_ckpt_to_keep": None, "experiment_name": "t"}})
    cb = HubUploadCallback(config)
    never = threading.Event()
    cb._upload_on_rank0_node = lambda d, s, m: never.wait()  # an upload that never ends

    class _Trainer:
        total_training_steps = 3

    step_dir = tmp_path / "global_step_3"
    (step_dir / "actor").mkdir(parents=True)
    cb.on_save(_Trainer(), 3, str(step_dir))
    box = _returns(cb.finish)
    never.set()
    assert "error" not in box, box.get("error")
    marker = read_pending(step_dir.resolve())
    assert marker is not None and marker.step == 3 and "final_wait_timeout" in marker.error
    err = capsys.readouterr().err
    assert "final_wait_timeout" in err and f"python utils/hf_uploader.py resume {step_dir.resolve()}" in err


@pytest.fixture(autouse=True)
def _default_timeouts():
    """The limits are process-wide: put the defaults back for the tests that run after these."""
    yield
    from utils.hub.timeouts import DEFAULT_CONNECT_TIMEOUT, DEFAULT_READ_TIMEOUT, install_timeouts

    install_timeouts(connect=DEFAULT_CONNECT_TIMEOUT, read=DEFAULT_READ_TIMEOUT)


def test_resume_never_sends_the_token_to_an_endpoint_named_only_by_a_marker(hub, tmp_path, monkeypatch):
    from utils.hf_uploader import resume_pending
    from utils.hub.errors import PendingUploadError
    from utils.hub.pending import PendingUpload, write_pending

    step_dir = tmp_path / "run" / "global_step_5"
    step_dir.mkdir(parents=True)
    write_pending(step_dir, PendingUpload(checkpoint_dir=str(step_dir), repo_id="alice/consent", step=5,
                                         options={"endpoint": "http://127.0.0.1:9"}))  # planted by someone else
    monkeypatch.setenv("HF_TOKEN", hub.token_for("alice"))
    (where, outcome), = resume_pending(tmp_path / "run")
    assert isinstance(outcome, PendingUploadError) and "--endpoint http://127.0.0.1:9" in str(outcome)
    assert hub.requests.total() == 0 and read_pending(step_dir) is not None  # nothing sent anywhere; marker kept
