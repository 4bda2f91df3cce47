"""The generated model card (``README.md``): Hub metadata plus a short human-readable summary.

The card is built with ``huggingface_hub.ModelCardData`` (so the YAML header is what the Hub expects) and carries a
marker comment. An existing README on the Hub *without* that marker was written by a person and is never replaced;
one *with* the marker is ours and is regenerated on every upload.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from huggingface_hub import ModelCardData

from utils.hub.card_lora import lora_library, lora_load_lines, lora_rows, lora_tags

__all__ = ["CARD_MARKER", "CURVES_FILE", "CardInfo", "decoding_label", "render_model_card", "is_generated_card",
           "framework_versions", "headline_metrics"]

# Written into every card we generate, with the sha256 of the rest of the card. A README on the Hub without the
# marker, or whose content no longer matches the hash (a person edited our card), is left alone.
CARD_MARKER = "<!-- generated-by: verl-grpo-hub uploader; edit this README and uploads stop replacing it"
_MARKER_RE = re.compile(re.escape(CARD_MARKER) + r" sha256:([0-9a-f]{64}) -->")
BASE_TAGS = ("verl", "grpo", "reasoning-gym", "rl")
# The training curves the trainer draws beside a checkpoint (training/report.py); uploaded next to the model and
# shown in the card.
CURVES_FILE = "training_curves.png"
_RESULT_RE = re.compile(r"^val/(?P<task>[^/]+)/exact_acc(?P<start>_at_start)?$")


@dataclass
class CardInfo:
    """Everything the card may say. Unknown fields stay ``None`` and are left out.

    Attributes:
        repo_id: Where the model lives (for the load snippet).
        step: Training step of these weights.
        revision: The tag of this upload (``step-N``), used in the load snippet.
        base_model: The model training started from (a Hub id or path), if known.
        dtype: Dtype of the uploaded weights (``bfloat16``, ...).
        world_size: Number of ranks the checkpoint was saved from.
        weights_format: ``bin`` or ``safetensors``.
        metrics: Training/validation metrics at this step (e.g. ``{"val/reward": 0.41}``).
        datasets: reasoning-gym tasks and their sampling weights, e.g. ``{"spell_backward": 0.33}``.
        optimizer: Whether ``optimizer.pt`` is part of the upload.
        extra: More ``key: value`` pairs for the details table (git SHA, W&B link, global batch, ...).
        subfolder: The repo subfolder holding the model (an experiment namespace), if any.
        dataset_configs: Each task's reasoning-gym config (``{"chain_sum": {"max_terms": 2}}``).
        system_prompt: The system prompt the model was trained with (used in the generation snippet).
        example_question: A question of the training task for the generation snippet.
        curves: File name of the training-curves PNG uploaded beside the model, if any.
        max_new_tokens: Generation budget of the snippet (the run's response length).
        lora: For a LoRA run, the consolidation's LoRA record (mode, r, lora_alpha, target_modules, ...).
    """

    repo_id: str
    step: int
    revision: str
    base_model: str | None = None
    dtype: str | None = None
    world_size: int | None = None
    weights_format: str | None = None
    metrics: Mapping[str, float] | None = None
    datasets: Mapping[str, float] | None = None
    optimizer: bool = False
    extra: Mapping[str, object] = field(default_factory=dict)
    subfolder: str | None = None
    dataset_configs: Mapping[str, Mapping[str, object]] | None = None
    system_prompt: str | None = None
    example_question: str | None = None
    curves: str | None = None
    max_new_tokens: int = 64
    lora: Mapping[str, object] | None = None


def framework_versions() -> dict[str, str]:
    """Installed versions of the frameworks that produced the model, read from package metadata (no imports)."""
    out = {}
    for dist in ("verl", "torch", "transformers", "huggingface_hub"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def _metric_kind(key: str) -> int:
    k = key.lower()
    return 0 if ("reward" in k or "score" in k) else 1 if ("acc" in k or "exact" in k) else 2


def headline_metrics(metrics: Mapping[str, Any] | None, limit: int | None = 3) -> dict[str, float]:
    """The metrics worth a commit title, as floats: rewards/scores first, then accuracies, validation first.

    Args:
        metrics: A step's metrics (numpy/torch scalars welcome; what ``float()`` refuses is left out).
        limit: How many, best first (other numeric metrics fill up); ``None``: every reward/score/accuracy metric
            in its original order (what a training step hands the uploader for its commit, card and marker).

    Example:
        >>> headline_metrics({"loss": 1.5, "val/acc": 0.75, "critic/score/mean": 0.25}, limit=2)
        {'critic/score/mean': 0.25, 'val/acc': 0.75}
        >>> headline_metrics({"loss": 1.5, "val/acc": 0.75, "critic/score/mean": 0.25}, limit=None)
        {'val/acc': 0.75, 'critic/score/mean': 0.25}
    """
    numeric: dict[str, float] = {}
    for key, value in (metrics or {}).items():
        if isinstance(value, bool):
            continue
        try:
            numeric[str(key)] = float(value)
        except (TypeError, ValueError):
            continue
    if limit is None:
        return {k: v for k, v in numeric.items() if _metric_kind(k) < 2}
    ranked = sorted(numeric, key=lambda k: (_metric_kind(k), 0 if k.lower().startswith("val") else 1, k))
    return {k: numeric[k] for k in ranked[:limit]}


def render_model_card(info: CardInfo) -> str:
    """The full ``README.md`` text for one upload.

    Args:
        info: What is known about the model (see :class:`CardInfo`).

    Returns:
        Markdown with a YAML metadata header (``base_model``, ``library_name: transformers``, tags, datasets and
        weights, step, metrics, dtype, world size) and a body with a load snippet pinned to ``info.revision``.

    Example:
        >>> card = render_model_card(CardInfo(repo_id="alice/m", step=3, revision="step-3"))
        >>> card.startswith("---") and 'revision="step-3"' in card
        True
    """
    tags = list(BASE_TAGS) + lora_tags(info.lora) + [f"reasoning-gym-{name}" for name in sorted(info.datasets or {})]
    metrics = {k: float(v) for k, v in (info.metrics or {}).items() if isinstance(v, int | float)}
    data = ModelCardData(
        base_model=_hub_model_id(info.base_model),
        library_name=lora_library(info.lora),
        pipeline_tag="text-generation",
        tags=tags,
        training_step=info.step,
        torch_dtype=info.dtype,
        world_size=info.world_size,
        reasoning_gym_datasets=dict(info.datasets) if info.datasets else None,
        metrics=metrics or None,
    )
    versions = framework_versions()
    base_link = f"[{info.base_model}](https://huggingface.co/{info.base_model})" \
        if _hub_model_id(info.base_model) else info.base_model
    # extra["base model"] (a base no Hub page describes, e.g. the offline demo model) replaces the plain name
    base_row = None if "base model" in info.extra else base_link
    rows = [("step", info.step), ("revision", f"`{info.revision}`"), ("base model", base_row),
            ("dtype", info.dtype), ("world size (ranks)", info.world_size), ("weights", info.weights_format),
            ("optimizer state", "`optimizer.pt` (keyed by parameter name)" if info.optimizer else None)]
    rows += lora_rows(info.lora)
    rows += list(info.extra.items())
    rows += [(name, version) for name, version in versions.items()]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows if v is not None)
    lines = [
        "---",
        data.to_yaml(),
        "---",
        "",
        _PLACEHOLDER,
        "",
        f"# {info.repo_id.split('/')[-1]}",
        "",
        f"A GRPO fine-tune trained with [veRL](https://github.com/volcengine/verl) on "
        f"[reasoning-gym](https://github.com/open-thought/reasoning-gym) tasks, step {info.step}"
        + (f", starting from `{info.base_model}`" if info.base_model else "")
        + ". `main` holds the latest upload; every upload is also tagged `step-N`.",
        "",
    ]
    lines += _results_section(info.step, metrics, info.curves)
    lines += ["## Load it and generate", "", "```python", *_snippet(info), "```", "", "## Training details", "",
              "| | |", "|---|---|", table]
    if info.datasets:
        configs = info.dataset_configs or {}
        lines += ["", "## reasoning-gym tasks", "", "| task | weight | config |", "|---|---|---|"]
        lines += [f"| {name} | {weight:g} | `{json.dumps(dict(configs.get(name) or {}), sort_keys=True)}` |"
                  for name, weight in sorted(info.datasets.items())]
    if metrics:
        lines += ["", f"## All metrics at step {info.step}", "", "| metric | value |", "|---|---|"]
        lines += [f"| {name} | {value:.4g} |" for name, value in sorted(metrics.items())]
    text = "\n".join(lines) + "\n"
    return text.replace(_PLACEHOLDER, f"{CARD_MARKER} sha256:{_digest(text)} -->")


def decoding_label(samples: int | float | None) -> str:
    """How the val answers behind an accuracy were decoded (``samples``: the ``N`` of veRL's ``mean@N``): one answer
    per question is veRL's greedy default (``val_kwargs.do_sample=false``); ``val_kwargs.n > 1`` needs sampling, and
    veRL averages the N answers. Shared by the card and ``training.report``'s table and curves.

    Example:
        >>> decoding_label(1), decoding_label(4)
        ('greedy', 'mean of 4 sampled answers per question')
    """
    n = int(samples) if samples else 1
    return "greedy" if n == 1 else f"mean of {n} sampled answers per question"


def _results_section(step: int, metrics: Mapping[str, float], curves: str | None) -> list[str]:
    """``## Results``: val exact accuracy per task (at the first validation and now), the train reward, the curves."""
    rows: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        match = _RESULT_RE.match(key)
        if match:
            rows.setdefault(match["task"], {})["start" if match["start"] else "now"] = value
    lines: list[str] = []
    if rows:
        start = metrics.get("val_start_step")
        first = f"step {int(start)}" if start is not None else "start"
        decoding = decoding_label(metrics.get("val_samples"))  # set by training.report.card_metrics
        lines += ["## Results", "", f"Exact-answer accuracy on the validation split ({decoding}):", "",
                  f"| task | {first} | step {step} | change |", "|---|---|---|---|"]
        for task, row in sorted(rows.items()):
            before, now = row.get("start"), row.get("now")
            change = f"{(now - before) * 100:+.1f} points" if before is not None and now is not None else ""
            cells = [f"{v * 100:.1f}%" if v is not None else "-" for v in (before, now)]
            lines.append(f"| {task} | {cells[0]} | {cells[1]} | {change} |")
        lines.append("")
    if "train/reward" in metrics:
        lines += [f"Mean training reward at step {step}: {metrics['train/reward']:.3f}.", ""]
    if curves:
        lines += [f"![training curves: reward, exact accuracy, response length, KL per step]({curves})", ""]
    if lines and lines[0] != "## Results":
        lines = ["## Results", "", *lines]
    return lines


def _snippet(info: CardInfo) -> list[str]:
    """A load-and-generate snippet pinned to this upload's revision (the tests run it against a Hub server)."""
    if info.lora:  # an adapter: PEFT's loading lines (utils/hub/card_lora.py)
        return lora_load_lines(info.lora, info.repo_id, info.revision, info.subfolder, info.base_model)
    sub = f', subfolder="{info.subfolder}"' if info.subfolder else ""
    messages = []
    if info.system_prompt:  # json.dumps: a double-quoted literal that is valid Python, newlines escaped
        messages.append(f'    {{"role": "system", "content": {json.dumps(info.system_prompt)}}},')
    messages.append(f'    {{"role": "user", "content": {json.dumps(info.example_question or "What is 2 + 3?")}}},')
    return [
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{info.repo_id}", revision="{info.revision}"{sub})',
        f'tokenizer = AutoTokenizer.from_pretrained("{info.repo_id}", revision="{info.revision}"{sub})',
        "messages = [",
        *messages,
        "]",
        "prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)",
        'inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)',
        f"output = model.generate(**inputs, max_new_tokens={int(info.max_new_tokens)}, do_sample=False)",
        'print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
    ]


def _hub_model_id(name: str | None) -> str | None:
    """``name`` if it can be a Hub model id (metadata ``base_model`` must be one, or the Hub rejects the card)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not name or name.startswith((".", "/", "~")) or name.count("/") != 1:
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def is_generated_card(text: str | None) -> bool:
    """True when ``text`` is absent, or is a card this module generated and nobody edited since (so it may go).

    Example:
        >>> card = render_model_card(CardInfo(repo_id="alice/m", step=3, revision="step-3"))
        >>> is_generated_card(card), is_generated_card(card + "my notes"), is_generated_card("# My model")
        (True, False, False)
    """
    if text is None:
        return True
    match = _MARKER_RE.search(text)
    return bool(match) and _digest(text.replace(match.group(0), _PLACEHOLDER)) == match.group(1)


_PLACEHOLDER = "<!-- model-card-marker -->"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
