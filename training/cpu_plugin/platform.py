"""A ``cpu`` platform for veRL 0.9.1: FSDP2 on gloo, Ray's logical ``GPU`` resource as the worker slot.

veRL routes every device call through ``verl.plugin.platform.get_platform()``. It ships ``nvidia``, ``huawei``
and ``amd`` platforms and, with no accelerator, falls back to ``nvidia`` (device ``cuda``, backend ``nccl``),
which fails on the first CUDA call. This module registers a fourth platform, ``cpu``, that is chosen **only
when the run asks for it** with ``VERL_PLATFORM=cpu`` (veRL reads that variable before probing anything; the
CPU configs set it in ``ray_kwargs.ray_init.runtime_env.env_vars``, which veRL forwards to every Ray worker,
and ``train_grpo.py`` puts it into the driver's environment, see :mod:`training.platform_request`). It never
wins by elimination: its probe answers "not available", so a CPU-only head node driving GPU workers, a GPU
container without ``nvidia-smi`` or a GPU-less actor of a GPU run keeps plain veRL's choice (``nvidia``).
Probing instantiates every registered platform; the constructor therefore changes nothing unless ``cpu`` was
requested.

Choices, each fixing a measured failure:

- backend plain ``gloo``: veRL builds ``cpu:gloo,{device}:{backend}``; ``cpu:gloo`` twice is rejected.
- Ray resource ``GPU``: veRL's placement groups ask for the platform's resource per worker; Ray is started
  with ``num_gpus`` logical GPUs, so the same scheduling code places one FSDP rank per slot.
- the device module is :class:`CPUDeviceModule`, ``torch.cpu`` plus the CUDA-style calls veRL makes
  (memory statistics, ``mem_get_info``, ``empty_cache``, rng state) as cheap CPU equivalents.
- ``current_device()`` returns ``"cpu"``: veRL passes it to ``tensor.to(...)``; an ``int`` would mean ``cuda:N``.
- on activation (:func:`activate_cpu_runtime`, only in processes that requested this platform):
  ``VERL_ENGINE_DEVICE=cuda`` (veRL registers its device-agnostic FSDP engine for ``cuda``/``npu`` only);
  FSDP2's CPU offload policy without pinned memory (pinning needs an accelerator); and veRL's process-group
  init defaulting to plain ``gloo`` (its ``cpu:gloo,cpu:gloo`` default names ``cpu`` twice). The last two
  rebind one veRL name each at runtime; veRL's files are not edited.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import sys
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import psutil
import torch
from verl.plugin.platform import PlatformBase, PlatformRegistry

logger = logging.getLogger(__name__)

PLATFORM_NAME = "cpu"
PLATFORM_ENV = "VERL_PLATFORM"  # veRL's own override, read by verl.plugin.platform before any probe


def cpu_platform_requested() -> bool:
    """Whether this process asked for the ``cpu`` platform (``VERL_PLATFORM=cpu``, case and spaces ignored).

    Example:
        >>> import os; os.environ["VERL_PLATFORM"] = " CPU "; cpu_platform_requested()
        True
        >>> del os.environ["VERL_PLATFORM"]; cpu_platform_requested()
        False
    """
    return os.environ.get(PLATFORM_ENV, "").strip().lower() == PLATFORM_NAME


class CPUDeviceModule(ModuleType):
    """``torch.cpu`` with the ``torch.cuda``-style functions veRL calls on its device module.

    veRL calls e.g. ``get_torch_device().memory_reserved()`` or ``.mem_get_info()`` for logging and memory
    management. On CPU these have no allocator to query: memory statistics report 0 (no device memory is
    in use), ``mem_get_info`` reports host memory from psutil, cache and IPC calls do nothing, and rng state
    is torch's CPU generator. Anything else falls through to ``torch.cpu``.
    """

    def __init__(self) -> None:
        super().__init__("verl_grpo_hub_cpu_device")

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cpu, name)

    @staticmethod
    def is_available() -> bool:
        return True

    @staticmethod
    def current_device() -> str:
        return "cpu"

    @staticmethod
    def device_count() -> int:
        return 1

    @staticmethod
    def set_device(device: Any) -> None:
        return None

    @staticmethod
    def get_device_name(device: Any = None) -> str:
        return "cpu"

    @staticmethod
    def synchronize(device: Any = None) -> None:
        return None

    @staticmethod
    def empty_cache() -> None:
        return None

    @staticmethod
    def ipc_collect() -> None:
        return None

    @staticmethod
    def set_per_process_memory_fraction(fraction: float, device: Any = None) -> None:
        return None

    @staticmethod
    def memory_allocated(device: Any = None) -> int:
        return 0

    @staticmethod
    def memory_reserved(device: Any = None) -> int:
        return 0

    @staticmethod
    def max_memory_allocated(device: Any = None) -> int:
        return 0

    @staticmethod
    def max_memory_reserved(device: Any = None) -> int:
        return 0

    @staticmethod
    def reset_peak_memory_stats(device: Any = None) -> None:
        return None

    @staticmethod
    def memory_stats(device: Any = None) -> dict[str, int]:
        return {}

    @staticmethod
    def mem_get_info(device: Any = None) -> tuple[int, int]:
        vm = psutil.virtual_memory()
        return vm.available, vm.total

    @staticmethod
    def manual_seed(seed: int) -> None:
        torch.manual_seed(seed)

    @staticmethod
    def manual_seed_all(seed: int) -> None:
        torch.manual_seed(seed)

    @staticmethod
    def get_rng_state(device: Any = None) -> torch.Tensor:
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state: torch.Tensor, device: Any = None) -> None:
        torch.set_rng_state(state)


_DEVICE_MODULE = CPUDeviceModule()


def _make_unpinned_offload_policy(base: type) -> type:
    """Subclass FSDP2's ``CPUOffloadPolicy`` so that ``pin_memory`` is always False.

    veRL's FSDP engine builds the reference model with ``CPUOffloadPolicy(pin_memory=True)`` (hard-coded);
    pinning host memory needs an accelerator and raises "Cannot access accelerator device when none is
    available". A subclass keeps ``isinstance`` checks in veRL and torch working.
    """

    @dataclass
    class UnpinnedCPUOffloadPolicy(base):  # type: ignore[misc, valid-type]
        def __post_init__(self) -> None:
            self.pin_memory = False

    return UnpinnedCPUOffloadPolicy


def _make_gloo_process_group_init(original: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap ``verl.utils.distributed.initialize_global_process_group_ray`` to default to plain ``gloo``.

    veRL's default backend string is ``cpu:gloo,{device}:{backend}``; with device ``cpu`` that names ``cpu``
    twice, which ``torch.distributed`` rejects ("Duplicate device type cpu"). An explicit backend (veRL's
    checkpoint engine passes ``cpu:gloo``) is kept.
    """

    @functools.wraps(original)
    def initialize_global_process_group_ray(timeout_second: int | None = None, backend: str | None = None) -> Any:
        return original(timeout_second=timeout_second, backend=backend or "gloo")

    initialize_global_process_group_ray.__verl_grpo_hub_cpu__ = True  # type: ignore[attr-defined]
    return initialize_global_process_group_ray


