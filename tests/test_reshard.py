"""Resharding without Ray: a real W=2 FSDP2 checkpoint -> consolidated model + optimizer.pt -> veRL shards at W=1
and W=3 -> gathered back (by concatenating each rank's local slice, no engine code) equal the writer's ground truth
(torch's own full state dicts, gathered in the writer processes) exactly."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed.tensor  # noqa: F401  (registers DTensor for loading)

from tests.consolidation_checks import load_ground_truth, load_output_state_dict
from utils.checkpoint.reshard import ReshardError, write_verl_checkpoint
from utils.hub.resume_state import read_trainer_state, snapshot_problems, stage_resume_files
from utils.load_fsdp_to_hf import consolidate_checkpoint

pytestmark = pytest.mark.slow  # ~40 s: two FSDP2 writer runs (shared with the engine tests) + three reshards


@pytest.fixture(scope="module")
def snapshot(fsdp_checkpoints, tmp_path_factory):
    ck = fsdp_checkpoints["w2_untied"]
    out = tmp_path_factory.mktemp("snap") / "model"
    consolidate_checkpoint(ck.actor_dir, out, include_optimizer=True, dtype="fp32", progress=False)
    (ck.step_dir / "curriculum_state.json").write_text(json.dumps({"levels": {"chain_sum": {"num_terms": 1}}}))
    stage_resume_files(ck.step_dir, out, step=ck.step, world_size=ck.world_size)
    return ck, out


def _gather(run_dir, step, kind, world):
    """Concatenate every rank's local slice along dim 0 (FSDP2's Shard(0)), keyed as in the rank files."""
    files = [torch.load(run_dir / f"global_step_{step}" / "actor" / f"{kind}_world_size_{world}_rank_{r}.pt",
                        weights_only=False) for r in range(world)]
    return files


@pytest.mark.parametrize("world", [1, 3])
def test_reshard_gathers_back_to_ground_truth_exactly(snapshot, tmp_path, world):
    ck, snap = snapshot
    truth = load_ground_truth(ck)
    step_dir = write_verl_checkpoint(snap, tmp_path / "run", world, step=ck.step)
    assert (tmp_path / "run" / "latest_checkpointed_iteration.txt").read_text() == str(ck.step)
    assert json.loads((step_dir / "actor" / "fsdp_config.json").read_text()) == {"FSDP_version": 2,
                                                                                 "world_size": world}
    assert (step_dir / "actor" / "huggingface" / "config.json").is_file()
    # validated and re-serialized, not copied (utils/checkpoint/safe_state.py): the same state, not the same bytes
    assert torch.load(step_dir / "data.pt", weights_only=True) == torch.load(ck.step_dir / "data.pt", weights_only=True)
    assert (step_dir / "curriculum_state.json").read_bytes() == (ck.step_dir / "curriculum_state.json").read_bytes()

    models = _gather(tmp_path / "run", ck.step, "model", world)
    assert list(models[0]) == list(truth["model"])  # model.state_dict() order and names
    for key, full in truth["model"].items():
        parts = [m[key] for m in models]
        assert all(type(p).__name__ == "DTensor" and p.device_mesh.size() == world for p in parts), key
        assert [tuple(p.to_local().shape) for p in parts] == [tuple(c.shape) for c in full.chunk(world)] + \
            [(0, *full.shape[1:])] * (world - len(full.chunk(world))), key
        assert torch.equal(torch.cat([p.to_local() for p in parts]), full), key
        # each rank file holds its own rows only (a saved view would drag the whole tensor into every file)
        assert all(p.to_local().untyped_storage().nbytes() == p.to_local().numel() * 4 for p in parts), key

    optims = _gather(tmp_path / "run", ck.step, "optim", world)
    true_opt = truth["optim"]
    names = true_opt["param_groups"][0]["params"]
    # veRL's loader hands this to optimizer.load_state_dict: ids 0..P-1 in parameters() order, same hyperparameters
    assert optims[0]["param_groups"][0]["params"] == list(range(len(names)))
    assert {k: v for k, v in optims[0]["param_groups"][0].items() if k != "params"} == \
        {k: v for k, v in true_opt["param_groups"][0].items() if k != "params"}
    for pid, name in enumerate(names):
        for k, v in true_opt["state"][name].items():
            got = [o["state"][pid][k] for o in optims]
            if v.ndim == 0:
                assert all(torch.equal(g, v) for g in got), (name, k)
            else:
                assert torch.equal(torch.cat([g.to_local() for g in got]), v), (name, k)

    if world == 3:  # the consolidation engine reads the resharded layout like any veRL checkpoint
        again = consolidate_checkpoint(step_dir / "actor", tmp_path / "again", dtype="fp32", progress=False)
        back = load_output_state_dict(again.out_dir)
        assert all(torch.equal(back[k], v) for k, v in truth["model"].items())

    extras = _gather(tmp_path / "run", ck.step, "extra_state", world)
    saved = [torch.load(ck.actor_dir / f"extra_state_world_size_2_rank_{r}.pt", weights_only=False) for r in (0, 1)]
    for e in extras:  # the world size changed: every rank continues rank 0's scheduler and RNG
        assert e["lr_scheduler"] == saved[0]["lr_scheduler"]
        assert torch.equal(e["rng"]["cpu"], saved[0]["rng"]["cpu"])


def test_trainer_state_lists_every_file_and_detects_tampering(snapshot, tmp_path):
    ck, snap = snapshot
    state = read_trainer_state(snap)
    assert state["global_step"] == ck.step and state["world_size"] == 2 and state["has_optimizer"]
    assert state["curriculum_levels"] == {"chain_sum": {"num_terms": 1}}
    assert {"optimizer.pt", "config.json", "resume/extra_state_rank_1.pt", "resume/data.pt"} <= set(state["files"])
    assert snapshot_problems(snap, state) == []
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(snap, copy)
    with open(copy / "optimizer.pt", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01")
    (copy / "resume" / "data.pt").unlink()
    assert snapshot_problems(copy, state) == ["optimizer.pt: sha256 differs from trainer_state.json",
                                              "resume/data.pt: missing"]


def test_reshard_refuses_an_existing_step_and_a_weights_only_folder(snapshot, tmp_path):
    ck, snap = snapshot
    (tmp_path / "run" / f"global_step_{ck.step}").mkdir(parents=True)
    with pytest.raises(ReshardError, match="already exists"):
        write_verl_checkpoint(snap, tmp_path / "run", 1, step=ck.step)
    import shutil

    shutil.copytree(snap, tmp_path / "w", ignore=shutil.ignore_patterns("optimizer.pt"))
    with pytest.raises(ReshardError, match="optimizer.pt"):
        write_verl_checkpoint(tmp_path / "w", tmp_path / "run2", 1, step=ck.step)
    assert not (tmp_path / "run2").exists() or not any((tmp_path / "run2").iterdir())


def test_reshard_keeps_tied_weights_tied(fsdp_checkpoints, tmp_path):
    """Tied embeddings (Qwen2.5 <= 3B): both names in every rank file, one storage, as FSDP2's state_dict has it."""
    ck = fsdp_checkpoints["w3_tied"]
    truth = load_ground_truth(ck)
    snap = tmp_path / "snap"
    consolidate_checkpoint(ck.actor_dir, snap, include_optimizer=True, dtype="fp32", progress=False)
    stage_resume_files(ck.step_dir, snap, step=ck.step, world_size=ck.world_size)
    write_verl_checkpoint(snap, tmp_path / "run", 2, step=ck.step)
    models = _gather(tmp_path / "run", ck.step, "model", 2)
    assert "lm_head.weight" in models[0] and list(models[0]) == list(truth["model"])
    for m in models:
        assert m["lm_head.weight"].to_local().data_ptr() == m["model.embed_tokens.weight"].to_local().data_ptr()
    for key, full in truth["model"].items():
        assert torch.equal(torch.cat([m[key].to_local() for m in models]), full), key
