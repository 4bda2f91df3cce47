"""The CPU plugin: loaded through the `verl.plugins` entry point, and the veRL private names it relies on.

A veRL upgrade that moves or reshapes any of these names fails here, loudly, instead of deep inside a Ray worker.
"""

import inspect
import os
import subprocess
import sys
from importlib.metadata import entry_points, version

import pytest


def test_verl_is_the_pinned_version():
    assert version("verl") == "0.9.1"


def test_entry_point_is_registered_in_the_installed_metadata():
    eps = {ep.name: ep.value for ep in entry_points(group="verl.plugins")}
    assert eps.get("cpu") == "training.cpu_plugin", (
        "the verl.plugins entry point is missing: run `pip install -e . --no-deps` after pulling pyproject.toml"
    )


@pytest.mark.slow  # a fresh interpreter importing veRL (~11 s)
def test_a_fresh_process_gets_the_cpu_platform_and_hf_rollout_from_import_verl_alone():
    # What every Ray worker of a CPU run does: a bare `import verl` with VERL_PLATFORM=cpu (the CPU configs put it in
    # Ray's runtime env), nothing imported from training/ first.
    code = (
        "import verl\n"
        "from verl.plugin.platform import get_platform\n"
        "from verl.workers.rollout.base import get_rollout_class\n"
        "from verl.workers.rollout.replica import get_rollout_replica_class\n"
        "import verl.utils.distributed as d, verl.utils.fsdp_utils as f\n"
        "p = get_platform()\n"
        "print(type(p).__name__, p.device_name, p.communication_backend_name(), p.ray_resource_name())\n"
        "print(get_rollout_class('hf', 'async').__name__, get_rollout_replica_class('hf').__name__)\n"
        "print(f.CPUOffloadPolicy(pin_memory=True).pin_memory, d.initialize_global_process_group_ray.__wrapped__)\n"
    )
    env = {**os.environ, "VERL_PLATFORM": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "PlatformCPU cpu gloo GPU"
    assert lines[1] == "HFServerAdapter HFReplica"
    assert lines[2].startswith("False <function initialize_global_process_group_ray")


def test_device_module_shim_answers_the_cuda_style_calls_verl_makes():
    from training.cpu_plugin.platform import PlatformCPU

    dev = PlatformCPU().device_module
    assert dev.memory_allocated() == 0 and dev.max_memory_reserved() == 0
    free, total = dev.mem_get_info()
    assert 0 < free <= total
    dev.empty_cache(), dev.synchronize(), dev.set_device(0), dev.ipc_collect()
    state = dev.get_rng_state()
    dev.set_rng_state(state)
    assert dev.current_stream() is not None  # falls through to torch.cpu


def _params(fn):
    return list(inspect.signature(fn).parameters)


def test_pinned_verl_private_names():
    """Every veRL name the plugin and the trainer wiring touch, with the shape they rely on."""
    from verl.plugin.platform import PlatformBase, PlatformRegistry, get_platform
    from verl.plugin.platform.platform_manager import _detect_platform_name
    from verl.trainer.main_ppo import TaskRunnerV1, run_ppo
    from verl.trainer.ppo.checkpoint_callback import CheckpointCallback
    from verl.trainer.ppo.v1 import PPOTrainerSync, get_trainer_cls, register_trainer
    from verl.trainer.ppo.v1.trainer_base import PPOTrainer
    from verl.utils import distributed, fsdp_utils
    from verl.workers.engine.base import EngineRegistry
    from verl.workers.engine.fsdp import transformer_impl
    from verl.workers.rollout.base import _ROLLOUT_REGISTRY, BaseRollout, get_rollout_class
    from verl.workers.rollout.replica import RolloutMode, RolloutReplica, RolloutReplicaRegistry, TokenOutput

    # platform
    assert callable(PlatformRegistry.register) and callable(get_platform) and callable(_detect_platform_name)
    assert PlatformRegistry.registered_names()[:3] == ("nvidia", "huawei", "amd")  # probed before "cpu"
    # the request is read before any probe, so VERL_PLATFORM=cpu alone selects the cpu platform
    detect_src = inspect.getsource(_detect_platform_name)
    assert detect_src.index('os.environ.get("VERL_PLATFORM"') < detect_src.index("instance.is_platform_available(")
    abstract = set(PlatformBase.__abstractmethods__)
    from training.cpu_plugin.platform import PlatformCPU

    assert not (abstract - set(vars(PlatformCPU))), "PlatformBase grew abstract methods the cpu platform lacks"
    # runtime fixes: the names rebound on activation
    # (rebound only in a process that asked for the cpu platform: this test process did not)
    init_pg = distributed.initialize_global_process_group_ray
    assert _params(getattr(init_pg, "__wrapped__", init_pg)) == ["timeout_second", "backend"]
    assert "CPUOffloadPolicy(pin_memory=True)" in inspect.getsource(transformer_impl)
    assert "from verl.utils.fsdp_utils import" in inspect.getsource(transformer_impl)
    assert fsdp_utils.CPUOffloadPolicy.__mro__[1].__module__.startswith("torch.distributed")
    assert 'os.getenv("VERL_ENGINE_DEVICE")' in inspect.getsource(EngineRegistry.get_engine_cls)
    # rollout
    assert isinstance(_ROLLOUT_REGISTRY, dict) and ("vllm", "async") in _ROLLOUT_REGISTRY
    assert _params(get_rollout_class) == ["rollout_name", "mode"]
    assert _params(BaseRollout.__init__)[:4] == ["self", "config", "model_config", "device_mesh"]
    assert {"resume", "update_weights", "release"} <= BaseRollout.__abstractmethods__
    assert _params(RolloutReplicaRegistry.register) == ["name", "loader"]
    assert "launch_servers" in RolloutReplica.__abstractmethods__
    replica_init = inspect.getsource(RolloutReplica.__init__)
    for attr in ("servers", "workers", "rollout_mode", "world_size", "nnodes", "name_suffix", "_server_handle"):
        assert f"self.{attr}" in replica_init, attr
    assert RolloutMode.HYBRID.value == "hybrid"
    assert set(TokenOutput.model_fields) >= {"token_ids", "log_probs", "stop_reason", "extra_fields"}
    # trainer wiring
    assert TaskRunnerV1.__ray_actor_class__.run is not None
    assert _params(run_ppo) == ["config", "task_runner_class"]
    assert issubclass(PPOTrainerSync, PPOTrainer) and callable(register_trainer) and callable(get_trainer_cls)
    for name in ("_compute_advantage", "_save_checkpoint", "_load_checkpoint", "_init_dataloader"):
        assert hasattr(PPOTrainer, name), name
    assert _params(PPOTrainer._compute_advantage) == ["self", "batch", "metrics"]
    assert _params(CheckpointCallback.on_save)[:4] == ["self", "trainer", "global_step", "checkpoint_dir"]


def test_trainer_mode_rg_sync_is_registered():
    from verl.trainer.ppo.v1 import get_trainer_cls

    from training.trainer import ReasoningGymTrainer

    assert get_trainer_cls("rg_sync") is ReasoningGymTrainer


@pytest.mark.parametrize(
    "engine_kwargs, expected",
    [
        ({}, True),
        ({"hf": None}, True),
        ({"vllm": {}, "hf": {"sync_weights": False}}, False),
    ],
)
def test_hf_engine_options_sync_weights(engine_kwargs, expected):
    from training.cpu_plugin.hf_rollout import hf_engine_options

    assert hf_engine_options({"engine_kwargs": engine_kwargs})["sync_weights"] is expected
