"""Every bad input gets a specific exception naming the file or key, a non-zero CLI exit, and nothing on disk.

Each case copies a real FSDP2 checkpoint, damages it one way, and runs both the Python API and the CLI.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._dtensor_spec import DTensorSpec
from torch.distributed.tensor.placement_types import Partial, _StridedShard

import utils.checkpoint.consolidate as engine
from utils.checkpoint.errors import (
    CheckpointError,
    CorruptShardError,
    FSDP1OptimizerError,
    InvalidModelConfigError,
    MissingKeyError,
    MissingModelConfigError,
    MissingRankFileError,
    MixedWorldSizeError,
    NotACheckpointError,
    OutputExistsError,
    OutputNotWritableError,
    ReplicaMismatchError,
    ShapeMismatchError,
    UnsupportedPlacementError,
    WorldSizeMismatchError,
)
from utils.checkpoint.merge import load_rank_file
from utils.load_fsdp_to_hf import consolidate_checkpoint

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _copy_actor(fsdp_checkpoints, case: str, tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt" / "global_step_2" / "actor"
    shutil.copytree(fsdp_checkpoints[case].actor_dir, dst)
    return dst


def _rewrite(path: Path, fn) -> None:
    sd = load_rank_file(path)
    fn(sd)
    torch.save(sd, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)


def _with_placement(v: DTensor, placement) -> DTensor:
    spec = DTensorSpec(v.device_mesh, (placement,) * len(v.placements), tensor_meta=v._spec.tensor_meta)
    return DTensor(v.to_local().clone(), spec, requires_grad=False)


def _damage(name: str, actor: Path) -> None:
    if name == "missing_rank":
        (actor / "model_world_size_3_rank_1.pt").unlink()
    elif name == "truncated":
        p = actor / "model_world_size_3_rank_2.pt"
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    elif name == "garbage":
        (actor / "model_world_size_3_rank_0.pt").write_bytes(b"\x00" * 4096)
    elif name == "world_size_disagrees":
        (actor / "fsdp_config.json").write_text(json.dumps({"FSDP_version": 2, "world_size": 4}))
    elif name == "mixed_world_sizes":
        shutil.copyfile(actor / "model_world_size_3_rank_0.pt", actor / "model_world_size_2_rank_0.pt")
    elif name == "not_a_checkpoint":
        for p in actor.glob("*.pt"):
            p.unlink()
    elif name == "shape_vs_config":
        cfg = json.loads((actor / "huggingface" / "config.json").read_text())
        cfg["intermediate_size"] = 40
        (actor / "huggingface" / "config.json").write_text(json.dumps(cfg))
    elif name == "key_vs_config":
        cfg = json.loads((actor / "huggingface" / "config.json").read_text())
        cfg["num_hidden_layers"] = 3
        cfg["layer_types"] = ["full_attention"] * 3
        (actor / "huggingface" / "config.json").write_text(json.dumps(cfg))
    elif name in ("partial", "strided"):
        placement = Partial() if name == "partial" else _StridedShard(0, split_factor=2)
        for r in range(3):
            _rewrite(actor / f"model_world_size_3_rank_{r}.pt",
                     lambda sd: sd.__setitem__("model.norm.weight", _with_placement(sd["model.norm.weight"],
                                                                                    placement)))
    elif name == "invalid_config":
        (actor / "huggingface" / "config.json").write_text('{"model_type": "qwen2", "num_hidden_layers": "many"')
    elif name == "no_config":
        shutil.rmtree(actor / "huggingface")
    else:
        raise AssertionError(name)


CASES = {
    # name: (exception, text the message must contain)
    "missing_rank": (MissingRankFileError, "model_world_size_3_rank_1.pt"),
    "truncated": (CorruptShardError, "model_world_size_3_rank_2.pt"),
    "garbage": (CorruptShardError, "model_world_size_3_rank_0.pt"),
    "world_size_disagrees": (WorldSizeMismatchError, "fsdp_config.json says world_size=4"),
    "mixed_world_sizes": (MixedWorldSizeError, "W=2: 1 files, W=3: 3 files"),
    "not_a_checkpoint": (NotACheckpointError, "is not a veRL checkpoint"),
    "shape_vs_config": (ShapeMismatchError, "model.layers.0.mlp.gate_proj.weight"),
    "key_vs_config": (MissingKeyError, "model.layers.2."),
    "partial": (UnsupportedPlacementError, "model.norm.weight"),
    "strided": (UnsupportedPlacementError, "_StridedShard"),
    "no_config": (MissingModelConfigError, "--base-model"),
    "invalid_config": (InvalidModelConfigError, "huggingface/config.json: transformers cannot build the model"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_checkpoint_raises_a_specific_error_and_leaves_nothing(fsdp_checkpoints, tmp_path, name):
    actor = _copy_actor(fsdp_checkpoints, "w3_tied", tmp_path)
    _damage(name, actor)
    exc, text = CASES[name]
    out = tmp_path / "outputs" / "model"
    with pytest.raises(exc, match=None) as info:
        consolidate_checkpoint(actor, out, progress=False)
    assert text in str(info.value)
    assert isinstance(info.value, CheckpointError)
    assert not out.exists() and (not out.parent.exists() or not any(out.parent.iterdir()))


@pytest.mark.parametrize("name", ["missing_rank", "partial"])
def test_cli_exits_non_zero_with_the_message_on_stderr(fsdp_checkpoints, tmp_path, name):
    actor = _copy_actor(fsdp_checkpoints, "w3_tied", tmp_path)
    _damage(name, actor)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "utils/load_fsdp_to_hf.py", str(actor), str(out), "--quiet"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 1
    exc, text = CASES[name]
    assert f"error: {exc.__name__}: " in proc.stderr and text in proc.stderr
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_non_empty_output_is_refused_without_overwrite(fsdp_checkpoints, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        consolidate_checkpoint(fsdp_checkpoints["w1_tied"].actor_dir, out, progress=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_unwritable_output_location(fsdp_checkpoints, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")  # root ignores permissions; a file in the path does not
    with pytest.raises(OutputNotWritableError, match=str(blocker)):
        consolidate_checkpoint(fsdp_checkpoints["w1_tied"].actor_dir, blocker / "out", progress=False)


def test_interrupt_while_writing_leaves_nothing_behind(fsdp_checkpoints, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "copy_side_files", interrupted)  # after the weights are written
    with pytest.raises(KeyboardInterrupt):
        consolidate_checkpoint(fsdp_checkpoints["w3_tied"].actor_dir, tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def _plain_ranks(fsdp_checkpoints, tmp_path: Path, *, differ: bool) -> Path:
    """Two rank files holding plain (replicated) full tensors, as some older savers wrote buffers."""
    src = fsdp_checkpoints["plain_w1"].actor_dir
    actor = tmp_path / "plain2" / "actor"
    shutil.copytree(src, actor)
    sd = torch.load(actor / "model_world_size_1_rank_0.pt", weights_only=True)
    (actor / "model_world_size_1_rank_0.pt").unlink()
    torch.save(sd, actor / "model_world_size_2_rank_0.pt")
    if differ:
        sd = dict(sd)
        sd["model.norm.weight"] = sd["model.norm.weight"] + 1
    torch.save(sd, actor / "model_world_size_2_rank_1.pt")
    return actor


def test_plain_tensors_are_taken_as_replicated_never_concatenated(fsdp_checkpoints, tmp_path):
    from tests.consolidation_checks import assert_weights_equal, load_ground_truth

    actor = _plain_ranks(fsdp_checkpoints, tmp_path, differ=False)
    res = consolidate_checkpoint(actor, tmp_path / "out", progress=False)
    assert res.world_size == 2
    assert_weights_equal(res.out_dir, load_ground_truth(fsdp_checkpoints["plain_w1"])["model"], tied=True)


def test_plain_tensors_that_differ_between_ranks_are_refused(fsdp_checkpoints, tmp_path):
    actor = _plain_ranks(fsdp_checkpoints, tmp_path, differ=True)
    with pytest.raises(ReplicaMismatchError, match=r"model\.norm\.weight.*model_world_size_2_rank_1\.pt"):
        consolidate_checkpoint(actor, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_fsdp1_optimizer_is_refused_with_an_explanation(fsdp_checkpoints, tmp_path):
    actor = _copy_actor(fsdp_checkpoints, "w3_tied", tmp_path)
    (actor / "fsdp_config.json").write_text(json.dumps({"FSDP_version": 1, "world_size": 3}))
    with pytest.raises(FSDP1OptimizerError, match="flat parameter"):
        consolidate_checkpoint(actor, tmp_path / "out", include_optimizer=True, progress=False)
    assert not (tmp_path / "out").exists()


def test_flat_parameter_optimizer_state_is_refused_even_without_fsdp_config(fsdp_checkpoints, tmp_path):
    actor = _copy_actor(fsdp_checkpoints, "w3_tied", tmp_path)
    (actor / "fsdp_config.json").unlink()
    for r in range(3):  # FSDP1 (use_orig_params=False): one padded 1-D flat shard per wrapped unit, plain tensors
        p = actor / f"optim_world_size_3_rank_{r}.pt"
        flat = {"state": {0: {"step": torch.tensor(2.0), "exp_avg": torch.zeros(1234), "exp_avg_sq": torch.zeros(1234)}},
                "param_groups": [{"lr": 1e-3, "params": list(range(26))}]}
        torch.save(flat, p)
    with pytest.raises(FSDP1OptimizerError, match=r"flat-parameter shard"):
        consolidate_checkpoint(actor, tmp_path / "out", include_optimizer=True, progress=False)


def test_bad_arguments_are_value_errors():
    with pytest.raises(ValueError, match="weights_format='gguf'"):
        consolidate_checkpoint("x", "y", weights_format="gguf")
    with pytest.raises(ValueError, match="dtype='int4'"):
        consolidate_checkpoint("x", "y", dtype="int4")
    with pytest.raises(ValueError, match="max_shard_size='lots'"):
        consolidate_checkpoint("x", "y", max_shard_size="lots")


@pytest.mark.parametrize("differ", [False, True])
def test_tied_weights_saved_twice_must_agree(fsdp_checkpoints, tmp_path, differ):
    from utils.checkpoint.errors import TiedWeightMismatchError

    actor = tmp_path / "tied" / "actor"
    shutil.copytree(fsdp_checkpoints["plain_w1"].actor_dir, actor)
    p = actor / "model_world_size_1_rank_0.pt"
    sd = torch.load(p, weights_only=True)
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone() + (1e-3 if differ else 0)  # a separate storage
    torch.save(sd, p)
    if differ:
        with pytest.raises(TiedWeightMismatchError, match=r"lm_head\.weight and model\.embed_tokens\.weight"):
            consolidate_checkpoint(actor, tmp_path / "out", progress=False)
        assert not (tmp_path / "out").exists()
    else:
        res = consolidate_checkpoint(actor, tmp_path / "out", progress=False)
        assert "lm_head.weight" not in torch.load(res.out_dir / "pytorch_model.bin", weights_only=True)
