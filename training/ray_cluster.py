"""Start a Ray cluster for this run, or join a running one, with any shipped config.

veRL's ``run_ppo`` calls ``ray.init(**ray_kwargs.ray_init)``. With no ``address`` Ray joins whatever it finds
(``RAY_ADDRESS``, else the pointer ``/tmp/ray/ray_current_cluster`` that ``ray start`` leaves) and then refuses the
CPU configs' ``num_cpus``/``num_gpus`` ("When connecting to an existing cluster, num_cpus and num_gpus must not be
provided"); a pointer left by a killed cluster makes it try to join a cluster that no longer exists.
:func:`configure_ray` decides once, before veRL starts Ray, and says in one line what it decided:

- ``ray_kwargs.ray_init.address=local`` -> start a local cluster, whatever else is around;
- ``ray_kwargs.ray_init.address=ADDR`` (``auto``, ``host:port``) or ``RAY_ADDRESS`` -> join it;
- else a pointer from ``ray start`` on this node whose cluster answers -> join it (the multi-node recipe: ``ray
  start`` on every node, then launch on the head); a pointer whose cluster refuses connections is stale -> ignored;
- else start a local cluster.

An address to join where nothing listens (``RAY_ADDRESS`` or ``ray_kwargs.ray_init.address``, connection refused) is
a config error before anything starts (:func:`check_join_target`), not minutes of ``ray.init`` retries.

Joining drops the keys Ray accepts only when it starts a cluster (``num_cpus``, ``num_gpus``, ``resources``, ...):
the running cluster's own resources count (CPU-only nodes must be started with ``ray start --num-gpus=N``, logical
GPUs, one per rank).

Settings reach every node through the job's runtime environment (:data:`FORWARDED_ENV`: the Hub endpoint and
switches, the tracking run ids): workers on nodes started with ``ray start`` do not inherit the launching shell's
environment. The Hub token does not travel that way - Ray's runtime-env agent writes ``env_vars`` in clear into its
log (``runtime_env_agent.log``) - it is an argument of the actors that upload (``training.trainer.TaskRunnerLauncher``).

Example:
    >>> plan = plan_ray_init({"num_cpus": 16, "num_gpus": 2}, environ={"RAY_ADDRESS": "10.0.0.5:6379"})
    >>> plan.action, plan.address, plan.dropped
    ('join', '10.0.0.5:6379', ('num_cpus', 'num_gpus'))
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["FORWARDED_ENV", "START_ONLY_KEYS", "RayPlan", "configure_ray", "forwarded_env", "plan_ray_init",
           "check_join_target", "ray_pointer_file", "refuses_connections"]

# ray.init raises ValueError for each of these when it connects to an existing cluster (ray/_private/worker.py).
START_ONLY_KEYS = ("num_cpus", "num_gpus", "resources", "labels", "object_store_memory", "_system_config",
                   "_enable_object_reconstruction", "_node_name")
_CONNECT_TIMEOUT_S = 2.0
# Non-secret settings the workers need, whichever node they run on (never HF_TOKEN: see the module docstring).
FORWARDED_ENV = ("HF_ENDPOINT", "HF_HUB_DISABLE_XET", "HF_HUB_DISABLE_TELEMETRY", "HF_HUB_ETAG_TIMEOUT",
                 "HF_HUB_DOWNLOAD_TIMEOUT", "HF_HUB_OFFLINE", "WANDB_RUN_ID", "WANDB_RESUME", "TENSORBOARD_DIR",
                 "VERL_GRPO_HUB_CACHE")


@dataclass(frozen=True)
class RayPlan:
    """What :func:`configure_ray` decided.

    ``action`` is ``start`` or ``join``; ``address`` the cluster (shown to the user); ``init_address`` what
    ``ray.init(address=...)`` gets: ``local`` (start), the address, or ``auto``/``None`` where Ray's own lookup must
    run (it turns on token authentication only for clusters it finds itself, not for an explicit address).
    """

    action: str
    address: str
    reason: str
    dropped: tuple[str, ...] = ()
    init_address: str | None = "local"

    def line(self) -> str:
        """The one line a user reads in the launch log."""
        if self.action == "start":
            return f"ray: starting a local Ray cluster ({self.reason})"
        kept = f"; not passing {', '.join(self.dropped)} (the cluster's own resources count)" if self.dropped else ""
        return f"ray: joining the Ray cluster at {self.address} ({self.reason}){kept}"


def ray_pointer_file(environ: Mapping[str, str] | None = None, temp_dir: str | None = None) -> Path:
    """Where ``ray start`` records the cluster that a plain ``ray.init()`` joins (Ray's own lookup rules).

    Example:
        >>> str(ray_pointer_file({}))
        '/tmp/ray/ray_current_cluster'
    """
    env = os.environ if environ is None else environ
    if temp_dir is None:
        base = env.get("RAY_TMPDIR") or env.get("TMPDIR") or "/tmp"
        temp_dir = os.path.join(base, "ray")
    return Path(temp_dir) / "ray_current_cluster"


def refuses_connections(address: str) -> str | None:
    """Why ``host:port`` is provably not a running cluster (nothing listens there), or ``None`` if it may be.

    ``auto`` and ``ray://`` addresses are Ray's to resolve: never refused here.

    Example:
        >>> refuses_connections("no-port-here"), refuses_connections("auto")
        ('not a host:port address', None)
    """
    if address == "auto" or "://" in address:
        return None
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=_CONNECT_TIMEOUT_S):
            return None
    except ConnectionRefusedError:
        return "connection refused"
    except ValueError:
        return "not a host:port address"
    except socket.gaierror as e:
        return f"unknown host ({e.strerror})"
    except OSError:
        return None  # a timeout or an unreachable route proves nothing: let Ray try and report


def plan_ray_init(ray_init: Mapping[str, Any], *, environ: Mapping[str, str] | None = None) -> RayPlan:
    """Decide whether this launch starts a Ray cluster or joins one (pure apart from the pointer check).

    Args:
        ray_init: ``ray_kwargs.ray_init`` (plain mapping).
        environ: The environment (default ``os.environ``); ``RAY_ADDRESS`` selects a cluster to join.

    Returns:
        A :class:`RayPlan`; ``dropped`` lists the start-only keys that were set and must not reach ``ray.init``.
    """
    env = os.environ if environ is None else environ
    explicit = ray_init.get("address", None)
    set_start_keys = tuple(k for k in START_ONLY_KEYS if ray_init.get(k, None) not in (None, {}, []))
    if explicit is not None and str(explicit) == "local":
        return RayPlan("start", "local", "ray_kwargs.ray_init.address=local")
    if explicit:
        return RayPlan("join", str(explicit), "ray_kwargs.ray_init.address", set_start_keys, str(explicit))
    if env.get("RAY_ADDRESS"):
        return RayPlan("join", str(env["RAY_ADDRESS"]), "RAY_ADDRESS", set_start_keys, None)
    pointer = ray_pointer_file(env, ray_init.get("_temp_dir", None))
    try:
        recorded = pointer.read_text().strip()
    except OSError:
        recorded = ""
    if not recorded:
        return RayPlan("start", "local", "no cluster to join: RAY_ADDRESS unset, no `ray start` on this node")
    dead = refuses_connections(recorded)
    if dead:
        return RayPlan("start", "local", f"ignoring the stale {pointer}: no Ray cluster at {recorded}, {dead}")
    return RayPlan("join", recorded, f"`ray start` on this node, recorded in {pointer}", set_start_keys, "auto")


def forwarded_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The :data:`FORWARDED_ENV` variables that are set, for the job's runtime environment.

    Example:
        >>> forwarded_env({"HF_ENDPOINT": "http://hub:8080", "HF_TOKEN": "hf_x", "PATH": "/bin"})
        {'HF_ENDPOINT': 'http://hub:8080'}
    """
    env = os.environ if environ is None else environ
    return {k: str(env[k]) for k in FORWARDED_ENV if env.get(k)}


def check_join_target(cfg: Any) -> RayPlan:
    """Raise :class:`~training.errors.ConfigError` when the run would join a cluster where nothing listens.

    ``ray.init`` waits minutes on such an address before failing; this answers in seconds, before anything starts.
    Only a plain ``host:port`` is probed (``auto`` and ``ray://`` addresses are Ray's to resolve), and only a refused
    connection counts: a timeout proves nothing (a firewall, a slow network).

    Example:
        >>> check_join_target({"ray_kwargs": {"ray_init": {"address": "local"}}}).action
        'start'
    """
    from omegaconf import OmegaConf

    from training.errors import ConfigError

    ray_init = (cfg.get("ray_kwargs", None) or {}).get("ray_init", None) or {}
    if OmegaConf.is_config(ray_init):
        ray_init = OmegaConf.to_container(ray_init, resolve=True)
    plan = plan_ray_init(ray_init)
    # a pointer from `ray start` was probed by plan_ray_init already (a dead one means: start a local cluster)
    if plan.reason not in ("RAY_ADDRESS", "ray_kwargs.ray_init.address"):
        return plan
    dead = refuses_connections(plan.address)
    if dead:
        raise ConfigError(f"{plan.reason}={plan.address}: no Ray cluster there ({dead}). Start one on that node "
                          f"(`ray start --head --port=PORT`), point {plan.reason} at a running cluster, or unset it to "
                          "start a local cluster")
    return plan


def configure_ray(cfg: Any) -> RayPlan:
    """Set ``ray_kwargs.ray_init`` in place so veRL's ``ray.init`` starts or joins as planned; print the plan.

    Call right before ``run_ppo`` (veRL calls ``ray.init`` with this block when Ray is not up yet).

    Args:
        cfg: The run config (``ray_kwargs.ray_init`` created if missing).

    Returns:
        The :class:`RayPlan` that was applied.
    """
    from omegaconf import OmegaConf, open_dict

    with open_dict(cfg):
        if cfg.get("ray_kwargs", None) is None:
            cfg.ray_kwargs = {}
        if cfg.ray_kwargs.get("ray_init", None) is None:
            cfg.ray_kwargs.ray_init = {}
        ray_init = cfg.ray_kwargs.ray_init
        plan = plan_ray_init(OmegaConf.to_container(ray_init, resolve=True))
        # `local` makes Ray start a cluster even where RAY_ADDRESS or a (stale) pointer file exists.
        ray_init.address = plan.init_address
        for key in plan.dropped:
            ray_init[key] = None
        settings = forwarded_env()
        if settings:  # merged by veRL over its own runtime env defaults; the config's own env_vars win
            if ray_init.get("runtime_env", None) is None:
                ray_init.runtime_env = {}
            own = ray_init.runtime_env.get("env_vars", None) or {}
            ray_init.runtime_env.env_vars = {**settings, **OmegaConf.to_container(OmegaConf.create(own))}
    print(plan.line(), flush=True)
    return plan
