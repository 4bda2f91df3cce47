"""The config-only shape formula (utils/checkpoint/known_shapes.py) equals what transformers builds, exactly.

Ground truth: a meta-device model built by transformers from the same config (keys in state_dict order, shapes,
tied aliases, parameter order). A transformers upgrade that changes an architecture fails here, not in a merge.
"""

from __future__ import annotations

import pytest

from utils.checkpoint.known_shapes import KNOWN_ARCHITECTURES, known_model_shapes

BASE = {"vocab_size": 97, "hidden_size": 32, "intermediate_size": 40, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2}
VARIANTS = [
    {},
    {"tie_word_embeddings": True},
    {"tie_word_embeddings": False},
    {"head_dim": 16},
    {"attention_bias": True},
    {"attention_bias": True, "mlp_bias": True, "tie_word_embeddings": True},
    {"num_key_value_heads": 4},
]


def _from_transformers(config: dict):
    import torch
    import transformers

    cfg = transformers.AutoConfig.for_model(config["model_type"], **{k: v for k, v in config.items()
                                                                    if k not in ("model_type", "architectures")})
    with torch.device("meta"):
        model = getattr(transformers, config["architectures"][0])._from_config(cfg)
    by_id, aliases = {}, {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in by_id:
            aliases[name] = by_id[id(p)]
        else:
            by_id[id(p)] = name
    shapes = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
    return shapes, aliases, [n for n, _ in model.named_parameters()]


@pytest.mark.parametrize("arch", KNOWN_ARCHITECTURES)
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()) or "defaults")
def test_formula_equals_the_meta_model_transformers_builds(arch, variant):
    model_type = {"Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3", "LlamaForCausalLM": "llama"}[arch]
    config = {**BASE, **variant, "architectures": [arch], "model_type": model_type}
    got = known_model_shapes(config)
    assert got is not None
    shapes, aliases, names = got
    want_shapes, want_aliases, want_names = _from_transformers(config)
    assert list(shapes.items()) == list(want_shapes.items())
    assert aliases == want_aliases
    assert names == want_names


@pytest.mark.parametrize("config", [
    {**BASE, "architectures": ["GPT2LMHeadModel"]},
    {**BASE, "architectures": ["Qwen2ForCausalLM", "Qwen2Model"]},
    {**BASE, "architectures": ["Qwen2ForCausalLM"], "quantization_config": {"bits": 4}},
    {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 32},
    {**BASE},
    {**{k: v for k, v in BASE.items() if k != "num_key_value_heads"}, "architectures": ["Qwen2ForCausalLM"]},
])
def test_anything_the_formula_does_not_cover_returns_none(config):
    assert known_model_shapes(config) is None
