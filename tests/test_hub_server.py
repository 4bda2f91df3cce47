"""The local Hub server (`tests/hub_server.py`), driven only through the real `huggingface_hub` client.

Ground truth is the bytes on local disk (sha256), never something the server computed. The fault tests cost the
client's real backoff (1 s, then 2 s ...), so they fail the fewest requests that prove the point.
"""

from __future__ import annotations

import hashlib
import io
import os
import select
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from huggingface_hub import (
    CommitOperationAdd,
    HfApi,
    HfFileSystem,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    BadRequestError,
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

ROOT = Path(__file__).resolve().parents[1]
BIG = 12 * 1000 * 1000  # above the Hub's 10 MB LFS threshold


def _sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _api(hub, user: str | None) -> HfApi:
    return HfApi(endpoint=hub.url, token=hub.token_for(user) if user else False)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A small regular file, a >10 MB file (LFS by size), a small `.bin` (LFS by extension), a nested file."""
    d = tmp_path_factory.mktemp("model")
    (d / "config.json").write_text('{"hidden_size": 8}\n')
    (d / "model.bin").write_bytes(os.urandom(BIG))
    (d / "extra.bin").write_bytes(b"tiny but binary by extension")
    (d / "tok").mkdir()
    (d / "tok" / "vocab.txt").write_text("a\nb\nc\n")
    return d


@pytest.fixture
def repo(hub, request) -> str:
    """A fresh public repo `alice/<test name>` (the session server is shared, so names must not collide)."""
    repo_id = f"alice/{request.node.name.replace('[', '-').replace(']', '')}"
    _api(hub, "alice").create_repo(repo_id)
    return repo_id


def test_whoami_reports_user_orgs_and_token_role(hub):
    alice = _api(hub, "alice").whoami()
    assert (alice["name"], [o["name"] for o in alice["orgs"]], alice["auth"]["accessToken"]["role"]) == (
        "alice",
        ["acme"],
        "write",
    )
    assert _api(hub, "carol").whoami()["auth"]["accessToken"]["role"] == "read"
    with pytest.raises(HfHubHTTPError) as e:
        HfApi(endpoint=hub.url, token="hf_not_a_token").whoami()
    assert e.value.response.status_code == 401


def test_upload_folder_round_trips_every_file_byte_for_byte(hub, repo, model_dir, tmp_path):
    api = _api(hub, "alice")
    info = api.upload_folder(repo_id=repo, folder_path=model_dir, commit_message="step 1")

    tree = {f.path: f for f in api.list_repo_tree(repo, recursive=True) if hasattr(f, "size")}
    local = {p.relative_to(model_dir).as_posix(): p for p in model_dir.rglob("*") if p.is_file()}
    assert sorted(tree) == sorted([*local, ".gitattributes"])
    # LFS the way the Hub decides it: by size (model.bin) and by .gitattributes pattern (extra.bin).
    assert {p for p, f in tree.items() if f.lfs} == {"model.bin", "extra.bin"}
    assert tree["model.bin"].lfs.sha256 == _sha256(local["model.bin"])
    assert (hub.completed["lfs_put"], hub.completed["commit"]) == (2, 1)
    assert (
        sum(hub.lfs_stored.values()) == 2 and hub.lfs_bytes_received == BIG + (model_dir / "extra.bin").stat().st_size
    )

    snapshot = snapshot_download(repo, endpoint=hub.url, cache_dir=tmp_path / "cache")
    for rel, path in local.items():
        assert _sha256(Path(snapshot) / rel) == _sha256(path), rel
    single = hf_hub_download(repo, "model.bin", revision=info.oid, endpoint=hub.url, cache_dir=tmp_path / "c2")
    assert _sha256(single) == _sha256(local["model.bin"])

    # Same folder again: preupload's oids let the client skip every file, so nothing is sent or committed.
    hub.reset_counters()
    again = api.upload_folder(repo_id=repo, folder_path=model_dir)
    assert again.oid == info.oid
    assert (hub.requests["lfs_put"], hub.requests["commit"]) == (0, 0)


def test_private_repo_is_invisible_to_anonymous_and_other_users(hub, tmp_path):
    alice, bob, anonymous = _api(hub, "alice"), _api(hub, "bob"), _api(hub, None)
    repo_id = "alice/secret"
    alice.create_repo(repo_id, private=True)
    alice.upload_file(repo_id=repo_id, path_or_fileobj=b"hidden", path_in_repo="weights.txt")

    assert (alice.repo_exists(repo_id), anonymous.repo_exists(repo_id), bob.repo_exists(repo_id)) == (
        True,
        False,
        False,
    )
    assert alice.repo_info(repo_id).private is True
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(repo_id, "weights.txt", token=False, endpoint=hub.url, cache_dir=tmp_path)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(repo_id, "weights.txt", token=hub.token_for("bob"), endpoint=hub.url, cache_dir=tmp_path)
    with pytest.raises(RepositoryNotFoundError):
        bob.upload_file(repo_id=repo_id, path_or_fileobj=b"x", path_in_repo="x.txt")
    assert [c.title for c in alice.list_repo_commits(repo_id)] == [
        "Upload weights.txt with huggingface_hub",
        "initial commit",
    ]


def test_writes_outside_own_namespaces_are_refused(hub, repo):
    alice, bob, carol = _api(hub, "alice"), _api(hub, "bob"), _api(hub, "carol")
    with pytest.raises(HfHubHTTPError) as e:  # someone else's namespace
        bob.create_repo("alice/bobs-attempt")
    assert e.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as e:  # an org bob is not a member of, even with exist_ok
        bob.create_repo("acme/bobs-attempt", exist_ok=True)
    assert e.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as e:  # a public repo bob can read but not write
        bob.upload_file(repo_id=repo, path_or_fileobj=b"x", path_in_repo="x.txt")
    assert e.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as e:  # a read-only token, even in its own namespace
        carol.create_repo("carol/anything")
    assert e.value.response.status_code == 403
    assert alice.create_repo("acme/team-model").repo_id == "acme/team-model"  # alice is an acme member
    assert bob.repo_exists(repo) and not alice.repo_exists("alice/bobs-attempt")


def test_create_repo_conflicts_unless_exist_ok_and_delete_repo(hub, repo):
    api = _api(hub, "alice")
    with pytest.raises(HfHubHTTPError) as e:
        api.create_repo(repo)
    assert e.value.response.status_code == 409
    assert api.create_repo(repo, exist_ok=True) == f"{hub.url}/{repo}"
    api.delete_repo(repo)
    assert not api.repo_exists(repo)
    with pytest.raises(RepositoryNotFoundError):
        api.delete_repo(repo)


def test_tags_and_branches_pin_revisions(hub, repo, tmp_path):
    api = _api(hub, "alice")
    first = api.upload_file(repo_id=repo, path_or_fileobj=b"v1", path_in_repo="w.txt", commit_message="step 1")
    api.create_tag(repo, tag="step-1")
    second = api.upload_file(repo_id=repo, path_or_fileobj=b"v2", path_in_repo="w.txt", commit_message="step 2")
    api.create_tag(repo, tag="step-2", revision=second.oid)
    with pytest.raises(HfHubHTTPError) as e:
        api.create_tag(repo, tag="step-1")
    assert e.value.response.status_code == 409
    api.create_tag(repo, tag="step-1", exist_ok=True)

    refs = api.list_repo_refs(repo)
    assert {t.name: t.target_commit for t in refs.tags} == {"step-1": first.oid, "step-2": second.oid}
    assert [b.target_commit for b in refs.branches if b.name == "main"] == [second.oid]
    assert [c.title for c in api.list_repo_commits(repo)] == ["step 2", "step 1", "initial commit"]

    def read(revision: str) -> bytes:
        return Path(
            hf_hub_download(repo, "w.txt", revision=revision, endpoint=hub.url, cache_dir=tmp_path)
        ).read_bytes()

    assert (read("step-1"), read("step-2"), read("main"), read(first.oid)) == (b"v1", b"v2", b"v2", b"v1")

    # A branch whose name needs percent-encoding in URLs.
    api.create_branch(repo, branch="exp/lr-1e-4", revision="step-1")
    api.upload_file(repo_id=repo, path_or_fileobj=b"v3", path_in_repo="w.txt", revision="exp/lr-1e-4")
    assert (read("exp/lr-1e-4"), read("main")) == (b"v3", b"v2")
    api.delete_branch(repo, branch="exp/lr-1e-4")
    api.delete_tag(repo, tag="step-2")
    refs = api.list_repo_refs(repo)
    assert ([b.name for b in refs.branches], [t.name for t in refs.tags]) == (["main"], ["step-1"])
    with pytest.raises(RevisionNotFoundError):
        api.repo_info(repo, revision="step-2")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo, "nope.txt", endpoint=hub.url, cache_dir=tmp_path)


def test_range_reads_and_paths_info(hub, repo, model_dir):
    api = _api(hub, "alice")
    api.upload_file(repo_id=repo, path_or_fileobj=model_dir / "model.bin", path_in_repo="w/model.bin")
    data = (model_dir / "model.bin").read_bytes()
    fs = HfFileSystem(endpoint=hub.url, token=hub.token_for("alice"))
    hub.reset_counters()
    assert fs.cat_file(f"{repo}/w/model.bin", start=1_000_003, end=1_000_103) == data[1_000_003:1_000_103]
    assert fs.cat_file(f"{repo}/w/model.bin", start=BIG - 7) == data[-7:]
    assert hub.completed["resolve"] >= 2 and hub.lfs_bytes_received == 0
    info = {p.path: p for p in api.get_paths_info(repo, ["w/model.bin", "w", "missing"])}
    assert (sorted(info), info["w/model.bin"].lfs.sha256) == (["w", "w/model.bin"], hashlib.sha256(data).hexdigest())


def test_existence_checks_settings_and_dataset_repos(hub, repo):
    api, anonymous = _api(hub, "alice"), _api(hub, None)
    api.upload_file(repo_id=repo, path_or_fileobj=b"{}", path_in_repo="cfg/config.json")
    api.create_tag(repo, tag="step-5")
    assert api.file_exists(repo, "cfg/config.json", revision="step-5")
    assert not api.file_exists(repo, "cfg/missing.json")
    assert (api.revision_exists(repo, "step-5"), api.revision_exists(repo, "step-6")) == (True, False)
    assert anonymous.repo_exists(repo)
    api.update_repo_settings(repo, private=True)  # flipping visibility hides it at once
    assert not anonymous.repo_exists(repo) and api.repo_info(repo).private

    api.create_repo("alice/rollouts", repo_type="dataset")
    api.upload_file(repo_id="alice/rollouts", repo_type="dataset", path_or_fileobj=b"1", path_in_repo="a.jsonl")
    assert api.list_repo_files("alice/rollouts", repo_type="dataset") == [".gitattributes", "a.jsonl"]
    assert not api.repo_exists("alice/rollouts")  # a dataset is not a model of the same name


def test_commit_with_stale_parent_commit_is_rejected(hub, repo):
    api = _api(hub, "alice")
    stale = api.repo_info(repo).sha
    api.upload_file(repo_id=repo, path_or_fileobj=b"a", path_in_repo="a.txt")
    with pytest.raises(HfHubHTTPError) as e:
        api.create_commit(repo, [CommitOperationAdd("b.txt", b"b")], commit_message="late", parent_commit=stale)
    assert e.value.response.status_code == 412
    assert "b.txt" not in api.list_repo_files(repo)


def test_upload_folder_delete_patterns_and_readme_validation(hub, repo, tmp_path):
    api = _api(hub, "alice")
    for rel in ("old/1.txt", "old/2.txt", "keep.txt"):
        api.upload_file(repo_id=repo, path_or_fileobj=rel.encode(), path_in_repo=rel)
    (tmp_path / "README.md").write_text("---\nlicense: apache-2.0\n---\n# card\n")
    (tmp_path / "new.txt").write_text("new")
    hub.reset_counters()
    api.upload_folder(repo_id=repo, folder_path=tmp_path, delete_patterns=["old/*"])
    assert sorted(api.list_repo_files(repo)) == [".gitattributes", "README.md", "keep.txt", "new.txt"]
    assert (
        hub.completed["validate_yaml"] >= 1 and hub.completed["commit"] == 1
    )  # upload_folder and create_commit both validate


def test_burst_of_500s_and_429s_is_retried_and_nothing_is_stored_twice(hub, repo, model_dir):
    hub.fail_next("preupload", times=1, error=429, retry_after=0)
    hub.fail_next("lfs_batch", times=1, error=500)
    hub.fail_next("lfs_put", times=1, error=503)
    _api(hub, "alice").upload_file(repo_id=repo, path_or_fileobj=model_dir / "extra.bin", path_in_repo="extra.bin")
    assert (hub.requests["preupload"], hub.requests["lfs_batch"], hub.requests["lfs_put"]) == (2, 2, 2)
    assert (hub.completed["lfs_put"], hub.completed["commit"]) == (1, 1)
    assert list(hub.lfs_stored.values()) == [1]


def test_connection_reset_mid_lfs_put_is_recovered(hub, repo, model_dir, tmp_path):
    hub.fail_next("lfs_put", times=1, error="reset_mid_body")
    api = _api(hub, "alice")
    api.upload_file(repo_id=repo, path_or_fileobj=model_dir / "model.bin", path_in_repo="model.bin")
    assert hub.requests["lfs_put"] == 2 and hub.completed["lfs_put"] == 1
    assert hub.lfs_bytes_received == BIG + BIG // 2  # half a body cut off, then one whole body
    path = hf_hub_download(repo, "model.bin", endpoint=hub.url, cache_dir=tmp_path)
    assert _sha256(path) == _sha256(model_dir / "model.bin")


def test_lfs_put_whose_bytes_do_not_match_the_announced_sha256_is_rejected(hub, repo):
    buffer = io.BytesIO(b"\0" * 4096)  # binary: goes through LFS
    operation = CommitOperationAdd("weights.bin", buffer)  # hashes the buffer now
    buffer.getbuffer()[:4] = b"evil"  # same size, other bytes: what a corrupted transfer looks like
    api = _api(hub, "alice")
    with pytest.raises(RuntimeError, match="Error while uploading 'weights.bin'") as e:  # the client's wrapper
        api.create_commit(repo, [operation], commit_message="corrupt")
    assert isinstance(e.value.__cause__, BadRequestError) and "does not match" in str(e.value.__cause__)
    assert not hub.lfs_stored and hub.requests["commit"] == 0
    assert "weights.bin" not in api.list_repo_files(repo)


def test_commit_failure_is_not_retried_by_the_client(hub, repo):
    """The client never retries a commit POST (a lost answer could mean a duplicate): the uploader must."""
    hub.fail_next("commit", times=1, error=500)
    api = _api(hub, "alice")
    with pytest.raises(HfHubHTTPError) as e:
        api.upload_file(repo_id=repo, path_or_fileobj=b"x", path_in_repo="x.txt")
    assert e.value.response.status_code == 500 and hub.requests["commit"] == 1
    assert "x.txt" not in api.list_repo_files(repo)


def test_lost_commit_answer_leaves_the_commit_applied(hub, repo):
    """The case that makes blind commit retries dangerous: the commit landed, the client only saw a reset."""
    api = _api(hub, "alice")
    hub.fail_next("commit", times=1, error="drop_answer")
    with pytest.raises(httpx.TransportError):
        api.upload_file(repo_id=repo, path_or_fileobj=b"x", path_in_repo="x.txt", commit_message="step 7")
    assert hub.requests["commit"] == 1 and hub.completed["commit"] == 0
    assert [c.title for c in api.list_repo_commits(repo)] == ["step 7", "initial commit"]


def test_hung_server_answers_nothing_until_it_comes_back(hub, repo):
    api = _api(hub, "alice")
    hub.go_down("hang")
    with pytest.raises(httpx.ReadTimeout):
        api.repo_info(repo, timeout=0.3)
    assert not hub.is_up
    hub.come_up()
    assert api.repo_info(repo, timeout=5).id == repo


def test_server_down_refuses_connections_and_comes_back_with_its_repos(hub, repo):
    api = _api(hub, "alice")
    hub.go_down()
    with pytest.raises(httpx.ConnectError):
        api.repo_info(repo)
    hub.come_up()
    assert api.repo_info(repo).id == repo


def test_stalled_server_makes_the_client_time_out(hub, repo, tmp_path):
    """HfApi calls have no default timeout (the client's session uses `timeout=None`): pass one where the API
    takes it. `hf_hub_download` with no cached copy retries a timed-out HEAD with a 60 s timeout."""
    api = _api(hub, "alice")
    api.upload_file(repo_id=repo, path_or_fileobj=b"{}", path_in_repo="config.json")
    hub.stall_next("repo_info", seconds=3)
    with pytest.raises(httpx.ReadTimeout):
        api.repo_info(repo, timeout=0.3)
    hub.stall_next("resolve", seconds=2)
    hub.reset_counters()
    path = hf_hub_download(repo, "config.json", endpoint=hub.url, cache_dir=tmp_path, etag_timeout=0.3)
    assert Path(path).read_bytes() == b"{}" and hub.requests["resolve"] == 3  # stalled HEAD, HEAD, GET


def test_fault_knobs_reject_unknown_kinds_and_faults(hub):
    with pytest.raises(ValueError, match="unknown request kind 'upload'"):
        hub.fail_next("upload")
    with pytest.raises(ValueError, match="unknown fault 404"):
        hub.fail_next("commit", error=404)


def test_subprocess_mode_prints_its_url_and_keeps_repos_across_restarts(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "tests.hub_server",
        "--port",
        "0",
        "--root",
        str(tmp_path / "hub"),
        "--token",
        "dave=hf_dave_token",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def serve() -> tuple[subprocess.Popen, str]:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        assert ready, "the server printed no URL within 30 s"
        return proc, proc.stdout.readline().strip()

    proc, url = serve()
    try:
        assert url.startswith("http://127.0.0.1:")
        api = HfApi(endpoint=url, token="hf_dave_token")
        assert api.whoami()["name"] == "dave"
        api.create_repo("dave/persisted", private=True)
        api.upload_file(repo_id="dave/persisted", path_or_fileobj=b"kept", path_in_repo="k.txt")
    finally:
        proc.terminate()
        proc.stdout.close()
        assert proc.wait(timeout=10) == 0
    proc, url = serve()
    try:
        assert HfApi(endpoint=url, token="hf_dave_token").list_repo_files("dave/persisted") == [
            ".gitattributes",
            "k.txt",
        ]
    finally:
        proc.terminate()
        proc.stdout.close()
        proc.wait(timeout=10)
