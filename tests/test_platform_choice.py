"""veRL's `cpu` platform (the project's plugin) is chosen only when the run asks for it, never by elimination.

veRL's own detection (`_detect_platform_name`) runs against faked hardware: the CUDA probe's `nvidia-smi` lookup and
`torch.cuda.is_available()` are replaced, the NPU/ROCm probes answer as on this machine (no such hardware). The cases
run in fresh processes (one with the request at `import verl`, one without): the CPU platform's activation rebinds
veRL functions process-wide, and a test must be able to see that it did not happen.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from training.errors import ConfigError
from training.platform_request import PLATFORM_KEY, apply_platform_request, requested_platform

REPO = Path(__file__).resolve().parents[1]

# Runs in a child process: for each case, fakes the GPU probe and VERL_PLATFORM, asks veRL's detection which platform
# it picks; at the end reports whether the CPU platform's runtime fixes (veRL's process-group init rebound,
# VERL_ENGINE_DEVICE) were applied in this process.
_PROBE = r"""
import json, os, shutil, sys
import torch
cases = json.loads(sys.argv[1])
from verl.plugin.platform import platform_cuda
fake = {}
real_which, real_isfile = shutil.which, platform_cuda.os.path.isfile
platform_cuda.shutil.which = lambda cmd, *a, **k: ("/usr/bin/nvidia-smi" if fake["nvidia_smi"] else None) if cmd == "nvidia-smi" else real_which(cmd, *a, **k)
platform_cuda.os.path.isfile = lambda p: False if str(p).endswith("nvidia-smi") else real_isfile(p)
platform_cuda.PlatformCUDA.check_smi_command = lambda self, path: fake["nvidia_smi"]
torch.cuda.is_available = lambda: fake["cuda_available"]
import verl  # loads the project's plugin through the verl.plugins entry point
from verl.plugin.platform.platform_manager import _detect_platform_name
import verl.utils.distributed as d
names = []
for case in cases:
    fake.update(case["hardware"])
    if case["request"] is None:
        os.environ.pop("VERL_PLATFORM", None)
    else:
        os.environ["VERL_PLATFORM"] = case["request"]
    names.append(_detect_platform_name())
print(json.dumps({"names": names, "rebound": hasattr(d.initialize_global_process_group_ray, "__verl_grpo_hub_cpu__"),
                  "engine_device": os.environ.get("VERL_ENGINE_DEVICE")}))
