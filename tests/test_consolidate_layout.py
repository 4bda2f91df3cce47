"""Layout detection and small validators, on directories of empty files (names are all detection reads)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from utils.checkpoint.errors import (
    MissingRankFileError,
    MixedWorldSizeError,
    NotACheckpointError,
    WorldSizeMismatchError,
)
from utils.checkpoint.layout import detect_layout, find_step_dirs, latest_step, resolve_actor_dir
from utils.checkpoint.model_config import resolve_dtype
from utils.checkpoint.writer import parse_size, plan_shards


def _actor(root: Path, step: int, world: int, *, optim: bool = True, cfg: dict | None = None) -> Path:
    actor = root / f"global_step_{step}" / "actor"
    actor.mkdir(parents=True)
    for r in range(world):
        (actor / f"model_world_size_{world}_rank_{r}.pt").touch()
        if optim:
            (actor / f"optim_world_size_{world}_rank_{r}.pt").touch()
    if cfg is not None:
        (actor / "fsdp_config.json").write_text(json.dumps(cfg))
    (actor / "huggingface").mkdir()
    return actor


def test_run_dir_step_dir_and_actor_dir_all_resolve(tmp_path):
    a10 = _actor(tmp_path, 10, 2)
    a20 = _actor(tmp_path, 20, 2)
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("10")
    assert find_step_dirs(tmp_path) == [(10, a10.parent), (20, a20.parent)]
    assert latest_step(tmp_path) == 10  # the tracker wins over the highest number
    assert resolve_actor_dir(tmp_path) == a10
    assert resolve_actor_dir(tmp_path, step=20) == a20
    assert resolve_actor_dir(a20.parent) == a20
    assert resolve_actor_dir(a20) == a20
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("30")  # stale tracker: fall back to the highest
    assert latest_step(tmp_path) == 20
    with pytest.raises(NotACheckpointError, match=r"no global_step_7 directory; steps present: \[10, 20\]"):
        resolve_actor_dir(tmp_path, step=7)


def test_latest_step_of_an_empty_or_missing_run_is_none(tmp_path):
    assert latest_step(tmp_path) is None and find_step_dirs(tmp_path / "nope") == []


def test_layout_reports_world_size_version_step_and_files(tmp_path):
    actor = _actor(tmp_path, 5, 3, cfg={"FSDP_version": 2, "world_size": 3})
    lay = detect_layout(actor)
    assert (lay.world_size, lay.fsdp_version, lay.step) == (3, 2, 5)
    assert [p.name for p in lay.model_files] == [f"model_world_size_3_rank_{r}.pt" for r in range(3)]
    assert len(lay.optim_files) == 3 and lay.hf_dir == actor / "huggingface"


def test_legacy_layout_without_fsdp_config_or_optimizer(tmp_path):
    lay = detect_layout(_actor(tmp_path, 1, 4, optim=False))
    assert (lay.world_size, lay.fsdp_version, lay.optim_files) == (4, None, ())


@pytest.mark.parametrize(
    "setup, exc, text",
    [
        (lambda a: (a / "model_world_size_4_rank_2.pt").unlink(), MissingRankFileError, "model_world_size_4_rank_2.pt"),
        (lambda a: (a / "model_world_size_2_rank_0.pt").touch(), MixedWorldSizeError, "W=2: 1 files, W=4: 4 files"),
        (lambda a: (a / "model_world_size_4_rank_4.pt").touch(), WorldSizeMismatchError, "rank(s) [4]"),
        (lambda a: (a / "fsdp_config.json").write_text('{"FSDP_version": 2, "world_size": 8}'),
         WorldSizeMismatchError, "says world_size=8"),
        (lambda a: [p.unlink() for p in a.glob("model_*")], NotACheckpointError, "no model_world_size_W_rank_r.pt"),
    ],
)
def test_layout_errors_name_the_files(tmp_path, setup, exc, text):
    actor = _actor(tmp_path, 3, 4)
    setup(actor)
    with pytest.raises(exc) as info:
        detect_layout(actor)
    assert text in str(info.value)


def test_a_directory_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "readme.txt").touch()
    with pytest.raises(NotACheckpointError, match="is not a veRL checkpoint"):
        detect_layout(tmp_path)
    with pytest.raises(NotACheckpointError, match="no such directory"):
        detect_layout(tmp_path / "missing")


@pytest.mark.parametrize("text, n", [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30),
                                     ("1.5 GB", 15 * 10**8), (1024, 1024), ("20kb", 20_000), ("123", 123)])
def test_parse_size_accepts(text, n):
    assert parse_size(text) == n


@pytest.mark.parametrize("text", ["", "GB", "-5GB", "5 parsecs", 0, "0MB"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError, match="max_shard_size"):
        parse_size(text)


@pytest.mark.parametrize("requested, config, stored, want", [
    ("auto", torch.bfloat16, torch.float32, torch.bfloat16),
    ("auto", None, torch.float32, torch.float32),
    ("fp32", torch.bfloat16, torch.float32, torch.float32),
    ("fp16", None, torch.float32, torch.float16),
    ("bf16", torch.float32, torch.float32, torch.bfloat16),
])
def test_resolve_dtype(requested, config, stored, want):
    assert resolve_dtype(requested, config, stored) == want


def test_shard_plan_keeps_model_order_and_sizes():
    specs = [(f"k{i}", (1000,), torch.float32) for i in range(5)]  # 4000 bytes each
    plan = plan_shards(specs, "safetensors", 9000)
    assert plan.files == {"model-00001-of-00003.safetensors": ["k0", "k1"],
                          "model-00002-of-00003.safetensors": ["k2", "k3"],
                          "model-00003-of-00003.safetensors": ["k4"]}
    assert plan.index_name == "model.safetensors.index.json" and plan.total_size == 20_000
    single = plan_shards(specs, "bin", "5GB")
    assert single.files == {"pytorch_model.bin": [f"k{i}" for i in range(5)]} and single.index_name is None


def test_safetensors_stream_writer_bytes_follow_the_format_exactly(tmp_path):
    """Golden bytes: u64 header length, JSON header padded with spaces to 8 bytes, then raw little-endian data."""
    import struct

    from safetensors.torch import load_file

    from utils.checkpoint.writer import SafetensorsStreamWriter

    a, b = torch.tensor([1.0, -2.0]), torch.tensor([[3]], dtype=torch.int64)
    with SafetensorsStreamWriter(tmp_path / "x.safetensors", [("b", (2,), torch.float32), ("a", (1, 1), torch.int64)]) as w:
        assert w.write("b", a) == 8
        assert w.write("a", b) == 8
    header = (b'{"__metadata__":{"format":"pt"},"b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
              b'"a":{"dtype":"I64","shape":[1,1],"data_offsets":[8,16]}}')
    header += b" " * (-len(header) % 8)
    want = struct.pack("<Q", len(header)) + header + struct.pack("<2f", 1.0, -2.0) + struct.pack("<q", 3)
    assert (tmp_path / "x.safetensors").read_bytes() == want
    loaded = load_file(tmp_path / "x.safetensors")
    assert torch.equal(loaded["b"], a) and torch.equal(loaded["a"], b)


def test_stream_writer_refuses_out_of_plan_tensors(tmp_path):
    from utils.checkpoint.errors import OutputVerificationError
    from utils.checkpoint.writer import SafetensorsStreamWriter

    with pytest.raises(OutputVerificationError, match=r"expected w \(2,\) torch.float32 next, got w \(3,\)"):
        with SafetensorsStreamWriter(tmp_path / "x.safetensors", [("w", (2,), torch.float32)]) as w:
            w.write("w", torch.zeros(3))


def test_docstring_examples_run():
    import doctest

    import utils.checkpoint.model_config
    import utils.checkpoint.writer

    for mod in (utils.checkpoint.writer, utils.checkpoint.model_config):
        result = doctest.testmod(mod)
        assert result.failed == 0 and result.attempted > 0, mod.__name__
