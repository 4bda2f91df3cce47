"""The CLI (`python utils/hf_uploader.py ...`): backfill, dry run, verify, resume, and its error exits."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.tensor  # noqa: F401 - registers DTensor for weights_only loads

from utils.hf_uploader import main

ROOT = Path(__file__).resolve().parents[1]
ALICE = "hf_alice_local_token"
WRITE_KINDS = ("create_repo", "preupload", "lfs_batch", "lfs_put", "commit", "tag", "branch", "delete_repo")


def _perturb(actor_dir: Path, delta: float) -> None:
    """Shift every floating tensor of every model rank file by ``delta`` in place (same real FSDP2 layout)."""
    for f in sorted(actor_dir.glob("model_world_size_*_rank_*.pt")):
        sd = torch.load(f, weights_only=True)
        for v in sd.values():
            local = v.to_local() if hasattr(v, "to_local") else v
            if local.is_floating_point():
                local.add_(delta)
        torch.save(sd, f)


@pytest.fixture(scope="module")
def three_step_run(fsdp_checkpoints, tmp_path_factory) -> Path:
    """A run directory with global_step_1..3: the real W=2 checkpoint, steps 1 and 3 with shifted weights."""
    src = fsdp_checkpoints["w2_untied"]
    run = tmp_path_factory.mktemp("three") / "run"
    for step, delta in ((1, -0.125), (2, 0.0), (3, 0.25)):
        shutil.copytree(src.step_dir, run / f"global_step_{step}")
        if delta:
            _perturb(run / f"global_step_{step}" / "actor", delta)
    return run


@pytest.fixture
def cli_env(hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", ALICE)
    return hub


def _tags(repo_id: str) -> dict[str, str]:
    from huggingface_hub import HfApi

    return {t.name: t.target_commit for t in HfApi(token=ALICE).list_repo_refs(repo_id).tags}


def _bin_sha(repo_id: str, revision: str) -> str:
    from huggingface_hub import HfApi

    [info] = HfApi(token=ALICE).get_paths_info(repo_id, ["pytorch_model.bin"], revision=revision)
    return info.lfs.sha256


def test_backfill_three_steps_then_nothing(cli_env, three_step_run, capsys):
    from huggingface_hub import HfApi

    hub = cli_env
    assert main(["backfill", str(three_step_run), "--repo-id", "alice/backfill", "--private"]) == 0
    out = capsys.readouterr().out
    assert "backfill: 3 uploaded, 0 skipped, 0 failed" in out
    tags = _tags("alice/backfill")
    assert sorted(tags) == ["step-1", "step-2", "step-3"] and len(set(tags.values())) == 3
    assert HfApi(token=ALICE).list_repo_refs("alice/backfill").branches[0].target_commit == tags["step-3"]
    assert len({_bin_sha("alice/backfill", t) for t in tags}) == 3  # three different models

    hub.reset_counters()
    assert main(["backfill", str(three_step_run), "--repo-id", "alice/backfill", "--private"]) == 0
    assert "backfill: 0 uploaded, 3 skipped, 0 failed" in capsys.readouterr().out
    assert sum(hub.completed[k] for k in WRITE_KINDS) == 0


def test_backfill_of_older_steps_keeps_main_at_the_newest(cli_env, three_step_run, capsys):
    from huggingface_hub import HfApi

    assert main(["backfill", str(three_step_run), "--repo-id", "alice/older", "--private", "--steps", "3"]) == 0
    newest = _tags("alice/older")["step-3"]
    assert main(["backfill", str(three_step_run), "--repo-id", "alice/older", "--private", "--steps", "1,2"]) == 0
    refs = HfApi(token=ALICE).list_repo_refs("alice/older")
    assert [(b.name, b.target_commit) for b in refs.branches] == [("main", newest)]  # temp branches are gone
    assert sorted(t.name for t in refs.tags) == ["step-1", "step-2", "step-3"]
    assert _bin_sha("alice/older", "step-1") != _bin_sha("alice/older", "main")


def test_backfill_failure_of_one_step_does_not_stop_the_rest(cli_env, three_step_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(three_step_run, run)
    (run / "global_step_2" / "actor" / "model_world_size_2_rank_1.pt").unlink()
    assert main(["backfill", str(run), "--repo-id", "alice/partial", "--private"]) == 1
    out = capsys.readouterr().out
    assert "backfill: 2 uploaded, 0 skipped, 1 failed" in out
    assert "model_world_size_2_rank_1.pt" in out  # the failed row says why
    assert sorted(_tags("alice/partial")) == ["step-1", "step-3"]


def test_dry_run_prints_the_plan_and_writes_nothing(cli_env, three_step_run, capsys):
    from huggingface_hub import HfApi

    hub = cli_env
    step_dir = three_step_run / "global_step_2"
    before = sorted(str(p) for p in step_dir.rglob("*"))
    assert main(["upload", str(step_dir), "--repo-id", "alice/dry", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "alice/dry (to be created, PUBLIC) @ main -> tag step-2" in out
    assert "pytorch_model.bin" in out and "config.json" in out and "nothing written to the Hub" in out
    assert sum(hub.completed[k] for k in WRITE_KINDS) == 0 and not HfApi(token=ALICE).repo_exists("alice/dry")
    assert sorted(str(p) for p in step_dir.rglob("*")) == before  # no marker, no staging, no lock

    assert main(["upload", str(step_dir), "--repo-id", "alice/dry", "--private"]) == 0
    hub.reset_counters()
    assert main(["upload", str(three_step_run / "global_step_3"), "--repo-id", "alice/dry", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "alice/dry @ main -> tag step-3" in out and "changed" in out and "unchanged" in out
    assert sum(hub.completed[k] for k in WRITE_KINDS) == 0


def test_verify_against_the_checkpoint(cli_env, three_step_run, capsys):
    step2 = str(three_step_run / "global_step_2")
    assert main(["upload", step2, "--repo-id", "alice/verify", "--private", "--format", "safetensors"]) == 0
    assert main(["verify", "--repo-id", "alice/verify", "--revision", "step-2", "--against", step2]) == 0
    out = capsys.readouterr().out
    assert "loadable: True" in out and out.rstrip().endswith("OK")
    wrong = str(three_step_run / "global_step_3")
    assert main(["verify", "--repo-id", "alice/verify", "--revision", "step-2", "--against", wrong, "--no-load"]) == 1
    assert "PROBLEM model.safetensors: sha256 on the Hub" in capsys.readouterr().out


def test_resume_command_finishes_a_pending_upload(cli_env, three_step_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(three_step_run / "global_step_2", run / "global_step_2")
    hub = cli_env
    hub.fail_next("any", times=1000, error=503)  # reads fail fast in our retry; the upload gives up
    from utils.hf_uploader import HuggingFaceUploader

    up = HuggingFaceUploader("alice/resume-cli", private=True, max_attempts=1, progress=False)
    hub.clear_faults()
    up.preflight()
    hub.go_down()
    with pytest.raises(Exception, match="resume"):
        up.upload_from_checkpoint_dir(run / "global_step_2")
    hub.come_up()
    assert main(["resume", str(run)]) == 0
    assert "alice/resume-cli step-2" in capsys.readouterr().out
    assert not (run / "global_step_2" / "upload_pending.json").exists()
    assert main(["resume", str(run)]) == 0
    assert "nothing to resume" in capsys.readouterr().out


def _script(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    env.update(PYTHONPATH=str(ROOT), **(env_extra or {}))
    return subprocess.run([sys.executable, "utils/hf_uploader.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_script_errors_exit_non_zero_with_one_clear_line(hub, three_step_run):
    step2 = str(three_step_run / "global_step_2")
    bad_mode = _script("upload", step2, "--repo-id", "alice/x", "--optimizer-save-mode", "sharded")
    assert bad_mode.returncode == 1
    assert bad_mode.stderr.strip().splitlines()[-1].startswith("error: optimizer_save_mode='sharded' is not supported")
    no_token = _script("upload", step2, "--repo-id", "alice/x")
    assert no_token.returncode == 1 and "error: No Hugging Face token found" in no_token.stderr
    bad_token = _script("upload", step2, "--repo-id", "alice/x", env_extra={"HF_TOKEN": "hf_wrong_token_value"})
    assert bad_token.returncode == 1 and "rejected the token" in bad_token.stderr
    assert "hf_wrong_token_value" not in bad_token.stderr + bad_token.stdout
    assert _script("frobnicate").returncode == 2


def test_module_form_runs_too(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"} | {"PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "utils.hf_uploader", "resume", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and f"no upload_pending.json under {tmp_path}" in proc.stdout
