"""Rewards for reasoning-gym GRPO, served to veRL 0.9.1 as `reward.custom_reward_function`.

How veRL 0.9.1 calls it (`verl/trainer/ppo/reward.py:get_custom_reward_fn`,
`verl/experimental/reward_loop/reward_manager/naive.py:NaiveRewardManager.run_single`): once per completion, with
keyword arguments `data_source`, `solution_str` (the response decoded with `skip_special_tokens=True`),
`ground_truth` (`reward_model.ground_truth` of the row), `extra_info` (the row's `extra_info`, plus `num_turns` and
`rollout_reward_scores`), merged with `reward.custom_reward_function.reward_kwargs` from the config (those win). A
dict return must hold `score`; every key (`score` included) goes to `reward_extra_info`, which veRL turns into
per-key arrays over the batch from the FIRST item's keys - so every call returns the same keys - and into
per-data-source validation metrics (`acc` is the "val-core" metric).

Config (reward_kwargs; the original trainer's `reward` keys plus two for token counting):

    reward:
      custom_reward_function:
        path: pkg://training.rewards
        name: compute_score
        reward_kwargs:
          use_accuracy: true
          secondary_rewards:
            - {name: format, scaling_factor: 0.2}
            - {name: cosine, scaling_factor: 0.3, max_tokens: 1024}
          tokenizer_path: ${actor_rollout_ref.model.path}      # for token-counting rewards
          max_response_tokens: ${data.max_response_length}     # default max_tokens of length rewards

Correctness is `reasoning_gym.utils.extract_answer` (last `<answer>...</answer>`) scored by the entry's own dataset
scorer (`reasoning_gym.get_score_answer_fn(entry["metadata"]["source_dataset"])`) against the entry carried by the
row itself (`extra_info["entry"]`), never against an entry looked up by index in another dataset.

Example:
    >>> import reasoning_gym
    >>> entry = reasoning_gym.create_dataset("chain_sum", size=1, seed=1)[0]
    >>> out = compute_score("chain_sum", f"<think>x</think><answer>{entry['answer']}</answer>", entry["answer"],
    ...                     {"entry": entry}, secondary_rewards=[{"name": "format", "scaling_factor": 0.2}])
    >>> (out["accuracy"], out["format"], out["score"])
    (1.0, 1.0, 1.2)
"""

from __future__ import annotations

import difflib
import functools
import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from training.errors import ConfigError, RewardError

__all__ = [
    "LENGTH_REWARDS",
    "REWARD_REGISTRY",
    "compute_score",
    "cosine_reward",
    "format_reward",
    "length_reward",
    "partial_reward",
    "strip_special_tokens",
    "validate_reward_config",
]

logger = logging.getLogger(__name__)

