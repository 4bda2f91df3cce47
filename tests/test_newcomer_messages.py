"""What a new user hits first: every local input checked before any Hub request, one dtype vocabulary everywhere,
errors that say which of no token / bad token / no repo / no revision it is, the endpoint named when the Hub does not
answer, a `--step` that contradicts the folder, `--verify` that says it passed, and sizes that are not "0.00 GB"."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from utils.checkpoint.consolidate import human_bytes
from utils.checkpoint.dtype_names import normalize_dtype
from utils.checkpoint.errors import NotACheckpointError
from utils.hf_uploader import HuggingFaceUploader
from utils.hf_uploader import main as uploader_main
from utils.hub.errors import (
    InvalidTokenError,
    InvalidUploadConfigError,
    MissingTokenError,
    RepoNotFoundOnHubError,
    RevisionNotFoundOnHubError,
)
from utils.load_fsdp_to_hf import main as consolidate_main

ROOT = Path(__file__).resolve().parents[1]
ALICE = "hf_alice_local_token"
FAST = dict(retry_base_delay=0.01, progress=False)


@pytest.fixture(scope="module")
def ckpt(fsdp_checkpoints):
    return fsdp_checkpoints["w2_untied"]


@pytest.mark.parametrize(("given", "canonical"), [("auto", "auto"), ("bf16", "bf16"), ("bfloat16", "bf16"),
                                                  ("BF16", "bf16"), ("float16", "fp16"), ("fp16", "fp16"),
                                                  ("float32", "fp32"), ("torch.float32", "fp32")])
def test_dtype_names_accepted_everywhere(given, canonical):
    assert normalize_dtype(given) == canonical
    assert HuggingFaceUploader("alice/x", dtype=given, token=ALICE).dtype in (canonical, "fp32")


@pytest.mark.parametrize("bad", ["bfloat", "int8", "", "fp64"])
def test_bad_dtype_rejected_at_once_by_both_clis_and_the_api(bad, capsys):
    with pytest.raises(InvalidUploadConfigError, match=r"expected auto, bf16, fp16 or fp32"):
        HuggingFaceUploader("alice/x", dtype=bad, token=ALICE)
    for cli, argv in ((uploader_main, ["upload", "/nowhere", "--repo-id", "alice/x", "--dtype", bad]),
                      (consolidate_main, ["/nowhere", "/tmp/out", "--dtype", bad])):
        with pytest.raises(SystemExit) as exit_info:  # argparse: exit 2 before anything is read
            cli(argv)
        assert exit_info.value.code == 2
        assert "expected auto, bf16, fp16 or fp32" in capsys.readouterr().err


def test_upload_of_a_mistyped_path_makes_no_hub_request(hub, ckpt, monkeypatch, capsys):
    from huggingface_hub import HfApi

    monkeypatch.setenv("HF_TOKEN", ALICE)
    typo = str(ckpt.step_dir) + "x"
    assert uploader_main(["upload", typo, "--repo-id", "alice/typo", "--private", "--step", "2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: NotACheckpointError: ") and "no such directory" in err and len(err.splitlines()) == 1
    assert sum(hub.completed.values()) == 0  # not even whoami: nothing was asked of the Hub
    assert not HfApi(token=ALICE).repo_exists("alice/typo")


def test_upload_without_optimizer_files_fails_locally(hub, ckpt, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(ckpt.step_dir, run / "global_step_2")
    for f in (run / "global_step_2" / "actor").glob("optim_world_size_*"):
        f.unlink()
    up = HuggingFaceUploader("alice/noopt", private=True, optimizer_save_mode="full", token=ALICE, **FAST)
    with pytest.raises(Exception, match=r"no optim_world_size_2_rank_\*.pt files, but optimizer.pt was requested"):
        up.upload_from_checkpoint_dir(run / "global_step_2")
    assert sum(hub.completed.values()) == 0


def test_verify_and_pull_say_which_access_problem_it_is(hub, ckpt, tmp_path, monkeypatch):
    from utils.hub.snapshots import pull_snapshot
    from utils.hub.verify import verify_upload

    HuggingFaceUploader("alice/private-one", private=True, token=ALICE, **FAST).upload_from_checkpoint_dir(
        ckpt.step_dir)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")
    with pytest.raises(MissingTokenError, match=r"alice/private-one was not found at .* without a token .*Set HF_TOKEN"):
        verify_upload("alice/private-one", "step-2", token=None, load=False)
    with pytest.raises(MissingTokenError, match=r"it does not exist, or it is private"):
        pull_snapshot("alice/private-one", tmp_path / "out", 2, token=None)
    with pytest.raises(InvalidTokenError, match=r"rejected the token \(401\)"):
        verify_upload("alice/private-one", "step-2", token="hf_not_a_valid_token_at_all", load=False)
    with pytest.raises(RevisionNotFoundOnHubError, match=r"has no revision 'step-9'\. Tags: step-2; branches: main"):
        verify_upload("alice/private-one", "step-9", token=ALICE, load=False)
    with pytest.raises(RepoNotFoundOnHubError, match=r"alice/no-such-repo does not exist at .*Check the repo id"):
        verify_upload("alice/no-such-repo", "main", token=ALICE, load=False)
    with pytest.raises(RepoNotFoundOnHubError, match=r"alice/no-such-repo does not exist"):
        pull_snapshot("alice/no-such-repo", tmp_path / "out", 2, token=ALICE)


def test_dry_run_against_an_unreachable_hub_names_the_endpoint_at_once(ckpt, tmp_path):
    import os
    import time

    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "PYTHONPATH": str(ROOT)}
    env.pop("HF_TOKEN", None)
    started = time.monotonic()
    run = subprocess.run([sys.executable, "utils/hf_uploader.py", "-q", "upload", str(ckpt.step_dir), "--repo-id",
                          "alice/offline", "--dry-run", "--staging-dir", str(tmp_path)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stdout + run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("error: dry run: cannot reach the Hub at http://127.0.0.1:9 ")
    assert "HF_ENDPOINT=http://127.0.0.1:9" in last
    assert time.monotonic() - started < 120  # one attempt, not minutes of retries (a generous bound, not a target)


def test_step_that_contradicts_the_folder_says_so(ckpt, tmp_path):
    with pytest.raises(NotACheckpointError, match=r"is the checkpoint of step 2; --step 5 .* Drop --step, or pass the "
                                                  r"run directory that holds global_step_5/"):
        from utils.checkpoint.layout import resolve_actor_dir

        resolve_actor_dir(ckpt.actor_dir, 5)
    from utils.checkpoint.layout import resolve_actor_dir

    assert resolve_actor_dir(ckpt.actor_dir, 2) == ckpt.actor_dir  # the folder's own step is fine


def test_consolidation_summary_says_verify_passed_and_uses_readable_sizes(ckpt, tmp_path, capsys):
    assert consolidate_main([str(ckpt.actor_dir), str(tmp_path / "out"), "--verify", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "0.00 GB" not in out and "verify: passed" in out
    assert " kB in " in out  # a ~0.6 MB model, in units a person can read
    # the rate depends on the machine (kB/s or MB/s here): a readable number and unit, never "0.00 GB/s"
    assert re.search(r"\((?!0 )\d+(\.\d+)? (kB|MB|GB)/s\)", out), out


@pytest.mark.parametrize(("n", "text"), [(0, "0 B"), (999, "999 B"), (1000, "1 kB"), (618_420, "618 kB"),
                                         (12_345_678, "12.3 MB"), (3.09e9, "3.09 GB")])
def test_human_bytes(n, text):
    assert human_bytes(n) == text


def test_pyproject_license_is_an_spdx_string_and_every_file_it_names_exists():
    import re
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    text = (ROOT / "pyproject.toml").read_text()
    project = tomllib.loads(text)["project"]
    assert project["license"] == "Apache-2.0"  # a table here makes setuptools print a deprecation warning
    assert any(dep.startswith("matplotlib") for dep in project["dependencies"])
    for name in re.findall(r"[\w./-]+\.(?:md|py|yaml|sh)\b", text):
        assert (ROOT / name).exists() or name in ("README.md",), f"pyproject.toml names {name}, not in the repo"
