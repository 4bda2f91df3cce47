"""LoRA on the Hub side, without I/O: the model card (metadata parsed back by huggingface_hub, a load snippet that
runs), the uploader's ``lora`` option, managed adapter files, and the resume checks' field-by-field messages."""

from __future__ import annotations

import doctest
import importlib

import pytest

from utils.hf_uploader import HuggingFaceUploader
from utils.hub.card import CardInfo, is_generated_card, render_model_card
from utils.hub.errors import InvalidUploadConfigError
from utils.hub.push import _is_managed

LORA = {"mode": "adapter", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
        "base_model_name_or_path": "Qwen/Qwen2.5-1.5B", "adapter_dir": "."}


def _card(**lora_overrides):
    return render_model_card(CardInfo(repo_id="acme/qwen-lora", step=30, revision="step-30",
                                      base_model="Qwen/Qwen2.5-1.5B", lora={**LORA, **lora_overrides}))


def test_adapter_card_is_peft_metadata_with_base_rank_alpha_targets_and_a_peft_snippet():
    from huggingface_hub import ModelCard

    text = _card()
    data = ModelCard(text).data.to_dict()  # parsed by huggingface_hub, not by our code
    assert data["library_name"] == "peft" and data["base_model"] == "Qwen/Qwen2.5-1.5B"
    assert {"verl", "grpo", "lora", "peft"} <= set(data["tags"])
    assert "| base model | [Qwen/Qwen2.5-1.5B](https://huggingface.co/Qwen/Qwen2.5-1.5B) |" in text
    assert "| LoRA rank r | 8 |" in text and "| LoRA alpha | 16 |" in text and "| LoRA scale alpha/r | 2 |" in text
    assert "| LoRA target modules | `q_proj`, `v_proj` |" in text
    assert 'base = AutoModelForCausalLM.from_pretrained("Qwen/Qwen2.5-1.5B")' in text
    assert 'model = PeftModel.from_pretrained(base, "acme/qwen-lora", revision="step-30")' in text
    assert is_generated_card(text)


def test_both_card_loads_merged_at_the_root_and_the_adapter_from_its_subfolder():
    text = _card(mode="both", adapter_dir="adapter")
    assert 'model = AutoModelForCausalLM.from_pretrained("acme/qwen-lora", revision="step-30")' in text
    assert 'PeftModel.from_pretrained(base, "acme/qwen-lora", revision="step-30", subfolder="adapter")' in text
    assert "library_name: transformers" in text
    ns = render_model_card(CardInfo(repo_id="a/m", step=2, revision="exp-step-2", subfolder="exp",
                                    lora={**LORA, "mode": "both", "adapter_dir": "adapter"}))
    assert 'subfolder="exp/adapter"' in ns and 'from_pretrained("a/m", revision="exp-step-2", subfolder="exp")' in ns


def test_merged_card_is_a_plain_transformers_card_that_says_lora():
    text = _card(mode="merged", adapter_dir=None)
    assert "PeftModel" not in text and "| fine-tuning | LoRA, merged into the base weights |" in text
    assert "- lora" in text and "- peft" not in text


