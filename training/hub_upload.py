"""The ``hf_upload`` config block -> :class:`utils.hf_uploader.HuggingFaceUploader`, checked before Ray starts.

``train_grpo.py`` calls :func:`setup_hub_upload` right after ``check_run_config``: it validates the block, runs the
uploader's preflight (token valid, may write to the namespace, repo created with the requested visibility; a public
repo announced loudly) and wires the run for uploads:

- ``trainer.checkpoint_callback_class`` -> :class:`training.hub_upload_hook.HubUploadCallback` (veRL's driver-side
  ``on_save`` seam; the callback consolidates + uploads in a low-priority Ray actor on rank 0's node);
- ``trainer.save_freq <= 0`` (never save) -> a save at the last step only, so there is something to upload.

This module imports neither veRL nor Ray: a wrong token or repo id fails in about a second, before any worker.

Example:
    >>> cfg = OmegaConf.create({"hf_upload": {"enabled": False}})  # doctest: +SKIP
    >>> setup_hub_upload(cfg) is None  # doctest: +SKIP
    True
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from omegaconf import OmegaConf

from training.config_schema import typed_section
from training.errors import ConfigError
from utils.hf_uploader import HuggingFaceUploader
from utils.hub.client import PreflightReport
from utils.hub.errors import InvalidUploadConfigError

__all__ = ["CALLBACK_CLASS", "FORCED_SAVE_FREQ", "setup_hub_upload", "tiny_model_description", "uploader_from_config",
           "uploader_settings"]

logger = logging.getLogger(__name__)

CALLBACK_CLASS = "training.hub_upload_hook.HubUploadCallback"
# `save_freq` so large that veRL's `is_last_step or step % save_freq == 0` saves at the last step only.
FORCED_SAVE_FREQ = 10**12


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    """``cfg``'s dotted ``key`` (a config node or a plain dict), ``default`` when absent or null."""
    value = OmegaConf.select(cfg if OmegaConf.is_config(cfg) else OmegaConf.create(cfg or {}), key, default=None)
    return default if value is None else value


def hf_upload_section(cfg: Any) -> Any:
    """The run's ``hf_upload`` block, typed (:class:`training.config_schema.HfUploadConfig`: defaults filled).

    Raises:
        InvalidUploadConfigError: an unknown key or a wrong type (a typo would otherwise be ignored).
    """
    try:  # `bootstrap_from` is the one key outside the schema: given as +hf_upload.bootstrap_from=PATH
        return typed_section("hf_upload", _get(cfg, "hf_upload"), extra=("bootstrap_from",))
    except ConfigError as e:
        raise InvalidUploadConfigError(str(e)) from None


def tiny_model_description(path: str) -> str:
    """What a ``tiny://`` base model is, for the model card (it is built offline, so no Hub page can say it).

    Example:
        >>> tiny_model_description("tiny://qwen2")
        "`tiny://qwen2`: this project's offline tiny Qwen2, randomly initialised (training/tiny_model.py)"
    """
    if path == "tiny://qwen2-warm":
        from training.warm_model import TEACHER_ERROR, WARMUP_DATASET, WARMUP_STEPS

        return (f"`{path}`: this project's offline tiny Qwen2 after {WARMUP_STEPS} supervised steps on "
                f"{WARMUP_DATASET} from a teacher whose answers are off by one {TEACHER_ERROR:.0%} of the time "
                "(training/warm_model.py)")
    return f"`{path}`: this project's offline tiny Qwen2, randomly initialised (training/tiny_model.py)"


def uploader_settings(cfg: Any) -> dict[str, Any]:
    """Keyword arguments of :class:`HuggingFaceUploader` for this run's ``hf_upload`` block (never a token).

    The model card learns the base model and the reasoning-gym datasets with their weights. A Hub id goes into the
    card's metadata and links to its page; the offline ``tiny://`` models are named in the card's details table with
    what they are (:func:`tiny_model_description`); a local path is left out (it means nothing to the card's readers
    and may name a user's folders).

    Raises:
        InvalidUploadConfigError: an unknown ``hf_upload`` key or a wrong type (a typo would otherwise be ignored).
    """
    hf = hf_upload_section(cfg)
    datasets = _get(cfg, "reasoning_gym.datasets", {}) or {}
    card_info: dict[str, Any] = {
        "datasets": {str(name): float((spec or {}).get("weight", 1.0)) for name, spec in datasets.items()},
        "dataset_configs": {str(name): _plain((spec or {}).get("config") or {}) for name, spec in datasets.items()},
        "extra": {"experiment": str(_get(cfg, "trainer.experiment_name", ""))},
        "max_new_tokens": int(_get(cfg, "data.max_response_length", 64)),
    }
    base_model = str(_get(cfg, "actor_rollout_ref.model.path", "") or "")  # what the run loads
    named = str(hf.base_model or base_model)  # what the card names (setup_hub_upload records it as written)
    if named.startswith("tiny://"):
        card_info["extra"]["base model"] = tiny_model_description(named)
    elif named and not named.startswith("/"):
        card_info["base_model"] = named  # a Hub id; local paths mean nothing to readers of the card
    return {
        "lora": hf.lora,  # LoRA runs only: adapter | merged | both
        # adapter_config.json's base_model_name_or_path: the Hub id, or the local folder the run loaded
        "lora_base_model": base_model if base_model and not base_model.startswith("tiny://") else None,
        "repo_id": hf.repo_id,
        "organization": hf.organization or None,
        "private": hf.private,
        "optimizer_save_mode": hf.optimizer_save_mode,
        "endpoint": hf.endpoint or None,
        "weights_format": hf.weights_format,
        "dtype": hf.dtype,
        "max_shard_size": hf.max_shard_size,
        "strategy": hf.strategy,
        "namespace": hf.namespace or "",
        "request_timeout": float(hf.request_timeout) if hf.request_timeout else None,
        "max_attempts": _positive(hf.max_attempts, "hf_upload.max_attempts"),
        "card_info": card_info,
    }


