"""Offline tiny Qwen2 model + tokenizer for the CPU demo and the tests.

Nothing can be downloaded from the Hugging Face Hub here, so the demo model is built locally: a byte-level BPE
tokenizer trained with `tokenizers` on reasoning-gym task text (questions, answers, system prompts, the
`<think>`/`<answer>` tags), a Qwen-style chat template, and a randomly initialised `Qwen2ForCausalLM` small enough
that a GRPO step takes well under a second on a laptop CPU.

The build is cached: `<cache_dir>/tiny-qwen2-<spec hash>/` holds `save_pretrained` output plus `manifest.json`,
which is written last; a directory without it is never trusted. Concurrent callers (e.g. several pytest workers or
Ray actors) each build in a private temp dir and `os.rename` it into place; the first rename wins and the losers
discard their copy, so no caller ever sees a half-written model.

Example:
    >>> from training.tiny_model import ensure_tiny_model
    >>> path = ensure_tiny_model()                      # doctest: +SKIP
    >>> AutoModelForCausalLM.from_pretrained(path)      # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from training.errors import TinyModelError

__all__ = [
    "CHAT_TEMPLATE",
    "atomic_cached_build",
    "DEMO_DATASETS",
    "MODEL_DIMS",
    "TAG_TOKENS",
    "ensure_tiny_model",
    "default_cache_dir",
]

# Bump when the build recipe changes so that old caches are not reused.
_RECIPE_VERSION = 1
_MANIFEST = "manifest.json"
_SEED = 1234

# Tasks with short numeric answers: the dense `partial` reward gives a random tiny model something to climb.
DEMO_DATASETS: tuple[str, ...] = ("chain_sum", "letter_counting")

# hidden 64 with 2 heads gives head_dim 32: vLLM's CPU backend and some attention kernels need head_dim >= 32.
MODEL_DIMS: dict[str, int] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
}
# Small vocab: a random policy samples each token with p ~ 1/len(vocab), so a small vocab makes the tags and
# digits that the rewards look for show up often enough for GRPO to find them.
_BPE_VOCAB_SIZE = 512
_ENTRIES_PER_DATASET = 400

_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Added as *normal* tokens (single ids, but kept by `decode(skip_special_tokens=True)`, which veRL's reward
# manager uses): making them special would strip the very tags the format/answer rewards look for.
TAG_TOKENS: tuple[str, ...] = ("<think>", "</think>", "<answer>", "</answer>")

# Qwen2.5's chat template, minus tool calling.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def default_cache_dir() -> Path:
    """Return the cache root: `$VERL_GRPO_HUB_CACHE` if set, else `~/.cache/verl-grpo-hub`."""
    env = os.environ.get("VERL_GRPO_HUB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "verl-grpo-hub"


def _spec(datasets: Sequence[str]) -> dict:
    return {
        "recipe_version": _RECIPE_VERSION,
        "architecture": "Qwen2ForCausalLM",
        "datasets": sorted(datasets),
        "bpe_vocab_size": _BPE_VOCAB_SIZE,
        "entries_per_dataset": _ENTRIES_PER_DATASET,
        "seed": _SEED,
        **MODEL_DIMS,
    }


def _training_text(datasets: Sequence[str]) -> Iterator[str]:
    """Yield the text the tokenizer learns from: task questions/answers, every system prompt, the tags."""
    import reasoning_gym
    from reasoning_gym.utils import SYSTEM_PROMPTS

    yield from SYSTEM_PROMPTS.values()
    yield " ".join(TAG_TOKENS)
    for name in datasets:
        try:
            ds = reasoning_gym.create_dataset(name, size=_ENTRIES_PER_DATASET, seed=_SEED)
        except ValueError as e:
            raise TinyModelError(f"ensure_tiny_model(datasets=...): unknown reasoning-gym dataset {name!r}") from e
        for entry in ds:
            yield entry["question"]
            # What a good completion looks like, so answers in tags tokenize compactly.
            yield f"<think> </think>\n<answer>{entry['answer']}</answer>"


def _build_tokenizer(datasets: Sequence[str]):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    # Byte-level BPE like Qwen's: any string round-trips, no <unk>.
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_BPE_VOCAB_SIZE,
        special_tokens=list(_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_text(datasets), trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAG_TOKENS])

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        model_max_length=MODEL_DIMS["max_position_embeddings"],
        padding_side="left",
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    return hf_tok


def _build_into(out_dir: Path, datasets: Sequence[str], spec: dict) -> None:
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tokenizer = _build_tokenizer(datasets)
    eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = Qwen2Config(
        vocab_size=len(tokenizer),  # exactly: veRL's rollout masks ids >= len(tokenizer)
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        dtype="float32",
        **MODEL_DIMS,
    )
    torch.manual_seed(_SEED)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=[eos_id, pad_id], pad_token_id=pad_id, bos_token_id=None)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    n_params = sum(p.numel() for p in model.parameters())
    manifest = {**spec, "vocab_size": len(tokenizer), "num_parameters": n_params, "files": sorted(os.listdir(out_dir))}
    # Written last: its presence is what marks the directory complete.
    (out_dir / _MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def ensure_tiny_model(cache_dir: str | os.PathLike | None = None, *, datasets: list[str] | None = None) -> str:
    """Build (once) and return the directory of the offline tiny Qwen2 demo model.

    Args:
        cache_dir: Cache root; defaults to `default_cache_dir()` (`$VERL_GRPO_HUB_CACHE` or
            `~/.cache/verl-grpo-hub`).
        datasets: reasoning-gym dataset names whose text trains the tokenizer; defaults to `DEMO_DATASETS`.
            Different lists give different cache entries.

    Returns:
        Path (str) of a directory loadable with `AutoModelForCausalLM.from_pretrained` and
        `AutoTokenizer.from_pretrained`, with `config.vocab_size == len(tokenizer)`.

    Raises:
        TinyModelError: An unknown dataset name, or the build failed (nothing is left in the cache then).

    Example:
        >>> path = ensure_tiny_model("/tmp/cache")        # doctest: +SKIP
        >>> sorted(os.listdir(path))[:2]                   # doctest: +SKIP
        ['chat_template.jinja', 'config.json']
    """
    names = list(datasets) if datasets is not None else list(DEMO_DATASETS)
    if not names:
        raise TinyModelError("ensure_tiny_model(datasets=[]): give at least one reasoning-gym dataset name")
    spec = _spec(names)
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return atomic_cached_build(root / f"tiny-qwen2-{key}", lambda out: _build_into(out, names, spec))


def atomic_cached_build(final: Path, build: Callable[[Path], None]) -> str:
    """Return ``final`` once it holds a complete build, building it with ``build(tmp_dir)`` if needed.

    ``build`` writes into a private temp dir beside ``final`` and must write ``manifest.json`` last; the temp dir is
    then renamed into place. Concurrent callers each build and the first rename wins; a reader never sees a
    half-written folder, and a failed build leaves nothing behind.

    Raises:
        TinyModelError: The build failed (``build``'s own ``TinyModelError`` passes through).
    """
    if (final / _MANIFEST).is_file():
        return str(final)
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    if final.exists():
        # A directory without its manifest can only come from a crash in an older, non-atomic writer: nothing
        # in it can be trusted. Move it aside (atomic), then delete, so a concurrent reader never sees it half-gone.
        stale = Path(tempfile.mkdtemp(prefix=f".stale-{final.name}-", dir=root))
        try:
            os.rename(final, stale / "old")
        except OSError:
            pass  # someone else moved or completed it first; re-checked below
        shutil.rmtree(stale, ignore_errors=True)
        if (final / _MANIFEST).is_file():
            return str(final)

    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    try:
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            # Lost the race: another caller renamed its complete build into place first.
            if not (final / _MANIFEST).is_file():
                raise
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, TinyModelError):
            raise
        raise TinyModelError(f"building {final} failed: {e}") from e
    shutil.rmtree(tmp, ignore_errors=True)  # no-op when the rename succeeded
    return str(final)
