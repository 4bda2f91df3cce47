"""LoRA checkpoints: the merge formula against PEFT's own ``merge_and_unload``, and real FSDP2 LoRA shards (written
by gloo processes exactly as veRL's LoRA path saves them) consolidated into a PEFT adapter, a merged model, or both.

Ground truth is PEFT itself, run on the full state gathered by torch's collectives in the writer processes:
``get_peft_model_state_dict`` (the adapter) and ``merge_and_unload`` (the merged weights).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
LORA_R, LORA_ALPHA = 4, 8.0


def _tiny_peft_model(seed: int, *, tied: bool = False):
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=67, hidden_size=24, head_dim=8, num_attention_heads=3, num_key_value_heads=1,
                         intermediate_size=29, num_hidden_layers=2, tie_word_embeddings=tied)
    model = get_peft_model(Qwen2ForCausalLM(config).float(), LoraConfig(
        task_type=TaskType.CAUSAL_LM, r=LORA_R, lora_alpha=LORA_ALPHA, target_modules="all-linear", bias="none"))
    with torch.no_grad():  # PEFT initialises B = 0 (a no-op adapter): make both factors random
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
    return model


# ----- the formula, no FSDP -----

@pytest.mark.parametrize("seed", [0, 1])
def test_merge_formula_equals_peft_merge_and_unload_bitwise_in_fp32(seed):
    from utils.checkpoint.lora import merge_lora_weight

    model = _tiny_peft_model(seed)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = {k.removesuffix(".lora_A.default.weight") for k in state if k.endswith(".lora_A.default.weight")}
    assert len(modules) == 14  # 7 linear layers x 2 decoder layers
    with torch.no_grad():
        reference = model.merge_and_unload().state_dict()
    for module in sorted(modules):
        hf = module.removeprefix("base_model.model.") + ".weight"
        merged = merge_lora_weight(state[f"{module}.base_layer.weight"], state[f"{module}.lora_A.default.weight"],
                                   state[f"{module}.lora_B.default.weight"], LORA_ALPHA / LORA_R)
        assert merged.dtype == torch.float32
        assert torch.equal(merged, reference[hf]), (hf, (merged - reference[hf]).abs().max())


def test_merge_in_fp32_then_one_cast_to_bf16():
    from utils.checkpoint.lora import merge_lora_weight

    torch.manual_seed(3)
    w, a, b = torch.randn(16, 12), torch.randn(4, 12), torch.randn(16, 4)
    expected = (w + (b @ a) * 2.0).to(torch.bfloat16)  # fp32 arithmetic, one rounding at the end
    got = merge_lora_weight(w.to(torch.bfloat16).float(), a, b, 2.0, dtype=torch.bfloat16)
    assert got.dtype == torch.bfloat16
    assert torch.equal(merge_lora_weight(w, a, b, 2.0, dtype=torch.bfloat16), expected)
    assert got.shape == w.shape


def test_target_modules_are_leaf_names_only_where_that_is_exact():
    from utils.checkpoint.lora import _target_modules

    base = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.0.mlp.up_proj",
            "model.layers.1.mlp.up_proj", "lm_head"]
    assert _target_modules(["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"], base) == ["q_proj"]
    # only layer 1's up_proj is adapted: a leaf name would also adapt layer 0's
    assert _target_modules(["model.layers.1.mlp.up_proj"], base) == ["model.layers.1.mlp.up_proj"]
    assert _target_modules(["x.q_proj"], None) == ["x.q_proj"]


def test_peft_key_names():
    from utils.checkpoint.lora import hf_name, is_lora_checkpoint, peft_adapter_key

    key = "base_model.model.model.layers.3.mlp.down_proj.lora_B.default.weight"
    assert peft_adapter_key(key) == "base_model.model.model.layers.3.mlp.down_proj.lora_B.weight"
    assert hf_name("base_model.model.lm_head.weight") == "lm_head.weight"
    assert is_lora_checkpoint([key]) and not is_lora_checkpoint(["model.layers.0.mlp.down_proj.weight"])


# ----- real FSDP2 LoRA shards -----

def _truth(ck) -> dict:
    return torch.load(ck.ground_truth_path, weights_only=True)


def _base_model(ck, truth):
    """The base model as trained (frozen weights), built from the gathered state: PEFT names -> HF names."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ck.actor_dir / "huggingface"),
                                             dtype=torch.float32)
    base = {k.removeprefix("base_model.model.").replace(".base_layer.", "."): v for k, v in truth["model"].items()
            if "lora_" not in k}
    missing, unexpected = model.load_state_dict(base, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    return model.eval()


IDS = torch.arange(3, 3 + 2 * 11).reshape(2, 11)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["lora_w2", "lora_w3_tied"])
def test_adapter_and_merged_equal_peft_bitwise_and_load_with_peft(fsdp_checkpoints, tmp_path, case):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from tests.consolidation_checks import load_output_state_dict
    from utils.load_fsdp_to_hf import consolidate_checkpoint

    ck = fsdp_checkpoints[case]
    truth = _truth(ck)
    res = consolidate_checkpoint(ck.root, tmp_path / "out", lora="both", weights_format="safetensors", dtype="fp32",
                                 include_optimizer=True, lora_base_model="Qwen/base-of-test", verify=True,
                                 progress=False)
    assert res.lora == {"mode": "both", "r": LORA_R, "lora_alpha": 8, "num_adapted_modules": 14,
                        "target_modules": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj",
                                           "v_proj"], "task_type": "CAUSAL_LM",
                        "base_model_name_or_path": "Qwen/base-of-test", "adapter_dir": "adapter"}
    # merged: PEFT's merge_and_unload, bit for bit (tied lm_head stored once)
    merged = load_output_state_dict(res.out_dir)
    want = {k: v for k, v in truth["lora"]["merged"].items() if not (ck.tied and k == "lm_head.weight")}
    assert sorted(merged) == sorted(want)
    for k, v in want.items():
        assert torch.equal(merged[k], v), k
    # adapter: PEFT's own adapter state dict, bit for bit, and PEFT's config fields
    adapter_dir = res.out_dir / "adapter"
    assert sorted(p.name for p in adapter_dir.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    adapter = load_file(adapter_dir / "adapter_model.safetensors")
    assert sorted(adapter) == sorted(truth["lora"]["adapter"])
    for k, v in adapter.items():
        assert torch.equal(v, truth["lora"]["adapter"][k]), k
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["base_model_name_or_path"], cfg["peft_type"]) == (
        4, 8, "Qwen/base-of-test", "LORA")
    # PeftModel.from_pretrained(base, folder) and the merged model give the same logits; tolerance: fp32 rounding
    # of x@W + (x@A^T@B^T)*s (PEFT's unmerged forward) vs x@(W + B@A*s) (the merged weight): ~1e-6 at these sizes.
    peft_model = PeftModel.from_pretrained(_base_model(ck, truth), adapter_dir).eval()
    loaded = AutoModelForCausalLM.from_pretrained(res.out_dir).eval()
    with torch.no_grad():
        via_peft = peft_model(input_ids=IDS % loaded.config.vocab_size).logits
        via_merged = loaded(input_ids=IDS % loaded.config.vocab_size).logits
    torch.testing.assert_close(via_merged, via_peft, atol=1e-5, rtol=0)
    # optimizer.pt: the LoRA parameters only, name-keyed, equal to torch's gathered full optimizer state
    optim = torch.load(res.out_dir / "optimizer.pt", weights_only=True)
    lora_names = sorted(k for k in truth["model"] if "lora_" in k)
    assert sorted(optim["state"]) == lora_names == sorted(optim["param_groups"][0]["params"])
    for name, st in optim["state"].items():
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(st[k], truth["optim"]["state"][name][k]), (name, k)
        assert float(st["step"]) == 2.0


