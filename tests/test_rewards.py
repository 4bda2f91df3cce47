"""Rewards against real reasoning-gym entries: correctness, format, partial credit, token-based length shaping."""

import logging

import pytest
import reasoning_gym
from omegaconf import OmegaConf

from training.data import ReasoningGymDataset
from training.errors import ConfigError, RewardError
from training.rewards import (
    REWARD_REGISTRY,
    compute_score,
    cosine_reward,
    count_tokens,
    length_reward,
    partial_reward,
    strip_special_tokens,
    validate_reward_config,
)

NAMES = ["chain_sum", "letter_counting", "spell_backward", "word_sorting", "fraction_simplification", "knights_knaves"]


@pytest.fixture(scope="module")
def entries():
    return {name: reasoning_gym.create_dataset(name, size=3, seed=5)[0] for name in NAMES}


def score(entry, response, **kwargs):
    name = entry["metadata"]["source_dataset"]
    return compute_score(name, response, entry["answer"], {"entry": entry}, **kwargs)


def tagged(answer):
    return f"<think>reasoning</think>\n<answer>{answer}</answer>"


@pytest.mark.parametrize("name", NAMES)
def test_correct_answer_scores_one(entries, name):
    out = score(entries[name], tagged(entries[name]["answer"]))
    assert (out["accuracy"], out["acc"], out["score"], out["answer_found"]) == (1.0, 1.0, 1.0, 1.0)


def test_wrong_answers_get_the_datasets_own_score(entries):
    chain = entries["chain_sum"]
    # reasoning-gym's numeric scorer gives len(oracle)/len(answer) when the oracle is a substring.
    assert score(chain, tagged(chain["answer"] + "x"))["accuracy"] == pytest.approx(
        len(chain["answer"]) / (len(chain["answer"]) + 1)
    )
    assert score(chain, tagged("zzz"))["accuracy"] == 0.0
    # fraction_simplification gives 0.01 to any non-fraction answer (its own rule, not ours).
    assert score(entries["fraction_simplification"], tagged("zzz"))["accuracy"] == 0.01
    for name, entry in entries.items():
        wrong = "not " + entry["answer"]
        expected = reasoning_gym.create_dataset(name, size=1).score_answer(wrong, entry)
        assert score(entry, tagged(wrong))["accuracy"] == expected, name


def test_missing_malformed_and_nested_tags(entries, caplog):
    e = entries["spell_backward"]
    a = e["answer"]
    missing = score(e, a)
    assert (missing["accuracy"], missing["answer_found"]) == (0.0, 0.0)
    assert score(e, f"<answer>{a}")["accuracy"] == 0.0  # never closed
    assert score(e, f"<answer>{a}</answr>")["accuracy"] == 0.0
    # Last complete tag wins (reasoning_gym.utils.extract_answer semantics).
    assert score(e, f"<answer>wrong</answer> then <answer>{a}</answer>")["accuracy"] == 1.0
    assert score(e, f"<answer>{a}</answer> then <answer>wrong</answer>")["accuracy"] == 0.0
    # Nested: the lazy match captures "<answer>" + answer, which the dataset scores as a wrong answer.
    nested = score(e, f"<answer><answer>{a}</answer></answer>")
    assert nested["answer_found"] == 1.0
    assert nested["accuracy"] == reasoning_gym.create_dataset("spell_backward", size=1).score_answer(f"<answer>{a}", e)
    assert nested["accuracy"] < 1.0


def test_empty_response_scores_zero_with_the_same_keys(entries):
    secondary = [{"name": "format", "scaling_factor": 0.2}, {"name": "partial", "scaling_factor": 0.5}]
    full = score(entries["chain_sum"], tagged(entries["chain_sum"]["answer"]), secondary_rewards=secondary)
    for empty in ["", "   ", "<|im_end|>"]:
        out = score(entries["chain_sum"], empty, secondary_rewards=secondary)
        assert out == {
            "score": 0.0,
            "accuracy": 0.0,
            "acc": 0.0,
            "exact": 0.0,
            "answer_found": 0.0,
            "scorer_error": 0.0,
            "format": 0.0,
            "partial": 0.0,
        }
        assert out.keys() == full.keys()
    assert full["score"] == pytest.approx(1.0 + 0.2 + 0.5)
    assert full["exact"] == 1.0


