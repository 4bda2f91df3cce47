"""``tiny://qwen2-warm``: the offline tiny model after a short supervised warm-up on the demo task.

Real GRPO runs start from an instruct model that already answers in the expected format and is sometimes right;
a randomly initialised model is neither, so GRPO on it can only climb a dense partial-credit score. The warm-up
closes that gap in about a minute: the tiny model (:func:`training.tiny_model.ensure_tiny_model`) is trained with
plain next-token cross-entropy on the task's own prompt/answer format - the chat template with the ``DeepSeekZero``
system prompt and a reasoning-gym question, then ``<think> </think>\\n<answer>{answer}</answer><|im_end|>`` - for
:data:`WARMUP_STEPS` steps.

The answers come from a flawed teacher: :data:`TEACHER_ERROR` of them are off by one (``answer + 1``), the rest are
right (:func:`teacher_answer`). The model learns to add, and learns the teacher's habit: for most questions both
the right answer and the one above it are likely, the wrong one usually a little more. So its greedy exact accuracy
is low while its samples often hold the right answer - the situation in which GRPO raises accuracy in real runs
(pass@k well above pass@1: RL sharpens what the model can already sample, it does not teach new skills in a few
steps). Measured: with the teacher's answers all right, 30 GRPO steps did not move greedy accuracy (the model's
mistakes are not in its samples); with this teacher they lifted it by 40.6-51.6 points in five demo runs (README).

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

__all__ = ["TEACHER_ERROR", "WARMUP_DATASET", "WARMUP_CONFIG", "WARMUP_STEPS", "ensure_warm_model", "format_target",
           "teacher_answer", "warmup"]

_RECIPE_VERSION = 3
# The CPU demo's task (training/configs/cpu_demo.yaml). The warm-up items come from a seed far from the demo's
# train (1) and val (1 + dataset_size) seeds; the questions still repeat (there are only ~200 distinct ones).
WARMUP_DATASET = "chain_sum"
WARMUP_CONFIG: dict[str, Any] = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}
WARMUP_SEED = 1_000_003
# Measured on 2 cores (see README): 42-68 s; greedy exact accuracy on the demo's val split 26.6% (off by one for
# 59%), pass@4 72-75%, every answer well formed. 600 steps leave the arithmetic itself too weak (greedy ~20%, pass@4
# ~55%: GRPO has little to sharpen); with a right teacher (recipe 2) 520 steps gave 27% greedy and 30 GRPO steps
# changed nothing.
WARMUP_STEPS = 1200
# Fraction of the teacher's answers that are off by one. 0.6: the wrong answer is the mode for most questions, the
# right one is sampled ~35% of the time. 0.7 measured alike in a torch-only replay of the demo's GRPO settings
# (greedy 36% -> 66% in 30 steps).
TEACHER_ERROR = 0.6
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


def teacher_answer(answer: str, rng: random.Random, error: float = TEACHER_ERROR) -> str:
    """The flawed teacher: ``answer + 1`` with probability ``error``, else ``answer`` (an integer, as text).

    Example:
        >>> teacher_answer("7", random.Random(0), error=1.0), teacher_answer("-3", random.Random(0), error=0.0)
        ('8', '-3')
    """
    return str(int(answer) + 1) if rng.random() < error else answer


def _spec(steps: int) -> dict[str, Any]:
    return {"recipe_version": _RECIPE_VERSION, "dataset": WARMUP_DATASET, "config": WARMUP_CONFIG,
            "seed": WARMUP_SEED, "steps": steps, "batch": _BATCH, "lr": _LR, "prompt": _PROMPT,
            "teacher_error": TEACHER_ERROR}


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
    """Train ``model`` in place on :data:`WARMUP_DATASET` items in the demo's prompt/answer format, with the
    flawed teacher's answers (:func:`teacher_answer`).

    Args:
        model: A causal LM (Qwen2 architecture: its cache exposes ``layers[i].keys/values``).
        tokenizer: Its tokenizer, with a chat template.
        steps: Optimizer steps of :data:`_BATCH` examples each.
        seed: reasoning-gym seed of the warm-up items (and of the batch order and init noise).
        log: Optional ``callable(str)`` for a progress line every 100 steps.

    Returns:
        The loss of every step.
    """
    import reasoning_gym
    import torch

    torch.manual_seed(seed)
    items = reasoning_gym.create_dataset(WARMUP_DATASET, size=steps * _BATCH, seed=seed, **WARMUP_CONFIG)
    teacher = random.Random(seed + 1)
    examples = [_encode(tokenizer, e["question"], teacher_answer(str(e["answer"]), teacher)) for e in items]
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
        if log is not None and ((step + 1) % 100 == 0 or step + 1 == steps):
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
        1200
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