@pytest.mark.slow
def test_adapter_mode_writes_a_peft_folder_that_auto_loads_and_matches_peft_logits(fsdp_checkpoints, tmp_path):
    from peft import PeftModel

    from utils.load_fsdp_to_hf import consolidate_checkpoint

    ck = fsdp_checkpoints["lora_w2"]
    truth = _truth(ck)
    res = consolidate_checkpoint(ck.actor_dir, tmp_path / "adapter", lora="adapter", dtype="fp32", progress=False)
    names = sorted(p.name for p in res.out_dir.iterdir())
    assert "adapter_config.json" in names and "adapter_model.safetensors" in names
    assert "config.json" not in names and "tokenizer_config.json" in names  # a PEFT folder, with the tokenizer
    assert res.weight_files == ["adapter_model.safetensors"] and res.lora["adapter_dir"] == "."
    peft_model = PeftModel.from_pretrained(_base_model(ck, truth), res.out_dir).eval()
    from transformers import AutoConfig, AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ck.actor_dir / "huggingface"),
                                                 dtype=torch.float32)
    reference.load_state_dict(truth["lora"]["merged"], strict=False)
    with torch.no_grad():
        got = peft_model(input_ids=IDS % 101).logits
        want = reference.eval()(input_ids=IDS % 101).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_missing_alpha_is_an_error_naming_the_field_and_the_flag(fsdp_checkpoints, tmp_path):
    from utils.checkpoint.lora import LoraMetadataError
    from utils.load_fsdp_to_hf import consolidate_checkpoint

    ck = fsdp_checkpoints["lora_w2_nometa"]
    with pytest.raises(LoraMetadataError, match=r"^lora_alpha: unknown .*--lora-alpha") as err:
        consolidate_checkpoint(ck.root, tmp_path / "out", lora="merged", progress=False)
    assert "lora_train_meta.json is missing" in str(err.value)
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []  # nothing half-written
    # the flag supplies it, and the result is PEFT's merge
    res = consolidate_checkpoint(ck.root, tmp_path / "out", lora="merged", lora_alpha=8, dtype="fp32",
                                 weights_format="safetensors", progress=False)
    from tests.consolidation_checks import load_output_state_dict

    merged = load_output_state_dict(res.out_dir)
    assert all(torch.equal(v, _truth(ck)["lora"]["merged"][k]) for k, v in merged.items())
    # a rank that contradicts the shards is refused, naming the field
    with pytest.raises(LoraMetadataError, match=r"^r: --lora-rank says 8, but the LoRA matrices .* have rank 4"):
        consolidate_checkpoint(ck.root, tmp_path / "out2", lora_alpha=8, lora_rank=8, progress=False)


