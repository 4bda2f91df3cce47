"""Every shipped GPU config passes veRL's own config validation, and `gpu_smoke` is the 2-minute GPU check it claims
to be. No GPU here: composition and validation only (what `train_grpo.py` does before Ray starts)."""

import pytest
from omegaconf import OmegaConf

from tests.test_configs import GPU_CONFIGS, compose_config
from training.platform_request import requested_platform


@pytest.mark.parametrize("name", GPU_CONFIGS)
def test_gpu_config_passes_verls_validation_and_never_asks_for_the_cpu_platform(name, monkeypatch, tmp_path):
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    from training.trainer import prepare_config

    monkeypatch.setenv("VERL_GRPO_HUB_CACHE", str(tmp_path))  # gpu_smoke's tiny model is built here
    cfg = prepare_config(compose_config(name))
    validate_config(config=cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))
    assert requested_platform(cfg) is None  # veRL's own detection picks the GPU platform
    assert cfg.trainer.device == "cuda"
    assert cfg.actor_rollout_ref.rollout.name == "vllm"


def test_gpu_smoke_is_tiny_one_gpu_vllm_two_steps_no_upload():
    cfg = compose_config("gpu_smoke")
    assert cfg.actor_rollout_ref.model.path == "tiny://qwen2"  # built offline: nothing to download
    assert (cfg.trainer.nnodes, cfg.trainer.n_gpus_per_node) == (1, 1)
    assert cfg.actor_rollout_ref.rollout.tensor_model_parallel_size == 1
    assert cfg.actor_rollout_ref.rollout.name == "vllm" and cfg.actor_rollout_ref.rollout.mode == "async"
    assert cfg.trainer.total_training_steps == 2 and cfg.trainer.save_freq == 2
    assert cfg.hf_upload.enabled is False
    assert cfg.trainer.logger == ["console"] and cfg.trainer.val_before_train is False
    # prompts of the tiny tokenizer fit, and the rollout has room for prompt + response
    r = cfg.actor_rollout_ref.rollout
    assert r.max_model_len >= cfg.data.max_prompt_length + cfg.data.max_response_length
    OmegaConf.to_container(cfg, resolve=True)


def test_cpu_demo_with_the_vllm_override_asks_for_the_cpu_platform_and_passes_verls_validation(monkeypatch, tmp_path):
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    from training.trainer import prepare_config

    monkeypatch.setenv("VERL_GRPO_HUB_CACHE", str(tmp_path))
    # the random tiny model: the demo's warm one would be built here (~20 s) and this test is about the rollout keys
    cfg = prepare_config(compose_config("cpu_demo", ["+cpu_rollout=vllm", "actor_rollout_ref.model.path=tiny://qwen2"]))
    validate_config(config=cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))
    rollout = cfg.actor_rollout_ref.rollout
    assert rollout.name == "vllm" and rollout.mode == "async"
    assert requested_platform(cfg) == "cpu" and cfg.trainer.device == "cpu"
    assert (rollout.enable_sleep_mode, rollout.free_cache_engine, rollout.enforce_eager) == (False, False, True)
    assert rollout.dtype == "float32" == cfg.actor_rollout_ref.actor.fsdp_config.model_dtype.replace("fp", "float")
    assert rollout.max_model_len >= cfg.data.max_prompt_length + cfg.data.max_response_length
    assert cfg.trainer.n_gpus_per_node == 2  # 2 FSDP2 ranks, one vLLM server each
