"""Keep a Hub token given as ``hf_upload.token=...`` out of Hydra's saved run files.

Hydra writes ``.hydra/config.yaml``, ``hydra.yaml`` (which lists the command-line overrides) and ``overrides.yaml``
into the run directory *before* the task function runs, so redacting inside ``main`` would be too late. Hydra's
``on_run_start`` callback runs after the config is composed and before those files are written: there the token
moves into ``HF_TOKEN`` (where the uploader, Ray workers and ``resume`` read it) and every copy in the config is
replaced, so the token is never written. Multirun jobs are composed again per job after ``on_run_start``; for them
``on_job_start`` rewrites the three files just written.

The entry point registers the callback once, for any config (a user's own included), by adding
:data:`CALLBACK_OVERRIDE` to the command line (:func:`with_redaction_callback`); no YAML has to carry it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

__all__ = ["CALLBACK_OVERRIDE", "REDACTED", "RedactHubToken", "redact_token_in_config", "with_redaction_callback"]

REDACTED = "<redacted: moved to HF_TOKEN>"
_TOKEN_KEY = "hf_upload.token"
# `++`: set it even when a config already lists the callback (older configs did).
CALLBACK_OVERRIDE = "++hydra.callbacks.redact_hub_token._target_=training.hydra_token.RedactHubToken"


def with_redaction_callback(argv: list[str]) -> list[str]:
    """``argv`` plus the Hydra override that registers :class:`RedactHubToken` (once, whatever the config).

    Example:
        >>> with_redaction_callback(["train_grpo.py", "trainer.total_training_steps=2"])[-1]
        '++hydra.callbacks.redact_hub_token._target_=training.hydra_token.RedactHubToken'
    """
    return [*argv, CALLBACK_OVERRIDE]


def redact_token_in_config(config: DictConfig) -> str | None:
    """Move ``hf_upload.token`` into ``HF_TOKEN`` and scrub it from ``config`` (incl. ``hydra.overrides``).

    Args:
        config: Hydra's composed config (with its ``hydra`` node), modified in place.

    Returns:
        The token that was found, or ``None``.
    """
    token = OmegaConf.select(config, _TOKEN_KEY, default=None)
    if not token:
        return None
    token = str(token)
    os.environ["HF_TOKEN"] = token
    with read_write(config), open_dict(config):
        config.hf_upload.token = None
        overrides = OmegaConf.select(config, "hydra.overrides.task", default=None)
        if overrides is not None:
            config.hydra.overrides.task = [
                f"{o.split('=', 1)[0]}={REDACTED}" if token in str(o) else o for o in overrides
            ]
        dirname = OmegaConf.select(config, "hydra.job.override_dirname", default=None)
        if dirname is not None:  # composed from the overrides before this callback runs
            config.hydra.job.override_dirname = str(dirname).replace(token, REDACTED)
    return token


class RedactHubToken(Callback):
    """Hydra callback: no ``hf_upload.token`` in ``.hydra/*.yaml`` (see the module docstring)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        redact_token_in_config(config)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        token = redact_token_in_config(config)  # only multirun jobs still hold a token here
        if token is None or config.hydra.output_subdir is None:
            return
        saved = Path(config.hydra.runtime.output_dir) / str(config.hydra.output_subdir)
        for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
            path = saved / name
            if path.exists():
                path.write_text(path.read_text().replace(token, REDACTED))
