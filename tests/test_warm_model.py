"""tiny://qwen2-warm: the supervised warm-up gives the demo a policy that answers in the task's format with
non-zero exact accuracy, where the random tiny model (tiny://qwen2) scores exactly zero, and whose samples hold the
right answer far more often than its greedy answer is right (what GRPO can sharpen)."""

import json
import random
from pathlib import Path

import pytest
import torch

from training.warm_model import (
    TEACHER_ERROR,
    WARMUP_CONFIG,
    WARMUP_STEPS,
    _encode,
    _step_loss,
    ensure_warm_model,
    teacher_answer,
)

# The tests reading warm_dir are slow: building it is ~60-90 s of single-thread training on a shared 2-core box.


def answers(model_dir: str, n: int = 64, samples: int = 0) -> tuple[list[str], list[dict], list[str]]:
    """(greedy answers, val entries, ``samples`` sampled answers per entry, entry-major) on the demo's val split."""
    import reasoning_gym
    from reasoning_gym.utils import SYSTEM_PROMPTS
    from transformers import AutoModelForCausalLM, AutoTokenizer

    val = reasoning_gym.create_dataset("chain_sum", size=n, seed=2001, **WARMUP_CONFIG)  # cpu_demo: seed 1 + 2000
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    prompts = [tok.apply_chat_template([{"role": "system", "content": SYSTEM_PROMPTS["DeepSeekZero"]},
                                        {"role": "user", "content": e["question"]}], tokenize=False,
                                       add_generation_prompt=True) for e in val]
    ids = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    width = ids["input_ids"].shape[1]
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=32, do_sample=False, pad_token_id=tok.pad_token_id)
        greedy = tok.batch_decode(out[:, width:], skip_special_tokens=True)
        sampled = []
        if samples:
            torch.manual_seed(0)
            out = model.generate(**ids, max_new_tokens=32, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                 num_return_sequences=samples, pad_token_id=tok.pad_token_id)
            sampled = tok.batch_decode(out[:, width:], skip_special_tokens=True)
    return greedy, list(val), sampled


def is_answer(text: str, value: int) -> bool:
    from reasoning_gym.utils import extract_answer

    got = extract_answer(text)
    try:
        return got is not None and int(got.strip()) == value
    except ValueError:
        return False


def exact_accuracy(model_dir: str, n: int = 64) -> tuple[float, float]:
    """(exact accuracy, well-formed fraction) of greedy answers on the CPU demo's own val split."""
    texts, val, _ = answers(model_dir, n)
    exact = sum(is_answer(t, int(e["answer"])) for t, e in zip(texts, val, strict=True)) / n
    formed = sum(t.strip().startswith("<think>") and t.strip().endswith("</answer>") for t in texts) / n
    return exact, formed


@pytest.fixture(scope="module")
def warm_dir(tmp_path_factory) -> str:
    return ensure_warm_model(tmp_path_factory.mktemp("warm-cache"), log=None)


@pytest.mark.slow
def test_warm_model_beats_the_random_one_on_exact_accuracy(warm_dir, tiny_model_dir):
    warm_exact, warm_formed = exact_accuracy(warm_dir)
    random_exact, random_formed = exact_accuracy(tiny_model_dir)
    assert (random_exact, random_formed) == (0.0, 0.0)
    assert warm_formed >= 0.9  # the format is learned
    assert 0.0 < warm_exact < 0.6  # some skill, and room for GRPO to add more


@pytest.mark.slow
def test_warm_models_samples_hold_the_right_answer_its_greedy_answer_misses(warm_dir):
    """What lets 30 GRPO steps raise greedy accuracy: the right answer is often sampled (pass@4 well above greedy
    exact), and most greedy misses are the teacher's habit (the answer + 1), one the reward can push away from."""
    greedy, val, sampled = answers(warm_dir, samples=4)
    truth = [int(e["answer"]) for e in val]  # reasoning-gym's own answers, not the teacher's
    exact = sum(is_answer(t, a) for t, a in zip(greedy, truth, strict=True)) / len(val)
    off_by_one = sum(is_answer(t, a + 1) for t, a in zip(greedy, truth, strict=True)) / len(val)
    pass_at_4 = sum(any(is_answer(t, a) for t in sampled[4 * i : 4 * i + 4]) for i, a in enumerate(truth)) / len(val)
    assert pass_at_4 >= exact + 0.2, (exact, pass_at_4)
    assert off_by_one >= 0.3, off_by_one


def test_the_teacher_is_off_by_one_at_its_rate_and_otherwise_right():
    rng = random.Random(5)
    got = [int(teacher_answer(str(a), rng)) - a for a in range(-9, 19) for _ in range(500)]
    assert set(got) == {0, 1}
    assert abs(sum(got) / len(got) - TEACHER_ERROR) < 0.02
    again = random.Random(5)
    assert got == [int(teacher_answer(str(a), again)) - a for a in range(-9, 19) for _ in range(500)]  # seeded


@pytest.mark.slow
def test_warm_model_is_cached_complete_and_deterministic(warm_dir):
    manifest = json.loads((Path(warm_dir) / "manifest.json").read_text())
    assert manifest["steps"] == WARMUP_STEPS and manifest["dataset"] == "chain_sum"
    assert {"config.json", "tokenizer.json", "chat_template.jinja"} <= set(manifest["files"])
    cache = Path(warm_dir).parent
    assert ensure_warm_model(cache, log=None) == warm_dir  # cached: no second build
    assert not [p for p in cache.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.slow
def test_shared_prefix_loss_equals_the_plain_loss(tiny_model_dir):
    """The warm-up runs the common prompt prefix once per batch: same loss and gradients as full sequences."""
    import reasoning_gym
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    items = reasoning_gym.create_dataset("chain_sum", size=4, seed=3, **WARMUP_CONFIG)
    batch = [_encode(tok, e["question"], str(e["answer"])) for e in items]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager")
    fast = _step_loss(model, batch, tok.pad_token_id)
    fast.backward()
    fast_grad = model.model.embed_tokens.weight.grad.clone()
    model.zero_grad()
    losses = []
    for prompt, response in batch:  # reference: each sequence on its own, mean over all completion tokens
        ids = torch.tensor([prompt + response])
        labels = torch.tensor([[-100] * len(prompt) + response])
        losses.append(model(input_ids=ids, labels=labels).loss * len(response))
    plain = sum(losses) / sum(len(r) for _, r in batch)
    plain.backward()
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast_grad, model.model.embed_tokens.weight.grad, rtol=1e-4, atol=1e-6)
