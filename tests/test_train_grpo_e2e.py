"""End to end on CPU: `train_grpo.py` -> Ray -> veRL's V1 GRPO trainer -> 2 FSDP2 ranks (gloo) + HF rollouts.

The real runs are shared with the other end-to-end tests (`tests/shared_runs.py`, session fixtures):
- `trained_run`: 2 GRPO steps with the curriculum on, a checkpoint at every step (rotation keeps step 2's shards;
  its Hub upload is checked in test_train_upload_e2e.py);
- `resumed_run`: the same command at world size 3 in a fresh directory, with 3 steps: it pulls the step-2
  snapshot from the Hub, veRL loads it and trains step 3 only (test_hub_resume_e2e.py checks the resume itself).
  It also asks veRL to save its own gathered `huggingface/` model at step 3, the independent ground truth for
  consolidating a checkpoint the real trainer wrote;
- `no_sync_run` (VERL_GRPO_E2E_FULL=1 only: a third minute-long Ray run): 2 steps with the HF rollout's weight sync
  switched off (`engine_kwargs.hf.sync_weights=false`), the negative control of the weight-sync check.
Ground truth for "weight sync is real" is veRL's own metric `training/rollout_probs_diff_max`: the gap between
the rollout's log-probs and the actor's recomputed ones for the same tokens.
"""

import json
import os

import pytest

from tests import shared_runs

pytestmark = pytest.mark.slow

# Kept for tests that import them from here: this file's former batch settings (with its save_freq) and runner
# (returning veRL's per-step metrics). New tests: use tests/shared_runs.py (and its shared runs) directly.
SMALL = [*shared_runs.SMALL, "trainer.save_freq=2"]
FULL = os.environ.get("VERL_GRPO_E2E_FULL") == "1"
FULL_REASON = "negative control (a third Ray run): set VERL_GRPO_E2E_FULL=1"


def run_train(tmp, name: str, overrides: list[str], *, timeout: int = 420) -> dict[int, dict[str, float]]:
    """``shared_runs.run_train(...).steps`` (the former signature of this module's helper)."""
    return shared_runs.run_train(tmp, name, overrides, timeout=timeout).steps


def test_two_grpo_steps_write_verls_fsdp2_checkpoint(trained_run):
    ckpt = trained_run.extra["ckpt"]
    assert sorted(trained_run.steps) == [1, 2]
    # a save at each step; rotation (max_actor_ckpt_to_keep=1) removed step 1's shards once its upload read them
    assert trained_run.extra["listing"] == ["global_step_1", "global_step_2", "latest_checkpointed_iteration.txt"]
    # .hf_upload.lock: the (empty) lock the upload of that step held (utils/hub/pending.step_lock)
    assert sorted(p.name for p in (ckpt / "global_step_1").iterdir()) == [
        ".hf_upload.lock",
        "curriculum_state.json",
        "data.pt",
        "lineage.json",
    ]
    assert sorted(p.name for p in (ckpt / "global_step_2").iterdir()) == [
        ".hf_upload.lock",
        "actor",
        "curriculum_state.json",
        "data.pt",
        "lineage.json",  # tracking run id / config hash / veRL version for trainer_state.json
    ]
    actor = ckpt / "global_step_2" / "actor"
    for kind in ("model", "optim", "extra_state"):
        for rank in (0, 1):
            assert (actor / f"{kind}_world_size_2_rank_{rank}.pt").is_file(), (kind, rank)
    assert json.loads((actor / "fsdp_config.json").read_text()) == {"FSDP_version": 2, "world_size": 2}
    hf = actor / "huggingface"
    assert (hf / "config.json").is_file() and (hf / "tokenizer_config.json").is_file()
    import torch.distributed.tensor  # noqa: F401  (registers DTensor for weights_only loading)

    shard = torch.load(actor / "model_world_size_2_rank_0.pt", weights_only=True, map_location="cpu")
    some = next(iter(shard.values()))
    assert type(some).__name__ == "DTensor" and some.device_mesh.size() == 2


