"""Fault injection on the local side: kill -9 and SIGTERM at several phases of a consolidation and of an upload (real
subprocesses, paused at the phase by a wrapper around one engine function), a disk that is full before or during the
write (a small tmpfs; skipped with the reason when mounting is not permitted), and a step folder deleted mid-merge.

Every case ends with one clear line, nothing that looks finished, and nothing a rerun does not clean: a SIGTERM'd
process removes its temporary folder itself; after kill -9 the folder carries an owner record and the next run
removes it (and only folders that are provably ours and stale).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from utils.checkpoint.errors import CheckpointVanishedError, OutputSpaceError
from utils.checkpoint.tempdirs import OWNER_SUFFIX, make_owned_temp_dir, sweep_stale
from utils.load_fsdp_to_hf import consolidate_checkpoint

REPO = Path(__file__).resolve().parents[1]

# Runs a CLI in a child process after wrapping one function so that, once it is reached, the child touches READY
# and sleeps: the test then signals it at exactly that phase.
_PAUSING_DRIVER = textwrap.dedent("""
    import importlib, sys, time
    from pathlib import Path
    module, name, ready, kind = sys.argv[1:5]
    mod = importlib.import_module(module)
    original = getattr(mod, name)
    def paused(*args, **kwargs):
        result = original(*args, **kwargs) if kind == "after" else None
        Path(ready).touch()
        time.sleep(600)
        return result
    setattr(mod, name, paused)
    if sys.argv[5] == "consolidate":
        from utils.checkpoint.cli import main
    else:
        from utils.hub.cli import main
    sys.exit(main(sys.argv[6:]))
