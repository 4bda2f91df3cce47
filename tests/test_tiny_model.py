"""The offline tiny Qwen2 model: loadable, consistent vocab, chat template, tags as tokens, atomic cache."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from training.errors import TinyModelError
from training.tiny_model import TAG_TOKENS, ensure_tiny_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir), AutoModelForCausalLM.from_pretrained(tiny_model_dir)


def test_vocab_size_equals_tokenizer_length_and_special_ids(loaded):
    tok, model = loaded
    assert model.config.vocab_size == len(tok)
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert model.config.eos_token_id == tok.eos_token_id
    assert model.config.pad_token_id == tok.pad_token_id
    assert model.config.architectures == ["Qwen2ForCausalLM"]
    assert model.config.hidden_size // model.config.num_attention_heads >= 32  # head_dim


def test_generation_config_lists_both_stop_tokens(tiny_model_dir, loaded):
    tok, _ = loaded
    gen = GenerationConfig.from_pretrained(tiny_model_dir)
    assert gen.eos_token_id == [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]
    assert gen.pad_token_id == tok.pad_token_id


def test_chat_template_is_qwen_style(loaded):
    tok, _ = loaded
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q?"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\n"


def test_tags_are_single_tokens_that_survive_skip_special_tokens(loaded):
    tok, _ = loaded
    for tag in TAG_TOKENS:
        assert len(tok.encode(tag, add_special_tokens=False)) == 1, tag
    text = "<think> 4 - 1 </think>\n<answer>3</answer>"
    ids = tok.encode(text + "<|im_end|>", add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_tokenizer_round_trips_arbitrary_text(loaded):
    tok, _ = loaded
    for s in ["Héllo wörld 123 \n\n  x", "日本語", "Calculate 5 - 3 - 6."]:
        assert tok.decode(tok.encode(s, add_special_tokens=False)) == s


def test_model_forward_gives_finite_logits_over_the_vocab(loaded):
    tok, model = loaded
    ids = torch.tensor([tok.encode("Calculate 5 - 3 - 6.")])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok))
    assert torch.isfinite(logits).all()


def test_manifest_is_complete_and_second_call_reuses_the_cache(tiny_model_dir):
    manifest = json.loads((Path(tiny_model_dir) / "manifest.json").read_text())
    on_disk = sorted(p for p in os.listdir(tiny_model_dir) if p != "manifest.json")
    assert manifest["files"] == on_disk
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= set(on_disk)
    before = os.stat(Path(tiny_model_dir) / "model.safetensors").st_mtime_ns
    assert ensure_tiny_model(Path(tiny_model_dir).parent) == tiny_model_dir
    assert os.stat(Path(tiny_model_dir) / "model.safetensors").st_mtime_ns == before


def test_directory_without_manifest_is_rebuilt(tmp_path, tiny_model_dir):
    stale = tmp_path / Path(tiny_model_dir).name
    stale.mkdir()
    (stale / "config.json").write_text("{half written")
    path = ensure_tiny_model(tmp_path)
    assert path == str(stale)
    assert (stale / "manifest.json").is_file()
    assert json.loads((stale / "config.json").read_text())["model_type"] == "qwen2"
    assert sorted(os.listdir(tmp_path)) == [stale.name]  # no temp or stale dirs left behind


def test_unknown_dataset_raises_and_leaves_nothing(tmp_path):
    with pytest.raises(TinyModelError, match="unknown reasoning-gym dataset 'chain_summ'"):
        ensure_tiny_model(tmp_path, datasets=["chain_summ"])
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_concurrent_builders_agree_on_one_complete_directory(tmp_path):
    code = "import sys; from training.tiny_model import ensure_tiny_model; print(ensure_tiny_model(sys.argv[1]))"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs[0] == outs[1]
    assert os.listdir(tmp_path) == [Path(outs[0]).name]
    assert (Path(outs[0]) / "manifest.json").is_file()