def _rebind(source_module: str, name: str, make: Callable[[Any], Any], is_patched: Callable[[Any], bool]) -> None:
    """Replace ``source_module.name`` and every already-imported ``verl.*`` copy of it (``from x import name``).

    Modules imported later bind the replacement, since they import it from ``source_module``.
    """
    module = importlib.import_module(source_module)
    original = getattr(module, name)
    if is_patched(original):
        return
    replacement = make(original)
    for mod_name, mod in list(sys.modules.items()):
        if (mod_name == "verl" or mod_name.startswith("verl.")) and getattr(mod, name, None) is original:
            setattr(mod, name, replacement)


def activate_cpu_runtime() -> None:
    """Apply the process-wide settings veRL needs to run its FSDP engine on CPU (idempotent).

    Called when the ``cpu`` platform is instantiated, i.e. only in processes where veRL chose it.

    Raises:
        ImportError, AttributeError: if veRL's names moved (a veRL upgrade; ``tests/test_cpu_plugin.py`` pins them).
    """
    # veRL's EngineRegistry keys the FSDP engine by device ("cuda"/"npu"); the engine itself is device-agnostic.
    os.environ.setdefault("VERL_ENGINE_DEVICE", "cuda")
    _rebind(
        "verl.utils.fsdp_utils",
        "CPUOffloadPolicy",
        _make_unpinned_offload_policy,
        lambda obj: obj.__name__ == "UnpinnedCPUOffloadPolicy",
    )
    _rebind(
        "verl.utils.distributed",
        "initialize_global_process_group_ray",
        _make_gloo_process_group_init,
        lambda obj: getattr(obj, "__verl_grpo_hub_cpu__", False),
    )


@PlatformRegistry.register(platform=PLATFORM_NAME)
class PlatformCPU(PlatformBase):
    """veRL platform for machines without an accelerator: torch CPU tensors, gloo collectives."""

    def __init__(self) -> None:
        super().__init__()
        # veRL's auto-detection instantiates every registered platform to probe it, also on GPU machines: only a
        # process that asked for `cpu` may have veRL's functions rebound.
        if cpu_platform_requested():
            activate_cpu_runtime()

    # -- device -----------------------------------------------------------------------------------------------
    @property
    def device_name(self) -> str:
        return "cpu"

    @property
    def vendor_name(self) -> str:
        return "cpu"

    @property
    def device_module(self) -> ModuleType:
        return _DEVICE_MODULE

    def is_available(self) -> bool:
        return True

    def is_platform_available(self, use_smi_check: bool = False) -> bool:
        # veRL probes this only when VERL_PLATFORM is unset, i.e. when nobody asked for `cpu`. Answering True here
        # would make `cpu` win by elimination wherever no GPU answers the probe: a CPU-only head node driving GPU
        # workers, a GPU container without nvidia-smi, every GPU-less actor of a GPU run. Plain veRL's fallback
        # (`nvidia`) is right for all of those.
        return cpu_platform_requested()

    def current_device(self) -> str:  # type: ignore[override]
        return "cpu"

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index: int) -> None:
        return None

    def synchronize(self, device_index: int | None = None) -> None:
        return None

    # -- rng / memory -------------------------------------------------------------------------------------------
    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        return None

    def empty_cache(self) -> None:
        return None

    def get_device_capability(self, device_index: int = 0) -> tuple[int | None, int | None]:
        return None, None

    # -- distributed / Ray ------------------------------------------------------------------------------------
    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        # Ray assigns logical GPU ids through this variable; nothing on CPU reads it as a real device.
        return "CUDA_VISIBLE_DEVICES"

    def ray_resource_name(self) -> str:
        return "GPU"

    def ray_resource_options(self, num_gpus: float) -> dict[str, Any]:
        return {"num_gpus": num_gpus}

    def ray_noset_envvars(self) -> list[str]:
        return ["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"]

    def is_ipc_supported(self) -> bool:
        return False

    # -- profiling / runtime ------------------------------------------------------------------------------------
    @contextmanager
    def nvtx_range(self, msg: str):
        yield

    def profiler_start(self) -> None:
        return None

    def profiler_stop(self) -> None:
        return None

    def cudart(self) -> Any:
        return None