""")


def _start_paused(tmp_path: Path, target: str, kind: str, cli: str, argv: list[str], env: dict | None = None):
    module, name = target.rsplit(".", 1)
    ready = tmp_path / f"ready-{name}"
    proc = subprocess.Popen([sys.executable, "-c", _PAUSING_DRIVER, module, name, str(ready), kind, cli, *argv],
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not ready.exists():
        if proc.poll() is not None:
            raise AssertionError(f"child ended before the phase: {proc.communicate()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("child never reached the phase")
        time.sleep(0.05)
    return proc


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def ckpt(fsdp_checkpoints):
    return fsdp_checkpoints["w2_untied"]


# ----------------------------------------------------------------------------------------------- kill -9 / SIGTERM
@pytest.mark.slow
@pytest.mark.parametrize("phase", [("utils.checkpoint.consolidate.save_bin_shard", "after"),
                                   ("utils.checkpoint.consolidate.verify_output", "after")],
                         ids=["writing-weights", "before-rename"])
def test_kill9_mid_consolidation_leaves_an_owned_folder_that_the_next_run_removes(ckpt, tmp_path, phase):
    out = tmp_path / "out" / "model"
    proc = _start_paused(tmp_path, *phase, "consolidate", [str(ckpt.actor_dir), str(out), "--quiet"])
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    left = _leftovers(out.parent)
    assert not out.exists() and any(n.startswith(".model.tmp-") for n in left), left
    assert any(n.endswith(OWNER_SUFFIX) for n in left), "the leftover carries no owner record"
    res = consolidate_checkpoint(ckpt.actor_dir, out, progress=False)  # the rerun sweeps the dead run's folder
    assert res.out_dir == out and _leftovers(out.parent) == []


@pytest.mark.slow
def test_sigterm_mid_consolidation_cleans_up_and_exits_143(ckpt, tmp_path):
    out = tmp_path / "deep" / "er" / "model"  # parents created by the run are removed again
    proc = _start_paused(tmp_path, "utils.checkpoint.consolidate.save_bin_shard", "after", "consolidate",
                         [str(ckpt.actor_dir), str(out), "--quiet"])
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "terminated (signal 15): nothing was written"
    assert not (tmp_path / "deep").exists()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill9", "sigterm"])
def test_upload_killed_mid_way_leaves_nothing_a_rerun_does_not_clean(hub, ckpt, tmp_path, sig):
    step_dir = tmp_path / "run" / "global_step_2"
    shutil.copytree(ckpt.step_dir, step_dir)
    staging = tmp_path / "staging"
    staging.mkdir()
    repo = f"alice/killed-upload-{sig.name.lower()}"
    argv = ["-q", "upload", str(step_dir), "--repo-id", repo, "--private", "--staging-dir", str(staging)]
    env = {"HF_TOKEN": hub.token_for("alice")}
    proc = _start_paused(tmp_path, "utils.hub.uploader.plan_push", "before", "upload", argv, env)
    assert any(p.name.startswith("hf_upload_step2_") for p in staging.iterdir())  # consolidated, about to push
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    names = [p.name for p in staging.iterdir()]
    if sig == signal.SIGTERM:
        assert proc.returncode == 143 and names == [], (err, names)
        assert "terminated (signal 15)" in err
    else:
        assert any(n.endswith(OWNER_SUFFIX) for n in names), names
    from utils.hf_uploader import HuggingFaceUploader

    assert "step-2" not in HuggingFaceUploader(repo, token=hub.token_for("alice")).client.refs(repo)[1]
    res = HuggingFaceUploader(repo, token=hub.token_for("alice"), private=True, progress=False,
                              staging_dir=staging).upload_from_checkpoint_dir(step_dir)
    assert res.tag == "step-2" and list(staging.iterdir()) == []


def test_sweep_removes_only_stale_folders_that_are_provably_ours(tmp_path):
    mine = make_owned_temp_dir(tmp_path, ".m.tmp-")  # this process is alive: kept
    foreign = tmp_path / ".m.tmp-foreign"  # no owner record: never touched
    foreign.mkdir()
    dead = make_owned_temp_dir(tmp_path, ".m.tmp-")
    record = Path(f"{dead}{OWNER_SUFFIX}")
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    record.write_text(record.read_text().replace(f'"pid": {os.getpid()}', f'"pid": {int(child.stdout)}'))
    other_host = make_owned_temp_dir(tmp_path, ".m.tmp-")
    rec = Path(f"{other_host}{OWNER_SUFFIX}")
    rec.write_text(rec.read_text().replace('"host": "', '"host": "elsewhere-').replace(
        f'"pid": {os.getpid()}', f'"pid": {int(child.stdout)}'))
    assert sweep_stale(tmp_path, ".m.tmp-") == [dead]
    assert mine.is_dir() and foreign.is_dir() and other_host.is_dir() and not dead.exists() and not record.exists()


# ------------------------------------------------------------------------------------------------------ disk full
@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB tmpfs (the consolidated model needs ~100 KB); unmounted in teardown."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root/CAP_SYS_ADMIN): {done.stderr.strip()}")
    yield mnt
    if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
        # a file the failed writer opened may still be referenced by the exception pytest keeps: detach lazily
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_too_small_is_refused_before_writing(ckpt, small_disk):
    with pytest.raises(OutputSpaceError, match="needs about .* GB, but .* has only .* GB free"):
        consolidate_checkpoint(ckpt.actor_dir, small_disk / "model", progress=False)
    assert list(small_disk.iterdir()) == []


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_disk_full_during_the_write_is_named_and_leaves_nothing(ckpt, small_disk, monkeypatch, fmt):
    import utils.checkpoint.consolidate as consolidate

    monkeypatch.setattr(consolidate, "check_free_space", lambda *a, **k: None)  # as if another writer filled it
    with pytest.raises(OutputSpaceError, match="ran out of space while writing") as err:
        consolidate_checkpoint(ckpt.actor_dir, small_disk / "model", weights_format=fmt, progress=False)
    assert "\n" not in str(err.value)
    assert list(small_disk.iterdir()) == []


def test_cli_disk_full_is_one_line_naming_a_log_with_the_traceback(ckpt, small_disk, capsys, tmp_path, monkeypatch):
    from utils.checkpoint.cli import main

    monkeypatch.setenv("VERL_GRPO_HUB_LOG_DIR", str(tmp_path / "logs"))
    assert main([str(ckpt.actor_dir), str(small_disk / "model"), "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: OutputSpaceError: ") and "(details: " in err[0], err
    log = Path(err[0].rsplit("(details: ", 1)[1].rstrip(")"))
    assert log.is_file() and "Traceback" in log.read_text()


# --------------------------------------------------------------------------------------------- deleted mid-merge
def test_step_folder_deleted_mid_merge_is_named(ckpt, tmp_path, monkeypatch):
    import utils.checkpoint.consolidate as consolidate

    step = tmp_path / "run" / "global_step_2"
    shutil.copytree(ckpt.step_dir, step)
    original = consolidate.save_bin_shard

    def write_then_lose_the_checkpoint(path, tensors):
        original(path, tensors)
        shutil.rmtree(step)  # rotation, or a user cleaning up, while the merge runs

    monkeypatch.setattr(consolidate, "save_bin_shard", write_then_lose_the_checkpoint)
    out = tmp_path / "out"
    with pytest.raises(CheckpointVanishedError, match="disappeared while the checkpoint was being consolidated"):
        consolidate_checkpoint(step, out, progress=False)
    assert not out.exists() and _leftovers(tmp_path) == []
