"""Every shipped config composes on veRL's ppo_trainer with Hydra (no Ray) and has the keys the trainer reads."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from training.config_checks import check_run_config
from training.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "training" / "configs"
SHIPPED = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if not p.name.startswith("_"))
GPU_CONFIGS = [n for n in SHIPPED if n != "cpu_demo"]
QWEN_CONFIGS = [n for n in GPU_CONFIGS if n != "gpu_smoke"]  # gpu_smoke: the tiny model (tests/test_gpu_configs.py)

HF_UPLOAD_DISABLED = {
    "enabled": False,
    "repo_id": None,
    "organization": None,
    "private": True,
    "optimizer_save_mode": None,
    "strategy": "end",
    "weights_format": "bin",
    "dtype": "auto",
    "endpoint": None,
    "token": None,
    "fail_on_error": False,
    "max_shard_size": "5GB",
    "namespace": None,
    "resume": "auto",
    "request_timeout": 120,
    "max_attempts": 4,
    "final_wait_timeout": 10800,
    "lora": "adapter",
    "base_model": None,
}


def compose_config(name, overrides=()):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose(config_name=name, overrides=list(overrides))


def test_the_expected_configs_ship():
    assert set(SHIPPED) >= {
        "cpu_demo",
        "algorithmic_qwen_3b",
        "arithmetic_qwen_3b",
        "algebra_qwen_3b",
        "games_qwen_3b",
        "logic_qwen_3b",
        "knights_knaves_curriculum",
        "hf_upload_example",
        "gpu_smoke",
    }


@pytest.mark.parametrize("name", SHIPPED)
def test_config_composes_and_has_the_keys_the_trainer_reads(name):
    cfg = compose_config(name)
    check_run_config(cfg)  # the same checks train_grpo.py runs before Ray
    assert cfg.trainer.use_v1 is True
    assert cfg.trainer.v1.trainer_mode == "rg_sync"
    assert cfg.actor_rollout_ref.actor.strategy == "fsdp2"
    assert cfg.actor_rollout_ref.ref.strategy == "fsdp2"
    assert cfg.algorithm.adv_estimator == "grpo"
    assert cfg.data.custom_cls.path == "pkg://training.data"
    assert cfg.data.custom_cls.name == "ReasoningGymDataset"
    assert (cfg.data.train_files, cfg.data.val_files) == ("reasoning_gym://train", "reasoning_gym://val")
    assert cfg.data.dataloader_num_workers == 0
    assert cfg.reward.custom_reward_function.path == "pkg://training.rewards"
    assert cfg.reward.custom_reward_function.name == "compute_score"
    assert len(cfg.reasoning_gym.datasets) > 0
    assert cfg.trainer.save_freq > 0  # veRL then also saves at the last step: the uploader needs a checkpoint
    assert cfg.trainer.checkpoint_callback_class is None  # left free for the upload hook
    assert set(cfg.hf_upload) == set(HF_UPLOAD_DISABLED)
    assert {"enabled", "schedule", "last_k", "success_threshold", "failure_threshold", "curricula"} <= set(
        cfg.curriculum
    )
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


@pytest.mark.parametrize("name", [n for n in SHIPPED if n != "hf_upload_example"])
def test_hf_upload_block_is_carried_disabled(name):
    assert OmegaConf.to_container(compose_config(name).hf_upload) == HF_UPLOAD_DISABLED


@pytest.mark.parametrize("name", SHIPPED)
def test_hf_upload_enabled_is_a_plain_override(name):
    cfg = compose_config(name, ["hf_upload.enabled=true", "hf_upload.repo_id=me/model"])
    assert cfg.hf_upload.enabled is True and cfg.hf_upload.repo_id == "me/model"


def test_cpu_demo_is_the_cpu_setup():
    cfg = compose_config("cpu_demo")
    assert cfg.actor_rollout_ref.model.path == "tiny://qwen2-warm"
    assert cfg.actor_rollout_ref.rollout.name == "hf"
    assert cfg.trainer.n_gpus_per_node == 2 and cfg.trainer.nnodes == 1
    assert cfg.ray_kwargs.ray_init.num_gpus == 2  # logical GPUs: one slot per FSDP rank
    assert cfg.transfer_queue.backend.SimpleStorage.num_data_storage_units == 1
    assert cfg.actor_rollout_ref.model.override_config.attn_implementation == "sdpa"
    assert cfg.actor_rollout_ref.actor.use_torch_compile is False
    assert cfg.trainer.logger == ["file"]  # metrics.jsonl + one progress line per step, not veRL's console dump
    assert cfg.trainer.val_before_train is True and cfg.trainer.test_freq > 0
    assert str(cfg.trainer.default_local_dir).startswith("outputs/")


@pytest.mark.parametrize("name", QWEN_CONFIGS)
def test_gpu_configs_use_vllm_and_qwen(name):
    cfg = compose_config(name)
    assert cfg.actor_rollout_ref.rollout.name == "vllm"
    assert cfg.actor_rollout_ref.model.path == "Qwen/Qwen2.5-3B-Instruct"
    assert "ray_kwargs" not in cfg or cfg.ray_kwargs.ray_init.get("num_gpus") is None  # real GPUs: Ray counts them


def test_knights_knaves_curriculum_is_enabled_on_its_dataset():
    cfg = compose_config("knights_knaves_curriculum")
    assert cfg.curriculum.enabled is True
    assert set(cfg.curriculum.curricula) == {"knights_knaves"} == set(cfg.reasoning_gym.datasets)


def _yaml_files():
    return {p.name: OmegaConf.load(p) for p in sorted(CONFIG_DIR.glob("*.yaml"))}


def test_no_config_file_repeats_another_files_block():
    files = _yaml_files()
    names = sorted(files)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            shared = set(files[a]) & set(files[b]) - {"hydra", "defaults"}
            same = [k for k in shared if files[a][k] == files[b][k]]
            assert not same, f"{a} and {b} both hold the same {same} block"


def test_shipped_configs_hold_only_deltas_of_the_typed_sections():
    from training.config_schema import section_defaults

    for name, cfg in _yaml_files().items():
        assert "callbacks" not in cfg.get("hydra", {}), f"{name}: the entry point registers the callback"
        for section in ("curriculum", "hf_upload"):
            defaults = section_defaults(section)
            for key, value in (cfg.get(section) or {}).items():
                assert value != defaults.get(key, object()), f"{name}: {section}.{key} repeats its default"


@pytest.mark.parametrize("override, key", [
    ("hf_upload.privat=true", "privat"),
    ("hf_upload.enabled=maybe", "hf_upload.enabled"),
    ("curriculum.last_k=many", "curriculum.last_k"),
    ("reasoning_gym.datasets.chain_sum.wieght=1", "wieght"),
])
def test_unknown_keys_and_wrong_types_are_refused_by_hydra_naming_the_key(override, key):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as info:
        compose_config("cpu_demo", [override])
    assert key in f"{info.value} {info.value.__cause__}"


def test_a_dataset_is_added_to_the_mix_on_the_command_line():
    cfg = compose_config("cpu_demo", ["+reasoning_gym.datasets.leg_counting.weight=2"])
    assert cfg.reasoning_gym.datasets.leg_counting.weight == 2
    check_run_config(cfg)  # a real reasoning-gym dataset: accepted by the pre-Ray checks too
    with pytest.raises(ConfigError, match="wieght"):  # a typo in an added entry is still named
        check_run_config(compose_config("cpu_demo", ["+reasoning_gym.datasets.chain_sum.wieght=1"]))


def test_bootstrap_from_is_added_on_the_command_line():
    cfg = compose_config("cpu_demo", ["+hf_upload.bootstrap_from=/models/base"])
    assert cfg.hf_upload.bootstrap_from == "/models/base"


def test_a_users_own_config_gets_the_typed_sections_and_the_redaction_callback(tmp_path):
    from training.config_schema import apply_schema
    from training.errors import ConfigError
    from training.hydra_token import CALLBACK_OVERRIDE

    (tmp_path / "mine.yaml").write_text("reasoning_gym:\n  datasets: {chain_sum: {weight: 1}}\nhf_upload:\n"
                                        "  enabled: true\n")
    with initialize_config_dir(config_dir=str(tmp_path), version_base=None):
        cfg = compose(config_name="mine", overrides=[CALLBACK_OVERRIDE], return_hydra_config=True)
    assert cfg.hydra.callbacks.redact_hub_token._target_ == "training.hydra_token.RedactHubToken"
    apply_schema(cfg)
    assert cfg.hf_upload.enabled is True and cfg.hf_upload.private is True and cfg.curriculum.last_k == 20
    cfg.hf_upload = {"enabled": True, "privat": True}  # untyped again, as a user's config would hold it
    with pytest.raises(ConfigError, match=r"hf_upload.privat is not a known key; valid keys: base_model, bootstrap_from, dtype, enabled, "):
        apply_schema(cfg)
# LoRA variants: config groups composed onto a shipped config (`+lora=cpu`, `+lora=gpu`), checked like the others and
# by veRL's own validation (what train_grpo.py runs before Ray).
LORA_VARIANTS = [("cpu_demo", "cpu", 8, 16), ("algorithmic_qwen_3b", "gpu", 32, 64)]


@pytest.mark.parametrize("name, group, rank, alpha", LORA_VARIANTS)
def test_lora_variant_composes_and_passes_verls_validation(name, group, rank, alpha):
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    cfg = compose_config(name, [f"+lora={group}"])
    check_run_config(cfg)
    model = cfg.actor_rollout_ref.model
    assert (model.lora_rank, model.lora_alpha, model.target_modules) == (rank, alpha, "all-linear")
    assert model.lora.merge is True  # the rollout (hf or vLLM) receives merged weights, not adapters
    assert cfg.hf_upload.lora == "adapter"
    validate_config(config=cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))
    OmegaConf.to_container(cfg, resolve=True)


def test_cpu_lora_variant_keeps_the_cpu_setup_and_its_own_checkpoint_dir():
    cfg = compose_config("cpu_demo", ["+lora=cpu"])
    assert cfg.actor_rollout_ref.rollout.name == "hf" and cfg.trainer.n_gpus_per_node == 2
    assert str(cfg.trainer.default_local_dir) == "outputs/cpu_demo_lora/checkpoints"


@pytest.mark.parametrize("name", SHIPPED)
def test_verls_config_folder_by_file_path_composes_the_same_config(name):
    """train_grpo.py swaps the configs' `pkg://verl.trainer.config` for that folder's file path (no veRL import):
    the composed config must be the one the `pkg://` path gives, key for key."""
    from training.verl_config_path import verl_config_dir, with_verl_config_searchpath

    override = with_verl_config_searchpath(["train_grpo.py", "--config-name", name], CONFIG_DIR, "cpu_demo")[-1]
    assert override == f"hydra.searchpath=[file://{verl_config_dir()}]"
    by_file = OmegaConf.to_container(compose_config(name, [override]))
    by_package = OmegaConf.to_container(compose_config(name))
    assert by_file == by_package


def test_other_search_path_entries_are_kept_and_explicit_settings_left_alone(tmp_path):
    from training.verl_config_path import verl_config_dir, with_verl_config_searchpath

    (tmp_path / "mine.yaml").write_text("hydra:\n  searchpath: [file:///my/configs, pkg://verl.trainer.config]\n")
    (tmp_path / "plain.yaml").write_text("hydra:\n  searchpath: [file:///my/configs]\n")
    assert with_verl_config_searchpath(["t.py", "-cn", "mine"], tmp_path, "plain")[-1] == \
        f"hydra.searchpath=[file:///my/configs,file://{verl_config_dir()}]"
    for argv in (["t.py"], ["t.py", "--config-name=nope"], ["t.py", "-cn", "mine", "hydra.searchpath=[pkg://x]"],
                 ["t.py", "-cn", "mine", "--config-dir", "/c"], ["t.py", "-cn", "mine", "-cp", "/c"]):
        assert with_verl_config_searchpath(argv, tmp_path, "plain") == argv
