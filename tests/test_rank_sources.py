"""Gathering rank files from other holders before consolidation (utils/checkpoint/sources.py), without Ray.

"Node B" is a plain directory here (LocalDirSource); the Ray-backed source is exercised by the 2-node e2e tests.
Ground truth: the bytes of the files on the holder.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

import utils.checkpoint.sources as sources
from utils.checkpoint.errors import RankFileUnavailableError, RankSourceError
from utils.checkpoint.sources import LocalDirSource, WantedFile, gather_files, rank_file_names


def _write(root: Path, rel: str, data: bytes) -> None:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_bytes(data)


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture
def two_nodes(tmp_path):
    """Node A's step dir holds rank 0's files; node B's holds rank 1's and the trainer's data.pt."""
    a, b = tmp_path / "a" / "global_step_2", tmp_path / "b" / "global_step_2"
    for rel in rank_file_names(2, 0):
        _write(a, rel, b"A" * 1000 + rel.encode())
    for rel in rank_file_names(2, 1):
        _write(b, rel, bytes(range(256)) * 40 + rel.encode())
    _write(b, "data.pt", b"dataloader state")
    return a, b


def _wanted(a: Path, b: Path) -> list[WantedFile]:
    src_a, src_b = LocalDirSource(a, "node A"), LocalDirSource(b, "node B (10.0.0.2)")
    return ([WantedFile(rel, src_a, "rank 0") for rel in rank_file_names(2, 0)]
            + [WantedFile(rel, src_b, "rank 1") for rel in rank_file_names(2, 1)]
            + [WantedFile("data.pt", src_b, "the trainer"),
               WantedFile("curriculum_state.json", src_b, "the trainer", required=False)])


def test_files_of_the_other_node_are_copied_exactly_in_chunks(two_nodes, monkeypatch):
    a, b = two_nodes
    monkeypatch.setattr(sources, "CHUNK_BYTES", 1000)  # several chunks per file
    report = gather_files(a, _wanted(a, b))
    remote = [*rank_file_names(2, 1), "data.pt"]
    assert sorted(report.fetched) == sorted(remote)
    assert sorted(report.local) == sorted(rank_file_names(2, 0))
    assert report.bytes_moved == sum((b / rel).stat().st_size for rel in remote)
    for rel in remote:
        assert _sha(a / rel) == _sha(b / rel)
    assert not list(a.rglob("*.partial"))

    report.remove_fetched()
    assert sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file()) == sorted(rank_file_names(2, 0))


def test_on_shared_storage_nothing_moves(two_nodes):
    a, b = two_nodes
    for rel in [*rank_file_names(2, 1), "data.pt"]:  # the same files, visible from both nodes
        _write(a, rel, (b / rel).read_bytes())
    report = gather_files(a, _wanted(a, b))
    assert report.fetched == [] and report.bytes_moved == 0


def test_a_local_file_of_another_size_is_replaced_by_the_holders(two_nodes):
    a, b = two_nodes
    stale = rank_file_names(2, 1)[0]
    _write(a, stale, b"left over from another save")
    gather_files(a, _wanted(a, b))
    assert _sha(a / stale) == _sha(b / stale)


def test_a_missing_shard_names_the_rank_and_the_node_and_leaves_nothing(two_nodes):
    a, b = two_nodes
    missing = rank_file_names(2, 1)[1]
    (b / missing).unlink()
    with pytest.raises(RankFileUnavailableError) as e:
        gather_files(a, _wanted(a, b))
    assert str(e.value) == (f"{missing} of rank 1 is missing on node B (10.0.0.2) and in {a}: the checkpoint is "
                            "incomplete there; consolidate another step.")
    assert sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file()) == sorted(rank_file_names(2, 0))


class _DiesAfterOneChunk(LocalDirSource):
    def chunks(self, relpath: str, size: int) -> Iterator[bytes]:
        yield (self.root / relpath).read_bytes()[:10]
        raise RankSourceError(f"{self.label} is unreachable (ActorDiedError)")