# Qwen/ChatML-style `<|...|>` and DeepSeek-style `<｜...｜>` special tokens.
_SPECIAL_TOKEN_RE = re.compile(r"<\|[^<>|]{1,64}\|>|<｜[^<>｜]{1,64}｜>")
_FORMAT_RE = re.compile(r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*", re.DOTALL)


def strip_special_tokens(text: str) -> str:
    """Remove chat special tokens (`<|im_end|>`, `<|endoftext|>`, ...) that a decode may have left in `text`."""
    return _SPECIAL_TOKEN_RE.sub("", text)


def _extract_answer(response: str) -> str | None:
    from reasoning_gym.utils import extract_answer

    return extract_answer(response)


# --- reward functions: pure, (response, entry, accuracy, num_tokens, **params) -> float ---------------------------


def format_reward(
    response: str,
    entry: Mapping[str, Any],
    *,
    accuracy: float,
    num_tokens: int | None,
    preappend_thinking_token: bool = False,
) -> float:
    """1.0 if the response is `<think>...</think> <answer>...</answer>` with exactly one of each tag, else 0.0.

    `preappend_thinking_token` (the original trainer's option) puts `<think>` in front first, for chat templates
    whose generation prompt already ends with it.
    """
    if preappend_thinking_token:
        response = "<think>" + response
    tags = ("<think>", "</think>", "<answer>", "</answer>")
    if any(response.count(t) != 1 for t in tags):
        return 0.0
    return 1.0 if _FORMAT_RE.fullmatch(response) else 0.0


def partial_reward(response: str, entry: Mapping[str, Any], *, accuracy: float, num_tokens: int | None) -> float:
    """Dense partial credit in [0, 1] that a randomly initialised model can climb.

    0.3 x the fraction of {`<answer>` present, `</answer>` present, a complete `<answer>...</answer>` pair}, plus
    0.7 x the character similarity (`difflib` ratio, 2*matches/(len(a)+len(b))) between the extracted answer and
    the oracle answer - or half of it between the whole response and the oracle when there is no answer tag. The
    ratio falls with every extra character, so it pays for short responses made of the answer's characters, and
    reaches 1.0 exactly for a tagged, exactly matching answer.
    """
    oracle = str(entry["answer"])
    answer = _extract_answer(response)
    tag_credit = (("<answer>" in response) + ("</answer>" in response) + (answer is not None)) / 3
    candidate = answer if answer is not None else response.strip()
    if not candidate or not oracle:
        similarity = 0.0
    else:
        # The short oracle is `b`: SequenceMatcher indexes `b`, so long responses stay cheap.
        similarity = difflib.SequenceMatcher(None, candidate, oracle, autojunk=False).ratio()
    if answer is None:
        similarity *= 0.5
    return 0.3 * tag_credit + 0.7 * similarity


def _progress(num_tokens: int | None, max_tokens: int) -> float:
    if num_tokens is None:
        raise RewardError("a length-shaped reward needs a token count: set reward_kwargs.tokenizer_path")
    # Clipped: a response longer than max_tokens is treated as exactly max_tokens, never as a new period.
    return min(max(num_tokens, 0) / max_tokens, 1.0)


def cosine_reward(
    response: str,
    entry: Mapping[str, Any],
    *,
    accuracy: float,
    num_tokens: int | None,
    max_tokens: int,
    min_value: float = 0.5,
    max_value: float = 1.0,
) -> float:
    """accuracy x a cosine that decays from `max_value` (0 tokens) to `min_value` (>= `max_tokens` tokens).

    Length is counted in tokens and clipped, and the result is a non-increasing function of length scaled by
    accuracy: a wrong answer earns 0 at every length, a longer answer never earns more than a shorter one. (The
    original trainer counted characters without clipping - a periodic reward - and paid long wrong answers.)
    """
    progress = _progress(num_tokens, max_tokens)
    return accuracy * (min_value + 0.5 * (max_value - min_value) * (1.0 + math.cos(math.pi * progress)))


def length_reward(
    response: str, entry: Mapping[str, Any], *, accuracy: float, num_tokens: int | None, max_tokens: int
) -> float:
    """accuracy x (1 - clipped token progress): pays concise correct answers, never longer or wrong ones."""
    return accuracy * (1.0 - _progress(num_tokens, max_tokens))


RewardFn = Callable[..., float]
REWARD_REGISTRY: dict[str, RewardFn] = {
    "format": format_reward,
    "partial": partial_reward,
    "cosine": cosine_reward,
    "length": length_reward,
}
# Rewards that count tokens, and the extra parameters each secondary reward accepts.
LENGTH_REWARDS = frozenset({"cosine", "length"})
_PARAMS: dict[str, frozenset[str]] = {
    "format": frozenset({"preappend_thinking_token"}),
    "partial": frozenset(),
    "cosine": frozenset({"max_tokens", "min_value", "max_value"}),
    "length": frozenset({"max_tokens"}),
}
_KWARG_KEYS = frozenset({"use_accuracy", "secondary_rewards", "tokenizer_path", "max_response_tokens"})


# --- config -------------------------------------------------------------------------------------------------------


def _plain(cfg: Any) -> Any:
    from training.config_schema import to_plain

    return to_plain(cfg)


def validate_reward_config(reward_cfg: Any, *, key: str = "reward.custom_reward_function.reward_kwargs") -> None:
    """Check the reward settings (the `reward_kwargs` that reach `compute_score`) before anything runs.

    Args:
        reward_cfg: Mapping with `use_accuracy`, `secondary_rewards` (list of `{name, scaling_factor, ...}`),
            optional `tokenizer_path` and `max_response_tokens`. Other keys are left alone (veRL owns them).
        key: The config path named in error messages.

    Raises:
        ConfigError: Unknown reward name, non-numeric scaling factor, unknown parameter, a length-shaped reward
            without a tokenizer path or without `max_tokens`/`max_response_tokens`, or nothing to reward.

    Example:
        >>> validate_reward_config({"secondary_rewards": [{"name": "formatt", "scaling_factor": 0.2}]})
        Traceback (most recent call last):
        ...
        training.errors.ConfigError: reward.custom_reward_function.reward_kwargs.secondary_rewards[0].name='formatt' is not a reward; use one of ['cosine', 'format', 'length', 'partial'] (did you mean 'format'?)
    """
    cfg = _plain(reward_cfg) or {}
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"{key}: expected a mapping, got {type(cfg).__name__}")
    secondary = cfg.get("secondary_rewards") or []
    if not isinstance(secondary, Sequence) or isinstance(secondary, str):
        raise ConfigError(f"{key}.secondary_rewards: expected a list of {{name, scaling_factor}}, got {secondary!r}")
    if not cfg.get("use_accuracy", True) and not secondary:
        raise ConfigError(f"{key}: use_accuracy is false and secondary_rewards is empty; nothing would be rewarded")
    seen: set[str] = set()
    for i, spec in enumerate(secondary):
        where = f"{key}.secondary_rewards[{i}]"
        if not isinstance(spec, Mapping) or "name" not in spec:
            raise ConfigError(f"{where}={spec!r}: expected {{name: <reward>, scaling_factor: <float>}}")
        name = spec["name"]
        if name in seen:
            raise ConfigError(f"{where}.name={name!r} is listed twice; merge the entries (one scaling_factor each)")
        seen.add(name)
        if name not in REWARD_REGISTRY:
            close = difflib.get_close_matches(str(name), REWARD_REGISTRY, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}.name={name!r} is not a reward; use one of {sorted(REWARD_REGISTRY)}{hint}")
        factor = spec.get("scaling_factor", 1.0)
        if isinstance(factor, bool) or not isinstance(factor, int | float) or not math.isfinite(factor):
            raise ConfigError(f"{where}.scaling_factor={factor!r}: expected a finite number")
        nested = spec.get("kwargs") or {}
        if not isinstance(nested, Mapping):
            raise ConfigError(f"{where}.kwargs={nested!r}: expected a mapping of parameters")
        unknown = (set(spec) - {"name", "scaling_factor", "kwargs"} | set(nested)) - _PARAMS[name]
        if unknown:
            raise ConfigError(
                f"{where} ({name}): unknown parameter(s) {sorted(unknown)}; {name} accepts {sorted(_PARAMS[name])}"
            )
        if name in LENGTH_REWARDS:
            if not cfg.get("tokenizer_path"):
                raise ConfigError(
                    f"{where} ({name}) counts tokens: set {key}.tokenizer_path (e.g. ${{actor_rollout_ref.model.path}})"
                )
            max_tokens = _params(spec).get("max_tokens", cfg.get("max_response_tokens"))
            if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens <= 0:
                raise ConfigError(
                    f"{where} ({name}).max_tokens={max_tokens!r}: expected a positive int "
                    f"(or set {key}.max_response_tokens)"
                )