def test_exact_is_one_only_for_a_full_score(entries):
    """`exact` (the demo's headline accuracy) counts only full marks; the dataset's partial credit does not."""
    entry = entries["chain_sum"]
    wrong = str(int(entry["answer"]) + 1)
    assert score(entry, tagged(entry["answer"]))["exact"] == 1.0
    assert score(entry, tagged(wrong))["exact"] == 0.0


def test_special_tokens_are_stripped_before_scoring(entries):
    e = entries["letter_counting"]
    out = score(
        e,
        f"<think>x</think><answer>{e['answer']}<|im_end|></answer><|endoftext|>",
        secondary_rewards=[{"name": "format", "scaling_factor": 1.0}],
    )
    assert (out["accuracy"], out["format"]) == (1.0, 1.0)
    assert strip_special_tokens("a<|im_end|>b<｜end▁of▁sentence｜>c<|endoftext|>") == "abc"
    assert strip_special_tokens("x < y | z > w") == "x < y | z > w"


def test_format_reward_needs_exactly_one_of_each_tag(entries):
    e = entries["chain_sum"]
    fmt = [{"name": "format", "scaling_factor": 1.0}]
    assert score(e, "  <think>a</think>\n<answer>1</answer>\n", secondary_rewards=fmt)["format"] == 1.0
    for bad in [
        "<answer>1</answer>",
        "<think>a</think><think>b</think><answer>1</answer>",
        "<answer>1</answer><think>a</think>",
        "<think>a</think><answer>1</answer> trailing",
    ]:
        assert score(e, bad, secondary_rewards=fmt)["format"] == 0.0, bad


def test_original_trainer_kwargs_layout_is_accepted(entries):
    e = entries["chain_sum"]
    spec = [{"name": "format", "scaling_factor": 0.2, "kwargs": {"preappend_thinking_token": True}}]
    validate_reward_config({"secondary_rewards": spec})
    out = score(e, f"reasoning</think><answer>{e['answer']}</answer>", secondary_rewards=spec)
    assert out["format"] == 1.0 and out["score"] == pytest.approx(1.2)
    with pytest.raises(ConfigError, match=r"unknown parameter\(s\) \['prepend'\]"):
        validate_reward_config({"secondary_rewards": [{"name": "format", "kwargs": {"prepend": True}}]})


def test_partial_reward_is_dense_and_ordered(entries):
    e = {"answer": "17", "metadata": {"source_dataset": "chain_sum"}}
    ladder = ["", "1 blah", "<answer>", "<answer></answer>", "17", "<answer>1</answer>", "<answer>17</answer>"]
    values = [partial_reward(r, e, accuracy=0.0, num_tokens=None) for r in ladder]
    assert values == sorted(values) and len(set(values)) == len(values), values
    assert values[0] == 0.0 and values[-1] == pytest.approx(1.0)
    assert partial_reward("blah blah", e, accuracy=0.0, num_tokens=None) == 0.0
    # Shorter responses built of the answer's characters earn more: something a random policy can climb.
    assert partial_reward("17", e, accuracy=0, num_tokens=None) > partial_reward(
        "17" + "x" * 40, e, accuracy=0, num_tokens=None
    )


def test_length_rewards_count_tokens_not_characters(tiny_model_dir, entries):
    e = entries["chain_sum"]
    response = tagged(e["answer"])
    assert count_tokens("<answer></answer>", tiny_model_dir) == 2  # 17 characters
    kwargs = {
        "tokenizer_path": tiny_model_dir,
        "secondary_rewards": [{"name": "length", "scaling_factor": 1.0, "max_tokens": 100}],
    }
    n = count_tokens(response, tiny_model_dir)
    assert n < len(response) / 2
    assert score(e, response, **kwargs)["length"] == pytest.approx(1 - n / 100)
    # The stop token a decode may leave behind does not count.
    assert score(e, response + "<|im_end|>", **kwargs)["length"] == pytest.approx(1 - n / 100)


