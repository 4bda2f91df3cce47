"""The LoRA parts of the generated model card: metadata, the details rows and a load snippet that works.

``lora`` is the consolidation's :attr:`utils.load_fsdp_to_hf.ConsolidationResult.lora` record: ``mode``
(``adapter`` | ``merged`` | ``both``), ``r``, ``lora_alpha``, ``target_modules``, ``base_model_name_or_path``,
``adapter_dir`` (the PEFT folder relative to the uploaded folder: ``.`` or ``adapter``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["lora_tags", "lora_library", "lora_rows", "lora_load_lines"]


def lora_tags(lora: Mapping[str, Any] | None) -> list[str]:
    """Extra Hub tags: ``lora`` and ``peft`` when the upload carries an adapter (the Hub's adapter filters)."""
    if not lora:
        return []
    return ["lora"] + (["peft"] if lora.get("mode") in ("adapter", "both") else [])


def lora_library(lora: Mapping[str, Any] | None) -> str:
    """``library_name`` of the card: ``peft`` for an adapter at the root (what the Hub expects), else transformers."""
    return "peft" if lora and lora.get("mode") == "adapter" else "transformers"


def lora_rows(lora: Mapping[str, Any] | None) -> list[tuple[str, object]]:
    """Rows for the details table: how the model was adapted.

    Example:
        >>> lora_rows({"mode": "adapter", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]})[:2]
        [('fine-tuning', 'LoRA (PEFT adapter)'), ('LoRA rank r', 8)]
    """
    if not lora:
        return []
    what = {"adapter": "LoRA (PEFT adapter)", "merged": "LoRA, merged into the base weights",
            "both": "LoRA: merged weights at the root, the PEFT adapter in `adapter/`"}[lora["mode"]]
    scale = float(lora["lora_alpha"]) / int(lora["r"])
    return [("fine-tuning", what), ("LoRA rank r", lora["r"]), ("LoRA alpha", lora["lora_alpha"]),
            ("LoRA scale alpha/r", f"{scale:g}"),
            ("LoRA target modules", ", ".join(f"`{m}`" for m in lora.get("target_modules") or []))]


def lora_load_lines(lora: Mapping[str, Any], repo_id: str, revision: str, subfolder: str | None,
                    base_model: str | None) -> list[str]:
    """The body of the ``Load it`` Python block for a LoRA upload.

    Args:
        lora: the consolidation's LoRA record. repo_id, revision: where the upload lives.
        subfolder: the experiment namespace, if any. base_model: the base model's Hub id or path.

    Example:
        >>> lines = lora_load_lines({"mode": "adapter", "adapter_dir": "."}, "alice/m", "step-3", None, "Qwen/Q")
        >>> 'model = PeftModel.from_pretrained(base, "alice/m", revision="step-3")' in lines
        True
    """
    base = base_model or lora.get("base_model_name_or_path") or "BASE_MODEL"  # noqa: S105 - a placeholder
    sub = f', subfolder="{subfolder}"' if subfolder else ""
    merged = [f'model = AutoModelForCausalLM.from_pretrained("{repo_id}", revision="{revision}"{sub})']
    tokenizer = f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}", revision="{revision}"{sub})'
    if lora["mode"] == "merged":
        return ["from transformers import AutoModelForCausalLM, AutoTokenizer", "", *merged, tokenizer]
    adapter_dir = lora.get("adapter_dir") or "."
    folder = "/".join(p for p in (subfolder, None if adapter_dir == "." else adapter_dir) if p)
    adapter_sub = f', subfolder="{folder}"' if folder else ""
    lines = ["from peft import PeftModel", "from transformers import AutoModelForCausalLM, AutoTokenizer", ""]
    if lora["mode"] == "both":
        lines += ["# the merged model (base + adapter folded in):", *merged, tokenizer, "",
                  "# or the adapter on top of the base model:"]
    lines += [f'base = AutoModelForCausalLM.from_pretrained("{base}")',
              f'model = PeftModel.from_pretrained(base, "{repo_id}", revision="{revision}"{adapter_sub})']
    if lora["mode"] == "adapter":
        lines += [tokenizer, "# model = model.merge_and_unload()  # optional: fold the adapter into the weights"]
    return lines
