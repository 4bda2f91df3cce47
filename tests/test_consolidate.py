"""Consolidation of real FSDP2 shards (written by gloo processes) against the full tensors those processes gathered."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from tests.consolidation_checks import (
    CASES,
    DERIVED,
    assert_logits_equal,
    assert_weights_equal,
    load_ground_truth,
)
from utils.load_fsdp_to_hf import consolidate_checkpoint

pytestmark = pytest.mark.slow  # the first use of each case spawns FSDP processes


@pytest.mark.parametrize("case", [*CASES, *DERIVED])
def test_merged_weights_equal_the_gathered_full_tensors(fsdp_checkpoints, tmp_path, case):
    ck = fsdp_checkpoints[case]
    res = consolidate_checkpoint(ck.actor_dir, tmp_path / "out", dtype="fp32", progress=False)
    assert res.world_size == ck.world_size and res.step == ck.step and res.dtype == "float32"
    assert_weights_equal(res.out_dir, load_ground_truth(ck)["model"], tied=ck.tied)
    assert res.weight_files == ["pytorch_model.bin"]
    assert (res.out_dir / "pytorch_model.bin").stat().st_size > 0


@pytest.mark.parametrize("weights_format", ["bin", "safetensors"])
@pytest.mark.parametrize("case", ["w3_tied", "w4_untied"])
def test_from_pretrained_gives_the_reference_logits_exactly_in_fp32(fsdp_checkpoints, tmp_path, case,
                                                                     weights_format):
    ck = fsdp_checkpoints[case]
    out = tmp_path / "out"
    # A small shard size forces several files plus an index, in both formats.
    consolidate_checkpoint(ck.actor_dir, out, weights_format=weights_format, max_shard_size="20KB", progress=False)
    index = json.loads((out / ("pytorch_model.bin.index.json" if weights_format == "bin"
                               else "model.safetensors.index.json")).read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert list(index["weight_map"]) == sorted(index["weight_map"])
    gt = load_ground_truth(ck)["model"]
    assert index["metadata"]["total_size"] == sum(
        v.numel() * v.element_size() for k, v in gt.items() if not (ck.tied and k == "lm_head.weight"))
    assert_logits_equal(out, gt, ck.actor_dir / "huggingface")


@pytest.mark.parametrize("weights_format", ["bin", "safetensors"])
def test_bf16_output_matches_within_bf16_tolerance(fsdp_checkpoints, tmp_path, weights_format):
    ck = fsdp_checkpoints["w2_untied"]
    res = consolidate_checkpoint(ck.actor_dir, tmp_path / "out", weights_format=weights_format, dtype="bf16",
                                 progress=False)
    gt = load_ground_truth(ck)["model"]
    assert_weights_equal(res.out_dir, gt, tied=False, dtype=torch.bfloat16)  # bitwise = gt.to(bf16)
    assert json.loads((res.out_dir / "config.json").read_text())["dtype"] == "bfloat16"
    assert_logits_equal(res.out_dir, gt, ck.actor_dir / "huggingface", atol=5e-2)


def test_safetensors_files_carry_format_pt_metadata(fsdp_checkpoints, tmp_path):
    from safetensors import safe_open

    ck = fsdp_checkpoints["w3_tied"]
    res = consolidate_checkpoint(ck.actor_dir, tmp_path / "out", weights_format="safetensors", progress=False)
    assert res.weight_files == ["model.safetensors"]
    with safe_open(res.out_dir / "model.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert "lm_head.weight" not in f.keys()  # tied: stored once, under the embedding's name


def test_auto_dtype_follows_the_checkpoint_config_and_logs_the_cast(fsdp_checkpoints, tmp_path, caplog):
    src = fsdp_checkpoints["w2_untied"]
    # veRL's usual situation: fp32 master weights, a base model config that says bfloat16.
    cfg_path = src.actor_dir / "huggingface" / "config.json"
    hf = tmp_path / "hf"
    hf.mkdir()
    cfg = json.loads(cfg_path.read_text())
    cfg["dtype"] = "bfloat16"
    (hf / "config.json").write_text(json.dumps(cfg))
    actor = tmp_path / "global_step_2" / "actor"
    actor.mkdir(parents=True)
    for p in src.actor_dir.glob("*.pt"):
        (actor / p.name).symlink_to(p)
    with caplog.at_level(logging.INFO, logger="utils.load_fsdp_to_hf"):
        res = consolidate_checkpoint(actor, tmp_path / "out", base_model=hf, progress=False)
    assert res.dtype == "bfloat16" and res.source_dtype == "float32"
    assert "casting weights torch.float32 -> torch.bfloat16 (config.json says torch.bfloat16)" in caplog.text
    assert json.loads((res.out_dir / "config.json").read_text())["dtype"] == "bfloat16"
    assert_weights_equal(res.out_dir, load_ground_truth(src)["model"], tied=False, dtype=torch.bfloat16)


def test_side_files_are_copied_verbatim_and_weights_in_huggingface_dir_are_not(fsdp_checkpoints, tmp_path):
    ck = fsdp_checkpoints["w3_tied"]
    hf = ck.actor_dir / "huggingface"
    stray = hf / "model.safetensors"  # veRL's save_contents=['hf_model'] leaves full weights here
    stray.write_bytes(b"not to be copied")
    try:
        res = consolidate_checkpoint(ck.actor_dir, tmp_path / "out", progress=False)
    finally:
        stray.unlink()
    out = res.out_dir
    for name in ["generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]:
        assert (out / name).read_bytes() == (hf / name).read_bytes(), name
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [1, 5] and gen["temperature"] == 0.7 and gen["top_p"] == 0.8
    assert not (out / "model.safetensors").exists()
    cfg, src_cfg = json.loads((out / "config.json").read_text()), json.loads((hf / "config.json").read_text())
    assert {k: v for k, v in cfg.items() if k != "dtype"} == {k: v for k, v in src_cfg.items() if k != "dtype"}
    assert sorted(res.files) == sorted(["pytorch_model.bin", "config.json", "generation_config.json",
                                        "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"])


def test_run_directory_resolves_to_the_latest_step_and_verify_passes(fsdp_checkpoints, tmp_path):
    ck = fsdp_checkpoints["hsdp2x2_tied"]
    res = consolidate_checkpoint(ck.root, tmp_path / "out", weights_format="safetensors", verify=True,
                                 progress=False)
    assert res.step == ck.step and res.world_size == 4
    assert_weights_equal(res.out_dir, load_ground_truth(ck)["model"], tied=True)


def test_overwrite_replaces_a_previous_output(fsdp_checkpoints, tmp_path):
    ck = fsdp_checkpoints["w1_tied"]
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("stale")
    res = consolidate_checkpoint(ck.actor_dir, out, overwrite=True, progress=False)
    assert not (out / "old.txt").exists() and (out / "pytorch_model.bin").is_file()
    assert res.out_dir == out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp or backup folder left beside it


def test_cli_as_module_prints_progress_on_stderr_and_a_summary_line(fsdp_checkpoints, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    ck = fsdp_checkpoints["w3_tied"]
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "utils.load_fsdp_to_hf", str(ck.actor_dir), str(out), "--format",
                           "safetensors", "--dtype", "bf16", "--optimizer"], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"consolidated step 2 (W=3, float32) -> {out}: 26 tensors, "
                                                   "1 weight file(s), bfloat16")
    assert "+ optimizer.pt" in lines[0]
    assert "consolidating: 100%" in proc.stderr and "casting weights torch.float32 -> torch.bfloat16" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["model.safetensors", "optimizer.pt", "config.json", "generation_config.json", "tokenizer.json",
         "tokenizer_config.json", "chat_template.jinja"])