@pytest.mark.parametrize("fn", [cosine_reward, length_reward])
def test_length_rewards_never_reward_longer_or_wrong_answers(fn):
    lengths = [0, 1, 10, 100, 500, 999, 1000, 1001, 1500, 2000, 5000]
    correct = [fn("", {}, accuracy=1.0, num_tokens=n, max_tokens=1000) for n in lengths]
    partial = [fn("", {}, accuracy=0.4, num_tokens=n, max_tokens=1000) for n in lengths]
    wrong = [fn("", {}, accuracy=0.0, num_tokens=n, max_tokens=1000) for n in lengths]
    assert correct == sorted(correct, reverse=True) and correct[0] > correct[-1]
    assert partial == sorted(partial, reverse=True)
    assert wrong == [0.0] * len(lengths)
    # Clipped, not periodic: twice the limit earns exactly what the limit earns (the old cosine paid 0.21 again).
    assert correct[lengths.index(2000)] == correct[lengths.index(1000)] == correct[-1]


def test_cosine_endpoints():
    assert cosine_reward("", {}, accuracy=1.0, num_tokens=0, max_tokens=10) == pytest.approx(1.0)
    assert cosine_reward("", {}, accuracy=1.0, num_tokens=10, max_tokens=10) == pytest.approx(0.5)
    assert cosine_reward("", {}, accuracy=1.0, num_tokens=5, max_tokens=10) == pytest.approx(0.75)


def test_scorer_exceptions_are_counted_and_logged(entries, caplog):
    e = dict(entries["word_sorting"])
    e["metadata"] = {"source_dataset": "word_sorting"}  # the scorer needs metadata["sorted_words"]
    with caplog.at_level(logging.WARNING, logger="training.rewards"):
        out = score(e, tagged(e["answer"]))
    assert (out["accuracy"], out["scorer_error"]) == (0.0, 1.0)
    assert "reasoning-gym scorer of word_sorting raised KeyError" in caplog.text


def test_rows_not_from_our_dataset_are_rejected(entries):
    e = entries["chain_sum"]
    with pytest.raises(RewardError, match="extra_info has no reasoning-gym 'entry'"):
        compute_score("chain_sum", "<answer>1</answer>", e["answer"], {"index": 3})
    with pytest.raises(RewardError, match="but its entry is from 'chain_sum'"):
        compute_score("chain_sum", "<answer>1</answer>", "not the answer", {"entry": e})


def test_reward_kwargs_accept_omegaconf_as_veRL_passes_them(entries):
    kwargs = OmegaConf.create({"use_accuracy": False, "secondary_rewards": [{"name": "format", "scaling_factor": 0.5}]})
    out = score(
        entries["chain_sum"], tagged(entries["chain_sum"]["answer"]), **dict(kwargs), reward_router_address=None
    )
    assert (out["accuracy"], out["score"]) == (1.0, 0.5)