def _params(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A secondary reward's parameters: its extra keys, plus those under `kwargs` (the original trainer's layout)."""
    flat = {k: v for k, v in spec.items() if k not in ("name", "scaling_factor", "kwargs")}
    return {**flat, **(spec.get("kwargs") or {})}


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str):
    # Cached per process: veRL calls compute_score once per completion.
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def count_tokens(text: str, tokenizer_path: str) -> int:
    """Number of tokens of `text` (no special tokens added) under the tokenizer at `tokenizer_path`."""
    return len(_tokenizer(tokenizer_path)(text, add_special_tokens=False)["input_ids"])


@functools.lru_cache(maxsize=256)
def _scorer(dataset_name: str) -> Callable[[str | None, dict], float]:
    # get_score_answer_fn builds a default-config dataset instance: cache one per dataset per process.
    import reasoning_gym

    return reasoning_gym.get_score_answer_fn(dataset_name)


def _accuracy(answer: str | None, entry: dict[str, Any], dataset: str) -> tuple[float, bool]:
    """The dataset's own score of `answer`; (0.0, True) if its scorer raised (logged, and counted by the caller)."""
    try:
        score = float(_scorer(dataset)(answer, entry))
    except Exception as e:  # a model answer can break a dataset's parser; counted as scorer_error, not hidden
        logger.warning("reasoning-gym scorer of %s raised %s: %s (answer=%.80r)", dataset, type(e).__name__, e, answer)
        return 0.0, True
    if not math.isfinite(score):
        logger.warning("reasoning-gym scorer of %s returned %r (answer=%.80r)", dataset, score, answer)
        return 0.0, True
    return score, False


