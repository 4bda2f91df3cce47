"""``tiny://qwen2-warm``: the offline tiny model after a short supervised warm-up on the demo task.

Real GRPO runs start from an instruct model that already answers in the expected format and is sometimes right;
a randomly initialised model is neither, so GRPO on it can only climb a dense partial-credit score. The warm-up
closes that gap in seconds: the tiny model (:func:`training.tiny_model.ensure_tiny_model`) is trained with plain
next-token cross-entropy on the task's own prompt/answer format - the chat template with the ``DeepSeekZero``
system prompt and a reasoning-gym question, then ``<think> </think>\\n<answer>{answer}</answer><|im_end|>`` - for
:data:`WARMUP_STEPS` steps. That teaches the format fully and the arithmetic only partly (low but non-zero exact
accuracy), which leaves GRPO something to learn on the metric that matters.

Speed: every prompt shares its first ~290 tokens (system prompt + the fixed start of the question), so each step
runs that prefix once, with gradients, and broadcasts its key/value cache over the batch; only the ~20 tokens that
differ run per example. Same loss and gradients as running each sequence in full, ~10x fewer tokens.

The result is cached beside the tiny model (``<cache_dir>/tiny-qwen2-warm-<spec hash>/``, ``manifest.json`` written
last, built in a temp dir and renamed into place) and is deterministic for a given spec.

Example:
    >>> from training.warm_model import ensure_warm_model
    >>> path = ensure_warm_model()                         # doctest: +SKIP
    >>> AutoModelForCausalLM.from_pretrained(path)         # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from pathlib import Path
from typing import Any

from training.errors import TinyModelError
from training.tiny_model import _MANIFEST, atomic_cached_build, default_cache_dir, ensure_tiny_model

__all__ = ["WARMUP_DATASET", "WARMUP_CONFIG", "WARMUP_STEPS", "ensure_warm_model", "format_target", "warmup"]

_RECIPE_VERSION = 2
# The CPU demo's task (training/configs/cpu_demo.yaml). The warm-up items come from a seed far from the demo's
# train (1) and val (1 + dataset_size) seeds; the questions still repeat (there are only ~200 distinct ones).
WARMUP_DATASET = "chain_sum"
WARMUP_CONFIG: dict[str, Any] = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}
WARMUP_SEED = 1_000_003
# Measured on 2 cores (see README): 26.6% greedy exact accuracy on the demo's val split, every answer well formed,
# 35-54 s. Fewer steps (60 at lr 3e-3, recipe 1) gave a model that answers `1` or `11` to every question.
WARMUP_STEPS = 520
_BATCH = 32
_LR = 1e-3
_PROMPT = "DeepSeekZero"


def format_target(answer: str) -> str:
    """The completion the warm-up teaches (what ``training.rewards`` scores as well formed and exact).

    Example:
        >>> format_target("7")
        '<think> </think>\\n<answer>7</answer>'
    """
    return f"<think> </think>\n<answer>{answer}</answer>"


def _spec(steps: int) -> dict[str, Any]:
    return {"recipe_version": _RECIPE_VERSION, "dataset": WARMUP_DATASET, "config": WARMUP_CONFIG,
            "seed": WARMUP_SEED, "steps": steps, "batch": _BATCH, "lr": _LR, "prompt": _PROMPT}


def _encode(tokenizer: Any, question: str, answer: str) -> tuple[list[int], list[int]]:
    from reasoning_gym.utils import SYSTEM_PROMPTS

    messages = [{"role": "system", "content": SYSTEM_PROMPTS[_PROMPT]}, {"role": "user", "content": question}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    target = format_target(answer) + tokenizer.eos_token
    return (tokenizer(prompt, add_special_tokens=False)["input_ids"],
            tokenizer(target, add_special_tokens=False)["input_ids"])


def _common_prefix(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs):
            return i
    return n


def _step_loss(model: Any, batch: list[tuple[list[int], list[int]]], pad_id: int) -> Any:
    """Mean next-token loss on the completions of ``batch``, running the shared prompt prefix once.

    Shapes: prefix ``[1, P]`` -> its K/V ``[1, H, P, D]`` expanded (a view) to ``[B, H, P, D]``; the per-example
    rest ``[B, S]`` (right-padded) attends to the prefix through that cache. Gradients flow into the prefix.
    """
    import torch
    import torch.nn.functional as F

    seqs = [p + r for p, r in batch]
    # Keep >= 1 token of each prompt out of the prefix: the first completion token is predicted from it.
    shared = min(_common_prefix(seqs), min(len(p) for p, _ in batch) - 1)
    prefix = torch.tensor([seqs[0][:shared]])
    out = model(input_ids=prefix, use_cache=True)
    cache = out.past_key_values
    for layer in cache.layers:
        layer.keys = layer.keys.expand(len(batch), -1, -1, -1)
        layer.values = layer.values.expand(len(batch), -1, -1, -1)
    rest = [s[shared:] for s in seqs]
    width = max(len(r) for r in rest)
    ids = torch.full((len(batch), width), pad_id)
    labels = torch.full((len(batch), width), -100)
    mask = torch.zeros((len(batch), shared + width), dtype=torch.long)
    mask[:, :shared] = 1
    for i, ((p, r), tail) in enumerate(zip(batch, rest, strict=True)):
        ids[i, : len(tail)] = torch.tensor(tail)
        mask[i, shared : shared + len(tail)] = 1
        start = len(p) - shared  # position of the first completion token within the tail
        labels[i, start : start + len(r)] = torch.tensor(r)
    positions = torch.arange(shared, shared + width).expand(len(batch), -1)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache).logits
    # logits[:, t] predicts token t+1 of the tail.
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)


def warmup(model: Any, tokenizer: Any, *, steps: int = WARMUP_STEPS, seed: int = WARMUP_SEED,
           log: Any = None) -> list[float]:
    """Train ``model`` in place on :data:`WARMUP_DATASET` items in the demo's prompt/answer format.

    Args:
        model: A causal LM (Qwen2 architecture: its cache exposes ``layers[i].keys/values``).
        tokenizer: Its tokenizer, with a chat template.
        steps: Optimizer steps of :data:`_BATCH` examples each.
        seed: reasoning-gym seed of the warm-up items (and of the batch order and init noise).
        log: Optional ``callable(str)`` for a progress line every 20 steps.

    Returns:
        The loss of every step.
    """
    import reasoning_gym
    import torch

    torch.manual_seed(seed)
    items = reasoning_gym.create_dataset(WARMUP_DATASET, size=steps * _BATCH, seed=seed, **WARMUP_CONFIG)
    examples = [_encode(tokenizer, e["question"], str(e["answer"])) for e in items]
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    opt = torch.optim.AdamW(model.parameters(), lr=_LR)
    model.train()
    losses, started = [], time.perf_counter()
    for step in range(steps):
        batch = [examples[i] for i in order[step * _BATCH : (step + 1) * _BATCH]]
        loss = _step_loss(model, batch, tokenizer.pad_token_id)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if log is not None and ((step + 1) % 20 == 0 or step + 1 == steps):
            log(f"warm-up step {step + 1}/{steps}: loss {losses[-1]:.3f} ({time.perf_counter() - started:.0f}s)")
    model.eval()
    return losses


def ensure_warm_model(cache_dir: str | os.PathLike | None = None, *, steps: int = WARMUP_STEPS,
                      log: Any = print) -> str:
    """Build (once) and return the directory of ``tiny://qwen2-warm``.

    Args:
        cache_dir: Cache root (default ``$VERL_GRPO_HUB_CACHE`` or ``~/.cache/verl-grpo-hub``); the base tiny model
            is built there too if missing.
        steps: Warm-up steps (a different number is a different cache entry).
        log: ``callable(str)`` for progress while building; ``None`` for silence.

    Returns:
        Path (str) of a ``from_pretrained``-loadable folder with the tiny model's tokenizer and config.

    Raises:
        TinyModelError: The build failed (nothing is left in the cache then).

    Example:
        >>> path = ensure_warm_model("/tmp/cache")          # doctest: +SKIP
        >>> json.load(open(f"{path}/manifest.json"))["steps"]  # doctest: +SKIP
        520
    """
    if steps < 1:
        raise TinyModelError(f"ensure_warm_model(steps={steps}): give at least one warm-up step")
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    base = ensure_tiny_model(root)
    spec = {**_spec(steps), "base": Path(base).name}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]

    def build(out_dir: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if log is not None:
            log(f"building tiny://qwen2-warm: {steps} supervised steps on {WARMUP_DATASET} (once; cached in {root})")
        # One thread: the model is tiny, and OpenMP workers spinning on a busy 2-core box made a step 10x slower.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            tokenizer = AutoTokenizer.from_pretrained(base)
            model = AutoModelForCausalLM.from_pretrained(base)
            started = time.perf_counter()
            losses = warmup(model, tokenizer, steps=steps, log=log)
            seconds = time.perf_counter() - started
        finally:
            torch.set_num_threads(threads)
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        manifest = {**spec, "final_loss": losses[-1], "seconds": round(seconds, 1),
                    "files": sorted(os.listdir(out_dir))}
        (out_dir / _MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")

    return atomic_cached_build(root / f"tiny-qwen2-warm-{key}", build)
