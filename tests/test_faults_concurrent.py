"""Fault injection: two uploads of different steps of one run race to one repo, in forced interleavings (the local
server holds one request until the test lets it go). `main` must never end on the older step: the stale upload gets
its tag (on a commit off main) and nothing else.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from utils.hf_uploader import HuggingFaceUploader


def _folder(root: Path, step: int) -> Path:
    """A small Hugging Face-like folder whose weight bytes differ per step."""
    d = root / f"model-{step}"
    d.mkdir(parents=True)
    (d / "config.json").write_text('{"model_type": "llama"}')
    (d / "pytorch_model.bin").write_bytes(bytes([step]) * 4096)
    return d


def _uploader(hub, repo, namespace=""):
    return HuggingFaceUploader(repo, token=hub.token_for("alice"), private=True, progress=False, namespace=namespace,
                               retry_base_delay=0.01, max_attempts=4, model_card=False)


def _wait_for(cond, what: str, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _in_thread(fn):
    box: dict = {}

    def run():
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised by the test
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


def _main_step(api, repo, path="pytorch_model.bin") -> int:
    return Path(api.hf_hub_download(repo, path, revision="main")).read_bytes()[0]


@pytest.mark.parametrize("namespace", ["", "exp"])
def test_older_step_whose_commit_lost_the_race_only_gets_its_tag(hub, tmp_path, namespace):
    """Step 2 plans on main, its commit is held; step 3 lands meanwhile; step 2's commit then gets 412 and must not
    be retried onto main."""
    repo = f"alice/race-412-{namespace or 'root'}"
    up2, up3 = _uploader(hub, repo, namespace), _uploader(hub, repo, namespace)
    up2.upload_folder(_folder(tmp_path, 1), 1)
    gate = hub.hold_next("commit")
    seen = hub.requests["commit"]
    t, box = _in_thread(lambda: up2.upload_folder(_folder(tmp_path, 2), 2))
    _wait_for(lambda: hub.requests["commit"] > seen, "step 2's commit to arrive")
    res3 = up3.upload_folder(_folder(tmp_path, 3), 3)
    gate.set()
    t.join(60)
    assert "error" not in box, box.get("error")
    res2 = box["result"]
    api = up2.client.api
    branches, tags = up2.client.refs(repo)
    prefix = f"{namespace}-" if namespace else ""
    assert branches["main"] == tags[f"{prefix}step-3"] == res3.commit_sha
    assert tags[f"{prefix}step-2"] == res2.commit_sha != res3.commit_sha and not res2.on_main
    assert set(branches) == {"main"}, "temporary branch left behind"
    weights = f"{namespace}/pytorch_model.bin" if namespace else "pytorch_model.bin"
    assert _main_step(api, repo, weights) == 3
    assert Path(api.hf_hub_download(repo, weights, revision=f"{prefix}step-2")).read_bytes()[0] == 2


def test_newer_step_committed_but_not_yet_tagged_still_wins(hub, tmp_path):
    """Step 3 committed to main, its tag request is held; step 2 plans now (no step-3 tag exists) - the history
    check before its commit must still see step 3 on main."""
    repo = "alice/race-untagged"
    up2, up3 = _uploader(hub, repo), _uploader(hub, repo)
    up3.upload_folder(_folder(tmp_path, 1), 1)
    gate = hub.hold_next("tag")
    seen = hub.requests["tag"]
    t, box = _in_thread(lambda: up3.upload_folder(_folder(tmp_path, 3), 3))
    _wait_for(lambda: hub.requests["tag"] > seen, "step 3's tag request to arrive")
    res2 = up2.upload_folder(_folder(tmp_path, 2), 2)
    gate.set()
    t.join(60)
    assert "error" not in box, box.get("error")
    branches, tags = up2.client.refs(repo)
    assert branches["main"] == tags["step-3"] == box["result"].commit_sha
    assert tags["step-2"] == res2.commit_sha and not res2.on_main
    assert _main_step(up2.client.api, repo) == 3 and set(branches) == {"main"}


def test_plain_concurrent_uploads_of_four_steps_leave_main_on_the_newest(hub, tmp_path):
    repo = "alice/race-plain"
    ups = {s: _uploader(hub, repo) for s in (1, 2, 3, 4)}
    ups[1].upload_folder(_folder(tmp_path, 1), 1)
    folders = {s: _folder(tmp_path, s) for s in (2, 3, 4)}
    threads = [_in_thread(lambda s=s: ups[s].upload_folder(folders[s], s)) for s in (4, 2, 3)]
    for t, box in threads:
        t.join(120)
        assert "error" not in box, box.get("error")
    branches, tags = ups[1].client.refs(repo)
    assert branches["main"] == tags["step-4"] and {"step-1", "step-2", "step-3", "step-4"} <= set(tags)
    assert _main_step(ups[1].client.api, repo) == 4 and set(branches) == {"main"}