@pytest.mark.slow
def test_cli_reports_missing_alpha_in_one_line_and_exits_1(fsdp_checkpoints, tmp_path):
    ck = fsdp_checkpoints["lora_w2_nometa"]
    proc = subprocess.run([sys.executable, "-m", "utils.load_fsdp_to_hf", str(ck.root), str(tmp_path / "o"),
                           "--lora", "both", "--quiet"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: LoraMetadataError: lora_alpha: unknown") and "--lora-alpha" in proc.stderr
    assert proc.stderr.count("\n") == 1
    ok = subprocess.run([sys.executable, "-m", "utils.load_fsdp_to_hf", str(ck.root), str(tmp_path / "o"),
                         "--lora", "both", "--lora-alpha", "8", "--quiet"], cwd=REPO, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "[LoRA r=4 alpha=8: both]" in ok.stdout
    assert (tmp_path / "o" / "adapter" / "adapter_config.json").is_file()


@pytest.mark.slow
def test_adapters_only_checkpoint_gives_the_adapter_and_refuses_a_merge(fsdp_checkpoints, tmp_path):
    from safetensors.torch import load_file

    from utils.checkpoint.lora import LoraError
    from utils.load_fsdp_to_hf import consolidate_checkpoint

    ck = fsdp_checkpoints["lora_only_w2"]
    truth = _truth(ck)
    with pytest.raises(LoraError, match="adapters only .*--lora adapter"):
        consolidate_checkpoint(ck.root, tmp_path / "m", lora="merged", progress=False)
    res = consolidate_checkpoint(ck.root, tmp_path / "a", lora="adapter", include_optimizer=True, progress=False)
    adapter = load_file(res.out_dir / "adapter_model.safetensors")
    assert all(torch.equal(v, truth["lora"]["adapter"][k]) for k, v in adapter.items())
    optim = torch.load(res.out_dir / "optimizer.pt", weights_only=True)
    assert sorted(optim["state"]) == sorted(k for k in truth["model"] if "lora_" in k)
    for name, st in optim["state"].items():
        assert torch.equal(st["exp_avg"], truth["optim"]["state"][name]["exp_avg"]), name


def test_bad_lora_mode_is_a_value_error(tmp_path):
    from utils.load_fsdp_to_hf import consolidate_checkpoint

    with pytest.raises(ValueError, match="lora='adapters': expected one of adapter, merged, both"):
        consolidate_checkpoint(tmp_path, tmp_path / "out", lora="adapters")


@pytest.mark.slow
def test_lora_snapshot_reshards_into_verls_adapters_only_layout_at_another_world_size(fsdp_checkpoints, tmp_path):
    """Consolidate (adapter + LoRA optimizer) -> resume snapshot -> veRL's per-rank files at W=3: what veRL's
    FSDPCheckpointManager.load_checkpoint reads (adapters-only model shards, AdamW ids over every PeftModel
    parameter). The rows of every rank, put back together, are the gathered ground truth."""
    from torch.distributed.tensor import DTensor

    from utils.checkpoint.reshard import write_verl_checkpoint
    from utils.checkpoint.reshard_lora import find_adapter, peft_parameters
    from utils.hub.resume_state import stage_resume_files
    from utils.load_fsdp_to_hf import consolidate_checkpoint

    ck = fsdp_checkpoints["lora_w2"]
    truth = _truth(ck)
    snap = tmp_path / "snap"
    consolidate_checkpoint(ck.root, snap, lora="adapter", dtype="fp32", include_optimizer=True, progress=False)
    stage_resume_files(ck.step_dir, snap, step=2, world_size=2)
    step_dir = write_verl_checkpoint(snap, tmp_path / "run", 3, step=2, base_model=ck.actor_dir / "huggingface")
    actor = step_dir / "actor"
    assert json.loads((actor / "lora_train_meta.json").read_text())["r"] == LORA_R
    assert (actor / "huggingface" / "config.json").is_file()
    assert not list((actor / "huggingface").glob("adapter_*"))
    ranks = [torch.load(actor / f"model_world_size_3_rank_{r}.pt", weights_only=True) for r in range(3)]
    lora_names = sorted(k for k in truth["model"] if "lora_" in k)
    assert sorted(ranks[0]) == lora_names  # adapters only: veRL loads them with strict=False over the base model
    for name in lora_names:
        assert all(isinstance(sd[name], DTensor) for sd in ranks)
        full = torch.cat([sd[name].to_local() for sd in ranks])
        assert torch.equal(full, truth["model"][name]), name
    params = [n for n, _ in peft_parameters(ck.actor_dir / "huggingface", find_adapter(snap).config)]
    assert params == list(truth["model"])  # PEFT's parameters() order = the saved state dict's (untied model)
    optims = [torch.load(actor / f"optim_world_size_3_rank_{r}.pt", weights_only=True) for r in range(3)]
    assert optims[0]["param_groups"][0]["params"] == list(range(len(params)))
    assert sorted(params[i] for i in optims[0]["state"]) == lora_names
    for i, st in optims[0]["state"].items():
        exp_avg = torch.cat([o["state"][i]["exp_avg"].to_local() for o in optims])
        assert torch.equal(exp_avg, truth["optim"]["state"][params[i]]["exp_avg"]), params[i]
        assert float(st["step"]) == 2.0
    assert optims[0]["param_groups"][0]["lr"] == truth["optim"]["param_groups"][0]["lr"]