def test_val_rows_are_scored_against_val_entries():
    """The original trainer scored val answers against the train entry at the same index (0/200 scored 1.0)."""
    rg = {"datasets": {"letter_jumble": {"weight": 1}, "spell_backward": {"weight": 1}}, "dataset_size": 24}
    cfg = OmegaConf.create({"reasoning_gym": rg})
    train = ReasoningGymDataset("reasoning_gym://train", None, cfg)
    val = ReasoningGymDataset("reasoning_gym://val", None, cfg)
    own, crossed = [], []
    for i in range(len(val)):
        v, t = val[i], train[i]
        answer = tagged(v["reward_model"]["ground_truth"])
        own.append(compute_score(v["data_source"], answer, v["reward_model"]["ground_truth"], v["extra_info"]))
        # What the old trainer effectively did: the val answer, judged by the train entry at the same index.
        crossed.append(compute_score(t["data_source"], answer, t["reward_model"]["ground_truth"], t["extra_info"]))
    assert [o["accuracy"] for o in own] == [1.0] * len(val)
    assert not [c for c in crossed if c["accuracy"] == 1.0]
    assert sum(c["accuracy"] for c in crossed) < len(val) / 4


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (
            {"secondary_rewards": [{"name": "formatt"}]},
            r"secondary_rewards\[0\].name='formatt' is not a reward.*'format'",
        ),
        ({"secondary_rewards": [{"name": "format", "scaling_factor": "big"}]}, r"scaling_factor='big'"),
        ({"secondary_rewards": [{"name": "format", "max_tokens": 3}]}, r"unknown parameter\(s\) \['max_tokens'\]"),
        ({"secondary_rewards": [{"name": "cosine", "max_tokens": 9}]}, r"counts tokens: set .*tokenizer_path"),
        ({"tokenizer_path": "/m", "secondary_rewards": [{"name": "length"}]}, r"max_tokens=None: expected a positive"),
        ({"use_accuracy": False, "secondary_rewards": []}, "nothing would be rewarded"),
        ({"secondary_rewards": "format"}, "expected a list"),
        ({"secondary_rewards": [{"name": "format"}, {"name": "format"}]}, "listed twice"),
    ],
)
def test_bad_reward_configs(cfg, message):
    with pytest.raises(ConfigError, match=message):
        validate_reward_config(cfg)


def test_good_reward_configs_pass():
    validate_reward_config({})
    validate_reward_config(
        {
            "secondary_rewards": [
                {"name": n, "scaling_factor": 0.1, **({"max_tokens": 64} if n in ("cosine", "length") else {})}
                for n in REWARD_REGISTRY
            ],
            "tokenizer_path": "/m",
        }
    )


def test_through_veRLs_own_reward_manager(tiny_model_dir):
    """veRL's loader + NaiveRewardManager.run_single: decode, kwargs merge, dict return, extra keys."""
    import asyncio

    import numpy as np
    import torch
    from transformers import AutoTokenizer
    from verl import DataProto
    from verl.experimental.reward_loop.reward_manager.naive import NaiveRewardManager
    from verl.trainer.ppo.reward import get_custom_reward_fn

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = OmegaConf.create(
        {
            "reward": {
                "custom_reward_function": {
                    "path": "pkg://training.rewards",
                    "name": "compute_score",
                    "reward_kwargs": {
                        "secondary_rewards": [
                            {"name": "format", "scaling_factor": 0.2},
                            {"name": "length", "scaling_factor": 0.1},
                        ],
                        "tokenizer_path": tiny_model_dir,
                        "max_response_tokens": 32,
                    },
                }
            }
        }
    )
    rg = {"datasets": {"chain_sum": {"weight": 1}}, "dataset_size": 4}
    row = ReasoningGymDataset("reasoning_gym://val", None, OmegaConf.create({"reasoning_gym": rg}))[1]
    text = f"<think>x</think><answer>{row['reward_model']['ground_truth']}</answer>"
    ids = tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
    width = len(ids) + 3  # right padding, as veRL pads responses
    responses = torch.tensor([ids + [tok.pad_token_id] * 3])
    prompt = torch.tensor([[tok.pad_token_id, 5, 6]])
    attention = torch.tensor([[0, 1, 1] + [1] * len(ids) + [0] * 3])
    data = DataProto.from_dict(
        tensors={"responses": responses, "prompts": prompt, "attention_mask": attention},
        non_tensors={k: np.array([row[k]], dtype=object) for k in ("data_source", "reward_model", "extra_info")},
    )
    assert responses.shape[1] == width
    manager = NaiveRewardManager(cfg, tok, get_custom_reward_fn(cfg))
    result = asyncio.get_event_loop().run_until_complete(manager.run_single(data))
    n = len(ids) - 1  # the eos token is decoded away (skip_special_tokens) and not counted
    expected = 1.0 + 0.2 * 1.0 + 0.1 * (1 - n / 32)
    assert result["reward_score"] == pytest.approx(expected)
    info = result["reward_extra_info"]
    assert (info["accuracy"], info["acc"], info["format"]) == (1.0, 1.0, 1.0)
    assert info["length"] == pytest.approx(1 - n / 32)
