"""Which veRL platform a run asks for, and putting that request where veRL reads it.

veRL picks its platform (device, collective backend, Ray resource) once per process, from ``VERL_PLATFORM`` if set,
else by probing for accelerators. The project's ``cpu`` platform is chosen only on request (never because no GPU
answered a probe: see :mod:`training.cpu_plugin.platform`). A CPU config asks for it in one place:

    ray_kwargs:
      ray_init:
        runtime_env:
          env_vars: {VERL_PLATFORM: cpu}

veRL merges ``ray_kwargs.ray_init.runtime_env`` into ``ray.init``, so every Ray worker of the job (task runner,
FSDP ranks, rollout servers and the vLLM engine processes they start, reward workers, the upload actor) gets the
variable. The driver is no Ray worker: :func:`apply_platform_request` copies the same value into its environment
before it imports veRL. This module imports neither veRL nor Ray, so that order is kept.

Example:
    >>> requested_platform({"ray_kwargs": {"ray_init": {"runtime_env": {"env_vars": {"VERL_PLATFORM": "cpu"}}}}})
    'cpu'
    >>> requested_platform({"trainer": {"device": "cuda"}}) is None
    True
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from training.errors import ConfigError

__all__ = ["PLATFORM_ENV", "PLATFORM_KEY", "apply_platform_request", "requested_platform"]

PLATFORM_ENV = "VERL_PLATFORM"
PLATFORM_KEY = "ray_kwargs.ray_init.runtime_env.env_vars.VERL_PLATFORM"
_FIX = f"add `+{PLATFORM_KEY}=cpu` (the CPU configs declare it) or use a GPU config"


def _select(cfg: Any, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, Mapping) and not hasattr(node, "get"):
            return None
        try:
            node = node.get(part, None)
        except Exception:  # an OmegaConf interpolation that does not resolve is not a request
            return None
        if node is None:
            return None
    return node


def requested_platform(cfg: Mapping[str, Any] | Any) -> str | None:
    """Return the platform the config asks veRL for (``VERL_PLATFORM`` in Ray's runtime env), lower-cased, or None.

    Args:
        cfg: the composed run config (DictConfig or plain dict).
    """
    value = _select(cfg, PLATFORM_KEY)
    if value is None or str(value).strip() == "":
        return None
    return str(value).strip().lower()


def apply_platform_request(cfg: Mapping[str, Any] | Any) -> str | None:
    """Put the config's platform request into this process's environment; call before importing veRL.

    Also checks that the request and ``trainer.device`` agree: a ``cpu`` device without the request would have veRL
    fall back to CUDA, and the request with a CUDA device would run a GPU run on the CPU plugin.

    Args:
        cfg: the composed run config.

    Returns:
        The requested platform name, or None when the config asks for none (veRL's own detection then decides).

    Raises:
        ConfigError: ``trainer.device`` and the request disagree; the message names both keys and the fix.

    Example:
        >>> apply_platform_request({"trainer": {"device": "cuda"}}) is None
        True
    """
    name = requested_platform(cfg)
    device = _select(cfg, "trainer.device")
    device = str(device).strip().lower() if device is not None else None
    if device == "cpu" and name != "cpu":
        raise ConfigError(f"trainer.device=cpu but {PLATFORM_KEY}={name!r}: veRL would not use the CPU platform; {_FIX}")
    if name == "cpu" and device not in (None, "cpu"):
        raise ConfigError(
            f"{PLATFORM_KEY}=cpu but trainer.device={device!r}: set trainer.device=cpu, or drop the request for a GPU run"
        )
    if name is not None:
        os.environ[PLATFORM_ENV] = name
    return name
