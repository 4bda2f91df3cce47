"""Expected state-dict keys, shapes, tied aliases and parameter order of common decoder-only architectures, computed
from ``config.json`` alone - without importing transformers or building a model.

Importing transformers and building a meta-device model costs seconds of fixed start-up per consolidation (more
than the merge itself for small models). For the architectures listed in :data:`KNOWN_ARCHITECTURES` the answer is
a formula of a handful of config fields; it is used only when it is exact:

- every field the formula reads is either written in ``config.json`` or has the config class's documented default
  (mirrored here, and pinned against transformers by ``tests/test_known_shapes.py`` for every architecture, tied and
  untied, with and without biases and explicit ``head_dim``);
- the caller still checks every key and shape of the checkpoint against the result and, on any disagreement,
  rebuilds the expectation with transformers (:func:`utils.checkpoint.model_config.load_expected_model`), so error
  messages and unusual configs behave exactly as before.

Anything else (another architecture, ``quantization_config``, ...) returns ``None``: the caller builds the model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["KNOWN_ARCHITECTURES", "known_model_shapes"]

# architecture -> (attention bias default, q/k norms, o_proj bias follows attention_bias, mlp bias key, head_dim default)
# head_dim default: None = hidden_size // num_attention_heads.
_ARCH: dict[str, dict[str, Any]] = {
    "Qwen2ForCausalLM": {"qkv_bias": True, "o_bias": False, "qk_norm": False, "mlp_bias": False,
                         "head_dim": None, "bias_key": None},
    "Qwen3ForCausalLM": {"qkv_bias": False, "o_bias": None, "qk_norm": True, "mlp_bias": False,
                         "head_dim": 128, "bias_key": "attention_bias"},
    "LlamaForCausalLM": {"qkv_bias": False, "o_bias": None, "qk_norm": False, "mlp_bias": False,
                         "head_dim": None, "bias_key": "attention_bias", "mlp_bias_key": "mlp_bias"},
}
KNOWN_ARCHITECTURES = tuple(sorted(_ARCH))

# Config entries that change which modules exist (or their shapes) in ways the formula does not model.
_UNMODELLED = ("quantization_config", "num_experts", "moe_intermediate_size", "num_local_experts",
               "pretraining_tp", "text_config", "vision_config")


def known_model_shapes(config: Mapping[str, Any]) -> tuple[dict[str, tuple[int, ...]], dict[str, str], list[str]] | None:
    """``(shapes, aliases, param_names)`` as a meta-device model of ``config`` would give them, or ``None``.

    Args:
        config: the parsed ``config.json``.

    Returns:
        ``shapes``: every state-dict key (tied aliases included) -> shape, in ``state_dict()`` order;
        ``aliases``: tied key -> the key it shares storage with; ``param_names``: unique parameters in
        ``model.parameters()`` order. ``None`` when the architecture or config is not one the formula covers.

    Example:
        >>> cfg = {"architectures": ["Qwen2ForCausalLM"], "vocab_size": 10, "hidden_size": 4,
        ...        "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
        ...        "num_key_value_heads": 1, "tie_word_embeddings": True}
        >>> shapes, aliases, names = known_model_shapes(cfg)
        >>> shapes["model.layers.0.self_attn.k_proj.weight"], aliases
        ((2, 4), {'lm_head.weight': 'model.embed_tokens.weight'})
    """
    archs = config.get("architectures") or []
    if len(archs) != 1 or archs[0] not in _ARCH or any(k in config for k in _UNMODELLED):
        return None
    spec = _ARCH[archs[0]]
    try:
        h, i, v = int(config["hidden_size"]), int(config["intermediate_size"]), int(config["vocab_size"])
        n_layers, n_heads = int(config["num_hidden_layers"]), int(config["num_attention_heads"])
        n_kv = int(config["num_key_value_heads"])  # no default assumed: the config classes disagree on it
    except (KeyError, TypeError, ValueError):
        return None
    head_dim = config.get("head_dim", spec["head_dim"])
    if head_dim is None:
        if h % n_heads:
            return None
        head_dim = h // n_heads
    head_dim = int(head_dim)
    attn_bias = bool(config.get(spec["bias_key"], spec["qkv_bias"])) if spec["bias_key"] else spec["qkv_bias"]
    o_bias = attn_bias if spec["o_bias"] is None else spec["o_bias"]
    mlp_bias = bool(config.get(spec["mlp_bias_key"], False)) if spec.get("mlp_bias_key") else spec["mlp_bias"]
    tied = bool(config.get("tie_word_embeddings", False))

    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}

    def linear(name: str, out_f: int, in_f: int, bias: bool) -> None:
        shapes[name + ".weight"] = (out_f, in_f)
        if bias:
            shapes[name + ".bias"] = (out_f,)

    for n in range(n_layers):
        p = f"model.layers.{n}."
        linear(p + "self_attn.q_proj", n_heads * head_dim, h, attn_bias)
        linear(p + "self_attn.k_proj", n_kv * head_dim, h, attn_bias)
        linear(p + "self_attn.v_proj", n_kv * head_dim, h, attn_bias)
        linear(p + "self_attn.o_proj", h, n_heads * head_dim, o_bias)
        if spec["qk_norm"]:
            shapes[p + "self_attn.q_norm.weight"] = (head_dim,)
            shapes[p + "self_attn.k_norm.weight"] = (head_dim,)
        linear(p + "mlp.gate_proj", i, h, mlp_bias)
        linear(p + "mlp.up_proj", i, h, mlp_bias)
        linear(p + "mlp.down_proj", h, i, mlp_bias)
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (v, h)
    aliases = {"lm_head.weight": "model.embed_tokens.weight"} if tied else {}
    param_names = [k for k in shapes if k not in aliases]
    return shapes, aliases, param_names