def test_a_node_dying_mid_file_leaves_no_partial_file(two_nodes):
    a, b = two_nodes
    dying = _DiesAfterOneChunk(b, "node B (10.0.0.2)")
    wanted = [WantedFile(rel, dying, "rank 1") for rel in rank_file_names(2, 1)]
    with pytest.raises(RankFileUnavailableError, match=r"of rank 1 could not be read from node B \(10.0.0.2\): "
                                                         r"node B \(10.0.0.2\) is unreachable \(ActorDiedError\)"):
        gather_files(a, wanted)
    assert sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file()) == sorted(rank_file_names(2, 0))


class _Unreachable(LocalDirSource):
    def sizes(self, relpaths):
        raise RankSourceError(f"{self.label} is unreachable (NodeDiedError)")


def test_an_unreachable_node_is_named_with_the_ranks_it_holds(two_nodes):
    a, b = two_nodes
    wanted = [WantedFile(rel, _Unreachable(b, "node B (10.0.0.2)"), "rank 1") for rel in rank_file_names(2, 1)]
    with pytest.raises(RankFileUnavailableError, match=r"^cannot reach node B \(10.0.0.2\), which holds the files of "
                                                         r"rank 1 \("):
        gather_files(a, wanted)


def test_rank_file_names_follow_verls_layout():
    assert rank_file_names(4, 3) == ["actor/model_world_size_4_rank_3.pt", "actor/optim_world_size_4_rank_3.pt",
                                     "actor/extra_state_world_size_4_rank_3.pt"]


@pytest.mark.parametrize("settings, kinds", [
    ({"strategy": "end"}, ["model"]),
    ({"strategy": "end", "optimizer_save_mode": "full"}, ["model", "optim"]),
    ({"strategy": "checkpoint"}, ["model", "optim", "extra_state"]),
])
def test_an_upload_gathers_only_the_rank_files_it_reads(settings, kinds):
    from training.cluster_upload import rank_kinds
    from utils.hf_uploader import HuggingFaceUploader

    assert rank_kinds(HuggingFaceUploader("alice/x", token="hf_unused", **settings)) == kinds


def _pending_step(tmp_path: Path) -> Path:
    from utils.hub.pending import PendingUpload, write_pending

    step = tmp_path / "run" / "global_step_3"
    (step / "actor").mkdir(parents=True)
    write_pending(step, PendingUpload(checkpoint_dir=str(step), repo_id="alice/x", step=3, options={},
                                      error="gather: rank 1 on node B is gone"))
    return step


def test_cluster_resume_on_a_node_without_rank_0s_files_says_where_to_run_it(tmp_path, capsys):
    from training.cluster_upload import main

    assert main(["resume", str(_pending_step(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert "holds no model_world_size_W_rank_r.pt" in err and "actor rank 0's node" in err, err


def test_cluster_resume_without_a_ray_cluster_says_how_to_start_one(tmp_path):
    """A real `python -m training.cluster_upload resume` where no Ray cluster answers: exit 2 at once, what to do."""
    import os
    import subprocess
    import sys

    step = _pending_step(tmp_path)
    _write(step, "actor/model_world_size_2_rank_0.pt", b"rank 0")
    base = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    for env, why in [({**base, "RAY_ADDRESS": "127.0.0.1:1"}, "connection refused"),  # nothing listens there
                     ({**base, "RAY_TMPDIR": str(tmp_path / "no-ray")}, "RAY_ADDRESS unset, no `ray start`")]:
        out = subprocess.run([sys.executable, "-m", "training.cluster_upload", "resume", str(step)], env=env,
                             cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120)
        assert out.returncode == 2, out.stdout + out.stderr
        assert "cluster_upload: no Ray cluster to join" in out.stderr and why in out.stderr, out.stderr[-3000:]
        assert "RAY_ADDRESS=HEAD:PORT" in out.stderr
    assert (step / "upload_pending.json").is_file()  # still there: the command can be run again