def test_curriculum_state_is_saved_with_each_checkpoint(trained_run, resumed_run):
    # step 2 in the first run's folder; step 3 in the resumed run's, its window restored from the Hub snapshot
    for step, ckpt in ((2, trained_run.extra["ckpt"]), (3, resumed_run.extra["ckpt"])):
        state = json.loads((ckpt / f"global_step_{step}" / "curriculum_state.json").read_text())
        assert state["levels"] == {"chain_sum": {"num_terms": 0, "num_digits": 0}}
        # every completion of every step so far went into the window (6 prompts x 4 samples per step)
        assert len(state["windows"]["chain_sum"]) == shared_runs.SEQS_PER_STEP * step
    assert trained_run.steps[2]["curriculum/chain_sum/level"] == 0.0


def test_weight_sync_is_real_rollout_logprobs_match_the_actor(trained_run):
    # Step 2 samples after one update: with sync the rollout has the new weights. Measured: ~2e-9; a rollout left
    # on the step-1 weights is ~1e-3 off (the negative control below, measured with the sync switched off).
    assert trained_run.steps[1]["training/rollout_probs_diff_max"] < 1e-5
    assert trained_run.steps[2]["training/rollout_probs_diff_max"] < 1e-5


@pytest.mark.skipif(not FULL, reason=FULL_REASON)
def test_without_weight_sync_the_rollout_lags_the_actor(trained_run, no_sync_run):
    """Negative control: the metric above does see a rollout that kept stale weights."""
    synced = trained_run.steps[2]["training/rollout_probs_diff_max"]
    stale = no_sync_run.steps[2]["training/rollout_probs_diff_max"]
    # Step 1 samples from the initial weights in both runs: rollout and actor agree.
    assert no_sync_run.steps[1]["training/rollout_probs_diff_max"] < 1e-4
    # Measured: synced ~2e-9, stale ~1e-3 after one AdamW step at the demo lr (3e-3); wide margins both ways.
    assert stale > 1e-4 and stale > 1000 * max(synced, 1e-9)


def test_consolidating_the_trainers_checkpoint_equals_verls_own_gathered_model(resumed_run, tmp_path):
    """Our engine on the shards the real trainer wrote vs veRL's own full-state-dict gather of the same step."""
    from safetensors.torch import load_file

    from tests.consolidation_checks import assert_logits_equal, assert_weights_equal
    from utils.load_fsdp_to_hf import consolidate_checkpoint

    ckpt = resumed_run.extra["ckpt"]
    actor = ckpt / "global_step_3" / "actor"
    verl_dir = actor / "huggingface"
    reference = {}
    for f in sorted(verl_dir.glob("model*.safetensors")):
        reference.update(load_file(f))
    assert reference, f"veRL saved no hf_model under {verl_dir}"
    tied = "lm_head.weight" not in reference
    if tied:
        reference["lm_head.weight"] = reference["model.embed_tokens.weight"]

    out = tmp_path / "merged"
    result = consolidate_checkpoint(ckpt, out, step=3, weights_format="safetensors", dtype="fp32",
                                    include_optimizer=True, progress=False)
    assert result.step == 3
    assert_weights_equal(out, reference, tied=tied)
    assert_logits_equal(out, reference, verl_dir)
    # the optimizer state is keyed by parameter name: one AdamW entry per trained parameter, full shapes
    import torch

    optim = torch.load(out / "optimizer.pt", weights_only=True)
    trained = {k: v for k, v in reference.items() if not (tied and k == "lm_head.weight")}
    assert sorted(optim["state"]) == sorted(trained)
    for name, state in optim["state"].items():
        assert state["exp_avg"].shape == trained[name].shape, name
        assert float(state["step"]) == 3.0, name  # three optimizer steps: two, then one after the resume
