"""GRPO on reasoning-gym tasks with veRL 0.9.1.

    python train_grpo.py                                        # CPU demo: tiny model, 2 FSDP2 ranks, HF rollouts
    python train_grpo.py trainer.total_training_steps=4         # any veRL or project key as an override
    python train_grpo.py --config-name algorithmic_qwen_3b      # a GPU config (vLLM rollouts)
    python train_grpo.py --config-name algorithmic_qwen_3b hf_upload.enabled=true hf_upload.repo_id=me/model

Order: compose the config (training/configs, on veRL's ppo_trainer) -> the platform it asks for (VERL_PLATFORM) ->
check it (before Ray starts, so a bad dataset/reward/model path fails in seconds) -> Hub preflight when
hf_upload.enabled (bad token/namespace/repo id fail in seconds) -> resolve tiny://qwen2 -> start or join Ray ->
veRL's run_ppo with our task runner.

Multi-node: `ray start --head` on one node, `ray start --address=HEAD:PORT` on the others (CPU nodes: add
`--num-gpus=N`, logical GPUs), then launch on the head as above: the launch joins the running cluster.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from training.config_checks import check_run_config
from training.config_schema import apply_schema
from training.errors import ConfigError
from training.hub_resume import ResumeError, resume_from_hub
from training.hub_upload import setup_hub_upload
from training.hydra_token import with_redaction_callback
from training.platform_request import apply_platform_request
from training.ray_cluster import check_join_target, configure_ray
from training.verl_config_path import CONFIG_DIR, with_verl_config_searchpath
from utils.checkpoint.errors import CheckpointError
from utils.hub.errors import HubUploadError

CONFIG_NAME = "cpu_demo"  # the default of `python train_grpo.py`


@hydra.main(config_path="training/configs", config_name=CONFIG_NAME, version_base=None)
def main(cfg: DictConfig) -> None:
    try:
        apply_schema(cfg)  # typed sections for a config that does not list grpo_sections (shipped ones do)
        # The CPU configs ask for veRL's `cpu` platform (VERL_PLATFORM in Ray's runtime env); the driver needs it in
        # its own environment before anything imports veRL (training/platform_request.py).
        apply_platform_request(cfg)
        check_run_config(cfg)
        check_join_target(cfg)  # a RAY_ADDRESS where nothing listens: seconds, not minutes of ray.init retries
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    try:
        # hf_upload.enabled: token, namespace write access and repo checked against the Hub before Ray starts, and
        # the upload callback wired in (training/hub_upload.py).
        setup_hub_upload(cfg)
    except HubUploadError as e:
        print(f"hf_upload error: {e}", file=sys.stderr)
        sys.exit(2)

    # veRL's trainer and Ray's cluster start only after the checks, so a bad config never pays for them. (Hydra read
    # veRL's ppo_trainer.yaml by file path, training/verl_config_path.py, so veRL is first imported here; the checks
    # need neither veRL nor Ray: tests/test_architecture.py runs them with both blocked.)
    from verl.trainer.main_ppo import run_ppo
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    from training.trainer import TaskRunnerLauncher, prepare_config

    prepare_config(cfg)
    validate_config(config=cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))
    # hf_upload.resume: bootstrap an empty Hub namespace, or pull + reshard its newest snapshot for this world size
    # into default_local_dir so veRL's own resume loads it (training/hub_resume.py). Still before Ray starts.
    try:
        resume_from_hub(cfg)
    except (ResumeError, HubUploadError, CheckpointError) as e:
        print(f"hf_upload.resume: {e}", file=sys.stderr)
        sys.exit(2)
    # Start a local Ray cluster, or join a running one (RAY_ADDRESS, ray_kwargs.ray_init.address, `ray start` on this
    # node) without the start-only keys the CPU configs carry; one line says which (training/ray_cluster.py).
    configure_ray(cfg)
    run_ppo(cfg, task_runner_class=TaskRunnerLauncher())


if __name__ == "__main__":
    sys.argv = with_redaction_callback(sys.argv)  # a Hub token never reaches .hydra/*.yaml, whatever the config
    # compose without importing veRL: config errors in seconds
    sys.argv = with_verl_config_searchpath(sys.argv, CONFIG_DIR, CONFIG_NAME)
    main()