def _positive(value: Any, key: str) -> int:
    if int(value) < 1:
        raise InvalidUploadConfigError(f"{key}={value}: give at least 1 (1 = no retry)")
    return int(value)


def _plain(node: Any) -> Any:
    try:
        from omegaconf import OmegaConf

        return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
    except ImportError:  # pragma: no cover - omegaconf comes with hydra
        return node


def prompt_example(cfg: Any) -> dict[str, str]:
    """The run's system prompt and one val question, for the card's load-and-generate snippet (best effort)."""
    rg = _get(cfg, "reasoning_gym", None)
    if rg is None:
        return {}
    try:
        from training.data import build_reasoning_gym_dataset, system_prompt

        return {"system_prompt": system_prompt(rg), "example_question": build_reasoning_gym_dataset(rg, "val")[0]["question"]}
    except Exception as e:  # noqa: BLE001 - a card without an example question is still a card
        logger.debug("no example question for the model card: %s", e)
        return {}


def uploader_from_config(cfg: Any, *, token: str | None = None, **overrides: Any) -> HuggingFaceUploader:
    """A :class:`HuggingFaceUploader` for this run (token: ``token``, else ``HF_TOKEN`` / the saved login).

    Raises:
        MissingRepoIdError, InvalidRepoIdError, InvalidOptimizerSaveModeError, InvalidUploadConfigError.
    """
    return HuggingFaceUploader(token=token, **{**uploader_settings(cfg), **overrides})


def setup_hub_upload(cfg: Any) -> PreflightReport | None:
    """Check the ``hf_upload`` block against the Hub and wire the run for uploads; ``None`` when disabled.

    Call before Ray starts: every failure here costs seconds, not a training run.

    Args:
        cfg: The composed run config (modified in place: callback class, forced last-step save,
            ``hf_upload.base_model`` as written when unset).

    Returns:
        The preflight report (user, repo, visibility), or ``None`` when ``hf_upload.enabled`` is false.

    Raises:
        MissingRepoIdError, InvalidRepoIdError, InvalidUploadConfigError: a bad block.
        MissingTokenError, InvalidTokenError, ReadOnlyTokenError, NamespaceAccessError, HubUnreachableError:
            what the Hub said; each message says what to fix.
    """
    if not bool(_get(cfg, "hf_upload.enabled", False)):
        return None
    from omegaconf import open_dict

    # A token still in the config (compose API, no Hydra callback) is used here; prepare_config later moves it to
    # HF_TOKEN for the Ray workers and blanks it.
    token = _get(cfg, "hf_upload.token", None)
    uploader = uploader_from_config(cfg, token=str(token) if token else None, progress=False)
    report = uploader.preflight()
    if not report.private:
        bar = "!" * 100
        print(f"{bar}\n!! hf_upload: the Hub repo {report.url} is PUBLIC: every model this run uploads can be "
              f"downloaded by anyone.\n!! Set hf_upload.private=true (and make the repo private) if that is not "
              f"what you want.\n{bar}", file=sys.stderr, flush=True)
    print(f"hf_upload: preflight ok - user '{report.user}' may write to {report.repo_id} "
          f"({'private' if report.private else 'PUBLIC'}, {'created' if report.created else 'exists'}); strategy "
          f"{uploader.strategy}", flush=True)

    with open_dict(cfg):
        current = _get(cfg, "trainer.checkpoint_callback_class", None)
        if current and current != CALLBACK_CLASS:
            raise InvalidUploadConfigError(
                f"trainer.checkpoint_callback_class={current!r} is set, but hf_upload.enabled=true needs "
                f"{CALLBACK_CLASS!r}. Subclass HubUploadCallback in your callback, or disable hf_upload."
            )
        cfg.trainer.checkpoint_callback_class = CALLBACK_CLASS
        if not _get(cfg, "hf_upload.base_model", None):
            # The base model as the user wrote it: prepare_config later resolves tiny://... to a cache folder, which
            # the card would have to leave out (uploader_settings).
            cfg.hf_upload.base_model = str(_get(cfg, "actor_rollout_ref.model.path", "") or "") or None
        if int(_get(cfg, "trainer.save_freq", -1)) <= 0:
            # No checkpoint means nothing to consolidate: save (only) at the last step instead.
            print("hf_upload: trainer.save_freq <= 0 would save nothing; saving at the last step for the upload",
                  flush=True)
            cfg.trainer.save_freq = FORCED_SAVE_FREQ
    return report