"""

NO_GPU = {"nvidia_smi": False, "cuda_available": False}
GPU = {"nvidia_smi": True, "cuda_available": True}
# (case, hardware, VERL_PLATFORM, platform veRL must pick)
CASES = [
    # The task runner / driver of a GPU run on a CPU-only head node: no GPU, no nvidia-smi, no request.
    ("CPU head of a GPU cluster", NO_GPU, None, "nvidia"),
    ("GPU worker", GPU, None, "nvidia"),
    # A GPU container whose image lacks nvidia-smi, in a GPU-less actor (CUDA hidden from the process) ...
    ("GPU node without nvidia-smi, CPU-only actor", NO_GPU, None, "nvidia"),
    # ... and in a rank that sees its GPU.
    ("GPU node without nvidia-smi, GPU actor", {"nvidia_smi": False, "cuda_available": True}, None, "nvidia"),
    # A CPU-only machine whose run did not ask for the CPU platform: plain veRL's fallback, not ours.
    ("CPU-only machine without the request", NO_GPU, None, "nvidia"),
    ("CPU-only machine with the request", NO_GPU, "cpu", "cpu"),
    ("request, any spelling", NO_GPU, " CPU ", "cpu"),
    # An explicit VERL_PLATFORM is the user's word, as in plain veRL (e.g. a CPU debug run on a GPU box).
    ("GPU machine with the request", GPU, "cpu", "cpu"),
    ("CPU-only machine asking for nvidia", NO_GPU, "nvidia", "nvidia"),
]


def detect(cases: list[tuple], *, request_at_import: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("VERL_PLATFORM", "VERL_ENGINE_DEVICE")}
    env["PYTHONPATH"] = str(REPO)
    if request_at_import is not None:
        env["VERL_PLATFORM"] = request_at_import
    arg = json.dumps([{"hardware": hardware, "request": request} for _, hardware, request, _ in cases])
    out = subprocess.run([sys.executable, "-c", _PROBE, arg], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_cpu_is_chosen_only_on_request_never_by_elimination():
    got = detect(CASES, request_at_import=None)
    assert dict(zip([c[0] for c in CASES], got["names"], strict=True)) == {c[0]: c[3] for c in CASES}
    # veRL instantiated the cpu platform to probe it (five times): that must not have rebound veRL's functions.
    assert got["rebound"] is False and got["engine_device"] is None


def test_a_process_started_with_the_request_gets_the_cpu_platform_and_its_runtime_fixes():
    # What every Ray worker of a CPU run is: VERL_PLATFORM=cpu in its environment before `import verl`.
    got = detect([("CPU-only machine with the request", NO_GPU, "cpu", "cpu")], request_at_import="cpu")
    assert got == {"names": ["cpu"], "rebound": True, "engine_device": "cuda"}


def _cfg(device=None, platform=None):
    cfg: dict = {"trainer": {}}
    if device is not None:
        cfg["trainer"]["device"] = device
    if platform is not None:
        cfg["ray_kwargs"] = {"ray_init": {"runtime_env": {"env_vars": {"VERL_PLATFORM": platform}}}}
    return cfg


@pytest.mark.parametrize(
    "cfg, expected",
    [
        (_cfg("cpu", "cpu"), "cpu"),
        (_cfg(None, "CPU"), "cpu"),
        (_cfg("cuda"), None),
        (_cfg(), None),
        ({"ray_kwargs": {"ray_init": {"runtime_env": {"env_vars": {"VERL_PLATFORM": ""}}}}}, None),
        ({"ray_kwargs": {"ray_init": {"num_cpus": 8}}}, None),
    ],
)
def test_requested_platform_reads_the_ray_runtime_env(cfg, expected):
    assert requested_platform(cfg) == expected


def test_apply_sets_the_drivers_environment(monkeypatch):
    monkeypatch.delenv("VERL_PLATFORM", raising=False)
    assert apply_platform_request(_cfg("cuda")) is None
    assert "VERL_PLATFORM" not in os.environ
    assert apply_platform_request(_cfg("cpu", "cpu")) == "cpu"
    assert os.environ["VERL_PLATFORM"] == "cpu"


@pytest.mark.parametrize(
    "cfg, message",
    [
        (_cfg("cpu"), f"trainer.device=cpu but {PLATFORM_KEY}=None: veRL would not use the CPU platform; add "
                      f"`+{PLATFORM_KEY}=cpu` (the CPU configs declare it) or use a GPU config"),
        (_cfg("cuda", "cpu"), f"{PLATFORM_KEY}=cpu but trainer.device='cuda': set trainer.device=cpu, or drop the "
                              "request for a GPU run"),
    ],
)
def test_device_and_request_must_agree(cfg, message, monkeypatch):
    monkeypatch.delenv("VERL_PLATFORM", raising=False)
    with pytest.raises(ConfigError) as e:
        apply_platform_request(cfg)
    assert str(e.value) == message
    assert "VERL_PLATFORM" not in os.environ


def test_the_cpu_demo_request_reaches_every_ray_worker_through_verls_runtime_env(monkeypatch):
    # What run_ppo hands to ray.init (verl/trainer/main_ppo.py: its defaults merged with ray_kwargs.ray_init.runtime_env),
    # after train_grpo.py's configure_ray: the job-level env_vars every worker on every node starts with.
    import inspect

    from omegaconf import OmegaConf
    from verl.trainer.constants_ppo import get_ppo_ray_runtime_env
    from verl.trainer.main_ppo import run_ppo

    from tests.test_configs import compose_config
    from training.ray_cluster import configure_ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = compose_config("cpu_demo")
    configure_ray(cfg)
    source = inspect.getsource(run_ppo)
    assert "runtime_env = OmegaConf.merge(default_runtime_env, runtime_env_kwargs)" in source  # veRL's merge, pinned
    runtime_env = OmegaConf.merge(get_ppo_ray_runtime_env(cfg), cfg.ray_kwargs.ray_init.get("runtime_env", {}))
    assert OmegaConf.to_container(runtime_env)["env_vars"]["VERL_PLATFORM"] == "cpu"
    # and a GPU config carries no request
    gpu = compose_config("algorithmic_qwen_3b")
    configure_ray(gpu)
    gpu_env = OmegaConf.merge(get_ppo_ray_runtime_env(gpu), gpu.ray_kwargs.ray_init.get("runtime_env", {}) or {})
    assert "VERL_PLATFORM" not in OmegaConf.to_container(gpu_env).get("env_vars", {})
