"""The trainer's Hub preflight: a bad token, a namespace without write access and a missing repo id stop
`train_grpo.py` before Ray starts any worker, with a message that says what to fix; a token given on the command line
never reaches Hydra's saved `.hydra/*.yaml`. Plus `setup_hub_upload` in process (public repo banner, wiring).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from training.hub_upload import CALLBACK_CLASS, FORCED_SAVE_FREQ, setup_hub_upload
from utils.hub.errors import InvalidUploadConfigError

REPO = Path(__file__).resolve().parents[1]
MARKER = "hf_" + "PreflightMarker3k9Xq2Lw7Zr5Tn8Yb4Vd"  # unknown to the server: a "bad token" (split for scanners)
CASES = {
    "bad_token": (["hf_upload.repo_id=alice/pf", f"hf_upload.token={MARKER}"], None,
                  "rejected the token (401)"),
    "no_namespace_access": (["hf_upload.repo_id=acme/pf"], "hf_bob_local_token",
                            "cannot write to namespace 'acme'"),
    "missing_repo_id": ([], "hf_alice_local_token", "No repo_id given. Set hf_upload.repo_id"),
}


@pytest.fixture(scope="module")
def failed_runs(hub_server, tmp_path_factory):
    """The three bad setups, run concurrently as real `train_grpo.py` processes."""
    tmp = tmp_path_factory.mktemp("preflight")
    procs = {}
    for name, (overrides, token, _) in CASES.items():
        env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
        env.update(PYTHONPATH=str(REPO), VERL_GRPO_HUB_CACHE=str(tmp / "model-cache"), **({"HF_TOKEN": token}
                                                                                         if token else {}))
        cmd = [sys.executable, str(REPO / "train_grpo.py"), f"hydra.run.dir={tmp / name}", "hf_upload.enabled=true",
               *overrides]
        procs[name] = (time.monotonic(), subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.PIPE,
                                                          stderr=subprocess.STDOUT, text=True))
    out = {}
    for name, (started, proc) in procs.items():
        log, _ = proc.communicate(timeout=300)
        out[name] = (proc.returncode, log, time.monotonic() - started)
        print(f"{name}: exit {proc.returncode} after {out[name][2]:.1f}s")
    return tmp, out


@pytest.mark.slow  # train_grpo.py subprocesses (~25 s, shared by the two tests)
@pytest.mark.parametrize("case", list(CASES))
def test_preflight_failure_stops_the_run_before_ray(failed_runs, case):
    _, out = failed_runs
    code, log, _ = out[case]
    assert code == 2, log[-3000:]
    error_line = next(line for line in log.splitlines() if line.startswith("hf_upload error: "))
    assert CASES[case][2] in error_line
    # nothing of veRL/Ray ran: veRL prints `ray init kwargs` right before ray.init, Ray announces its instance
    assert "ray init kwargs" not in log and "Started a local Ray instance" not in log and "TaskRunner" not in log


@pytest.mark.slow
def test_a_token_on_the_command_line_is_never_saved_or_printed(failed_runs):
    tmp, out = failed_runs
    assert MARKER not in out["bad_token"][1]
    saved = tmp / "bad_token" / ".hydra"
    assert {p.name for p in saved.iterdir()} >= {"config.yaml", "hydra.yaml", "overrides.yaml"}
    for path in saved.iterdir():
        assert MARKER not in path.read_text(), path
    assert "hf_upload.token=<redacted: moved to HF_TOKEN>" in (saved / "overrides.yaml").read_text()


def _cfg(**hf) -> OmegaConf:
    return OmegaConf.create({
        "hf_upload": {"enabled": True, "repo_id": None, "private": True, "strategy": "end", "token": None, **hf},
        "trainer": {"save_freq": -1, "checkpoint_callback_class": None, "experiment_name": "t"},
        "reasoning_gym": {"datasets": {"chain_sum": {"weight": 1}}},
        "actor_rollout_ref": {"model": {"path": "tiny://qwen2"}},
    })


def test_public_repo_is_announced_loudly_and_the_run_is_wired(hub, request, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", hub.token_for("alice"))
    cfg = _cfg(repo_id=f"alice/{request.node.name[:60]}", private=False)
    report = setup_hub_upload(cfg)
    assert report is not None and report.private is False and report.created
    err = capsys.readouterr().err
    assert "is PUBLIC" in err and "hf_upload.private=true" in err
    assert cfg.trainer.checkpoint_callback_class == CALLBACK_CLASS
    assert cfg.trainer.save_freq == FORCED_SAVE_FREQ  # save_freq=-1 would leave nothing to upload


def test_disabled_block_touches_nothing(hub):
    cfg = _cfg(enabled=False)
    assert setup_hub_upload(cfg) is None
    assert cfg.trainer.checkpoint_callback_class is None and cfg.trainer.save_freq == -1
    assert hub.requests.total() == 0


def test_unknown_key_and_a_foreign_callback_are_refused(hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", hub.token_for("alice"))
    with pytest.raises(InvalidUploadConfigError, match="hf_upload.privte is not a known key"):
        setup_hub_upload(_cfg(repo_id="alice/x", privte=True))
    # the optional key the README documents as +hf_upload.bootstrap_from=PATH is known
    assert setup_hub_upload(_cfg(repo_id="alice/pf-bootstrap", bootstrap_from="/some/model")).repo_id == \
        "alice/pf-bootstrap"
    cfg = _cfg(repo_id="alice/pf-foreign")
    cfg.trainer.checkpoint_callback_class = "my.Callback"
    with pytest.raises(InvalidUploadConfigError, match="checkpoint_callback_class='my.Callback'"):
        setup_hub_upload(cfg)


def test_max_attempts_reaches_the_uploader_and_zero_is_refused_before_any_hub_call(hub, monkeypatch):
    from training.hub_upload import uploader_from_config

    monkeypatch.setenv("HF_TOKEN", hub.token_for("alice"))
    assert uploader_from_config(_cfg(repo_id="alice/x", max_attempts=2)).client.max_attempts == 2
    assert uploader_from_config(_cfg(repo_id="alice/x")).client.max_attempts == 4  # the schema's default
    hub.reset_counters()
    with pytest.raises(InvalidUploadConfigError, match=r"hf_upload.max_attempts=0: give at least 1"):
        setup_hub_upload(_cfg(repo_id="alice/x", max_attempts=0))
    assert hub.requests.total() == 0


@pytest.mark.parametrize("given, path, named", [
    (None, "tiny://qwen2-warm", "tiny://qwen2-warm"),  # the demo: named as written, before it becomes a cache folder
    ("Qwen/Qwen2.5-3B-Instruct", "/data/models/qwen-3b", "Qwen/Qwen2.5-3B-Instruct"),  # a local copy, named by hand
], ids=["as-written", "by-hand"])
def test_the_card_names_the_base_model_as_written_not_the_folder_it_resolves_to(hub, request, monkeypatch, given,
                                                                                path, named):
    from training.hub_upload import uploader_settings
    from utils.hub.card import CardInfo, render_model_card

    monkeypatch.setenv("HF_TOKEN", hub.token_for("alice"))
    cfg = _cfg(repo_id=f"alice/base-{request.node.callspec.id}", base_model=given)
    cfg.actor_rollout_ref.model.path = path
    setup_hub_upload(cfg)
    assert cfg.hf_upload.base_model == named
    cfg.actor_rollout_ref.model.path = "/root/.cache/verl-grpo-hub/tiny-qwen2-warm-0123"  # as prepare_config resolves
    card = render_model_card(CardInfo(repo_id="alice/m", step=1, revision="step-1",
                                      **uploader_settings(cfg)["card_info"]))
    [row] = [line for line in card.splitlines() if line.startswith("| base model |")]
    assert named in row and "/root/" not in card