def test_card_snippet_executes_against_stand_ins():
    """The PEFT snippet is real Python: run it with stand-in classes recording the calls."""
    text = _card(mode="both", adapter_dir="adapter")
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    calls = []

    class Stub:
        @staticmethod
        def from_pretrained(*args, **kwargs):
            calls.append((args, kwargs))
            return "obj"

    code = code.replace("from peft import PeftModel\n", "").replace(
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n", "")
    exec(code, {"PeftModel": Stub, "AutoModelForCausalLM": Stub, "AutoTokenizer": Stub})  # noqa: S102
    assert (("obj", "acme/qwen-lora"), {"revision": "step-30", "subfolder": "adapter"}) in calls


def test_uploader_lora_option_is_validated_and_checkpoint_strategy_keeps_the_adapter():
    with pytest.raises(InvalidUploadConfigError, match="lora='adapters' is not supported; valid values: adapter, "
                                                       "merged, both"):
        HuggingFaceUploader("alice/m", lora="adapters")
    assert HuggingFaceUploader("alice/m").lora == "adapter"
    assert HuggingFaceUploader("alice/m", lora="merged").lora == "merged"
    # a resume snapshot needs the adapter: merged weights cannot be split back into A and B
    assert HuggingFaceUploader("alice/m", lora="merged", strategy="checkpoint").lora == "both"
    opts = HuggingFaceUploader("alice/m", lora="both", lora_base_model="Qwen/Q").options()
    assert opts["lora"] == "both" and opts["lora_base_model"] == "Qwen/Q"


def test_adapter_files_are_managed_so_a_mode_switch_leaves_no_stale_adapter():
    assert _is_managed("adapter_config.json", "") and _is_managed("adapter_model.safetensors", "")
    assert _is_managed("adapter/adapter_model.safetensors", "") and _is_managed("exp/adapter/adapter_config.json", "exp")
    assert not _is_managed("adapter/notes/x.md", "")


def test_hf_upload_lora_setting_reaches_the_uploader():
    from omegaconf import OmegaConf

    from training.hub_upload import uploader_settings

    cfg = OmegaConf.create({"hf_upload": {"repo_id": "a/m", "lora": "both"},
                            "actor_rollout_ref": {"model": {"path": "Qwen/Qwen2.5-1.5B"}}})
    s = uploader_settings(cfg)
    assert s["lora"] == "both" and s["lora_base_model"] == "Qwen/Qwen2.5-1.5B"
    cfg = OmegaConf.create({"hf_upload": {"repo_id": "a/m"}, "actor_rollout_ref": {"model": {"path": "tiny://qwen2"}}})
    assert uploader_settings(cfg)["lora"] == "adapter" and uploader_settings(cfg)["lora_base_model"] is None


def test_resume_refuses_another_lora_shape_naming_each_field():
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from training.hub_resume_lora import lora_differences

    cfg = OmegaConf.create({"actor_rollout_ref": {"model": {"path": "Qwen/Qwen2.5-1.5B", "lora_rank": 16,
                                                            "lora_alpha": 32, "target_modules": "all-linear"}}})
    snap = SimpleNamespace(state={"compat": {"model": {"hidden_size": 1536, "num_hidden_layers": 28}}})
    adapter = SimpleNamespace(config={"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"],
                                      "base_model_name_or_path": "Qwen/Qwen2.5-0.5B"}, shapes={})
    diffs = lora_differences(cfg, snap, adapter, {"hidden_size": 1536, "num_hidden_layers": 24})
    assert diffs == ["actor_rollout_ref.model.lora_rank: Hub 8 vs this run 16",
                     "actor_rollout_ref.model.lora_alpha: Hub 16 vs this run 32",
                     "base model num_hidden_layers: Hub 28 vs this run 24",
                     "base_model_name_or_path: Hub 'Qwen/Qwen2.5-0.5B' vs this run 'Qwen/Qwen2.5-1.5B'"]
    full_snapshot = lora_differences(cfg, snap, None, {})
    assert full_snapshot == ["actor_rollout_ref.model.lora_rank: Hub 0 vs this run 16 (a LoRA snapshot resumes a "
                             "LoRA run, a full one a full run)"]


@pytest.mark.parametrize("module", ["utils.hub.card_lora", "utils.checkpoint.lora", "utils.checkpoint.reshard_lora"])
def test_docstring_examples_run(module):
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


def test_card_names_the_adapters_base_model_when_the_run_config_did_not():
    from types import SimpleNamespace

    up = HuggingFaceUploader("alice/m", lora="adapter")
    consolidation = SimpleNamespace(dtype="float32", world_size=2, lora={**LORA, "base_model_name_or_path": "Qwen/B"})
    text = up._card_fn(5, None, consolidation, None)()
    assert "| base model | [Qwen/B](https://huggingface.co/Qwen/B) |" in text and "base_model: Qwen/B" in text
