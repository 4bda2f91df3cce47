"""train_grpo.py checks the config before Ray starts, and the curriculum is wired into the trainer."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parents[1]


BAD_CONFIGS = [
    ("+reasoning_gym.datasets.no_such_task.weight=1", "no_such_task"),
    ("reasoning_gym.datasets.chain_sum.weight=0", "weight"),
    ("actor_rollout_ref.model.path=/nonexistent/model/dir", "/nonexistent/model/dir"),
    (
        "reward.custom_reward_function.reward_kwargs.secondary_rewards=[{name: no_such_reward, scaling_factor: 1}]",
        "no_such_reward",
    ),
    # nothing listens on port 1: ray.init would retry for minutes; the check refuses it at once
    ("+ray_kwargs.ray_init.address=127.0.0.1:1", "ray_kwargs.ray_init.address=127.0.0.1:1: no Ray cluster there"),
]


@pytest.fixture(scope="module")
def bad_config_runs(tmp_path_factory) -> dict[str, tuple[int, str, str, float]]:
    """Every bad config launched at once (each is a real `train_grpo.py` process); override -> (rc, out, err, s)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": ""}
    procs = {}
    for i, (override, _) in enumerate(BAD_CONFIGS):
        tmp = tmp_path_factory.mktemp(f"bad{i}")
        cmd = [sys.executable, str(REPO / "train_grpo.py"), f"hydra.run.dir={tmp}", override]
        procs[override] = (subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                            text=True), time.monotonic())
    results = {}
    for override, (proc, start) in procs.items():
        out, err = proc.communicate(timeout=180)
        results[override] = (proc.returncode, out, err, time.monotonic() - start)
    return results


@pytest.mark.slow  # shares one module fixture: four train_grpo.py subprocesses (~35 s)
@pytest.mark.parametrize("override, message", BAD_CONFIGS)
def test_bad_config_fails_with_a_clear_message_before_ray_starts(bad_config_runs, override, message):
    returncode, stdout, stderr, elapsed = bad_config_runs[override]
    log = stdout + stderr
    assert returncode == 2, log[-3000:]
    assert "config error:" in stderr and message in stderr
    assert "ray init" not in log and "Started a local Ray instance" not in log
    assert "Traceback" not in log
    assert elapsed < 90, elapsed  # no Ray, no model, no veRL workers: seconds (four processes share the cores)


def test_forced_success_streak_raises_the_level_and_later_prompts_come_from_it(tiny_model_dir):
    """The trainer's hook (what `_compute_advantage` calls each step) moves the train dataset's level."""
    from transformers import AutoTokenizer

    from training.data import ReasoningGymDataset
    from training.trainer import ReasoningGymTrainer, prepare_config

    with initialize_config_dir(config_dir=str(REPO / "training" / "configs"), version_base=None):
        cfg = compose(
            config_name="cpu_demo",
            overrides=[
                "curriculum.enabled=true",
                "curriculum.last_k=8",
                "+curriculum.curricula.chain_sum.attribute_levels.num_terms=0",
                f"actor_rollout_ref.model.path={tiny_model_dir}",
            ],
        )
    prepare_config(cfg)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    trainer = ReasoningGymTrainer.__new__(ReasoningGymTrainer)  # no Ray: only the curriculum wiring
    trainer.config = cfg
    trainer.train_dataset = ReasoningGymDataset("reasoning_gym://train", tokenizer, cfg.data)
    trainer._init_curriculum()

    def terms(n=40):
        return {trainer.train_dataset[i]["extra_info"]["entry"]["metadata"]["num_terms"] for i in range(n)}

    assert terms() == {2}
    metrics: dict = {}
    assert trainer.update_curriculum([1.0] * 4, ["chain_sum"] * 4, global_step=1, metrics=metrics) == []
    changes = trainer.update_curriculum([1.0] * 4, ["chain_sum"] * 4, global_step=2, metrics=metrics)
    assert [(c.dataset, c.old_level, c.new_level) for c in changes] == [("chain_sum", 0, 1)]
    assert metrics["curriculum/chain_sum/level"] == 1.0
    assert 3 in terms()  # later prompts come from the new level


def test_prepare_config_moves_the_hub_token_out_of_the_config(monkeypatch, tiny_model_dir):
    from training.trainer import prepare_config

    monkeypatch.delenv("HF_TOKEN", raising=False)
    with initialize_config_dir(config_dir=str(REPO / "training" / "configs"), version_base=None):
        cfg = compose(
            config_name="cpu_demo",
            overrides=["hf_upload.token=hf_secret123", f"actor_rollout_ref.model.path={tiny_model_dir}"],
        )
    prepare_config(cfg)
    assert cfg.hf_upload.token is None
    assert os.environ["HF_TOKEN"] == "hf_secret123"
    assert "hf_secret123" not in str(cfg)