# --- the veRL hook --------------------------------------------------------------------------------------------------


def compute_score(
    data_source: str,
    solution_str: str,
    ground_truth: Any,
    extra_info: Mapping[str, Any] | None = None,
    **reward_kwargs: Any,
) -> dict[str, float]:
    """Score one completion: accuracy against its own reasoning-gym entry, plus scaled secondary rewards.

    Args:
        data_source: The row's `data_source` (the reasoning-gym dataset name).
        solution_str: The decoded response; special tokens still in it are stripped here.
        ground_truth: The row's `reward_model.ground_truth`; must equal the entry's answer.
        extra_info: The row's `extra_info`; must hold `entry` (the reasoning-gym entry).
        **reward_kwargs: `use_accuracy` (default true), `secondary_rewards`, `tokenizer_path`,
            `max_response_tokens` (see `validate_reward_config`); other keys veRL may add are ignored.

    Returns:
        `{"score": total, "accuracy": a, "acc": a, "exact": 0/1, "answer_found": 0/1, "scorer_error": 0/1,
        <reward name>: raw value for each secondary reward}` - the same keys on every call. `score` =
        use_accuracy * a + sum(scaling_factor * value). `exact` is 1 only for a full score (the dataset's scorer
        may give partial credit): veRL reports it per task as `val-aux/<task>/exact/mean@N`, the demo's headline.

    Raises:
        RewardError: No entry in `extra_info`, or an entry that does not belong to this row (wiring bug).
        ConfigError: Invalid `reward_kwargs`.
    """
    entry = (extra_info or {}).get("entry")
    if not isinstance(entry, Mapping) or "metadata" not in entry:
        raise RewardError(
            f"compute_score(data_source={data_source!r}): extra_info has no reasoning-gym 'entry'; rows must come "
            "from training.data.ReasoningGymDataset"
        )
    dataset = entry["metadata"]["source_dataset"]
    if dataset != data_source or str(ground_truth) != str(entry["answer"]):
        raise RewardError(
            f"compute_score: row says data_source={data_source!r}, ground_truth={str(ground_truth)!r:.80} but its "
            f"entry is from {dataset!r} with answer {str(entry['answer'])!r:.80}"
        )
    settings = {k: v for k, v in reward_kwargs.items() if k in _KWARG_KEYS}
    validate_reward_config(settings)
    settings = _plain(settings)

    response = strip_special_tokens(solution_str or "")
    answer = _extract_answer(response)
    if answer is None:
        logger.debug("no <answer> tag in a %s response of %d chars", dataset, len(response))
    accuracy, scorer_error = _accuracy(answer, dict(entry), dataset)

    secondary = settings.get("secondary_rewards") or []
    num_tokens = None
    if any(spec["name"] in LENGTH_REWARDS for spec in secondary):
        num_tokens = count_tokens(response, settings["tokenizer_path"])
    out = {
        "score": accuracy if settings.get("use_accuracy", True) else 0.0,
        "accuracy": accuracy,
        "acc": accuracy,
        "exact": float(accuracy >= 1.0),
        "answer_found": float(answer is not None),
        "scorer_error": float(scorer_error),
    }
    for spec in secondary:
        name = spec["name"]
        params = _params(spec)
        if name in LENGTH_REWARDS:
            params.setdefault("max_tokens", settings.get("max_response_tokens"))
        value = REWARD_REGISTRY[name](response, entry, accuracy=accuracy, num_tokens=num_tokens, **params)
        out[name] = value
        out["score"] += float(spec.get("scaling_factor", 1.0)) * value
    return out
