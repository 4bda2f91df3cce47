"""End to end on CPU, real Ray + veRL + FSDP2 (gloo), local Hub server through the real client:

1. `first`: an empty namespace, `hf_upload.resume=auto`, world size 2: the tiny model is pushed as `exp-step-0`
   before training; 2 GRPO steps; the trainer's upload hook pushes the step-2 checkpoint as a resume snapshot
   (`strategy=checkpoint`: model, optimizer.pt, trainer_state.json);
2. `w3` (and `w1` with VERL_GRPO_E2E_FULL=1): fresh, empty local directories at world sizes 3 and 1, `resume=auto`,
   3 steps: each pulls the snapshot, reshards it, and veRL trains step 3 only, with the lr schedule continuing
   (linear warmup: the lr keeps climbing) and the dataloader not replaying (its saved position counts 3 batches,
   not 1); the hook then pushes `exp-step-3`, saved at the new world size.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.shared_runs import run_train

pytestmark = pytest.mark.slow  # ~2.5 min: two short Ray runs (three with VERL_GRPO_E2E_FULL=1)

REPO, NS = "alice/e2e-resume", "exp"
# 6 prompts x 4 samples = 24 sequences: divisible by world sizes 1, 2 and 3 (and micro batches of 4).
SMALL = [
    "data.train_batch_size=6",
    "actor_rollout_ref.actor.ppo_mini_batch_size=6",
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4",
    "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4",
    "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=4",
    "actor_rollout_ref.actor.optim.lr_warmup_steps=10",  # the lr changes every step: a restart would show
    "reasoning_gym.val_size=4",
    "data.val_batch_size=4",
    "trainer.save_freq=2",
    "hf_upload.enabled=true",
    f"hf_upload.repo_id={REPO}",
    f"hf_upload.namespace={NS}",
    "hf_upload.strategy=checkpoint",
    "hf_upload.resume=auto",
]


# The suite's time budget holds two Ray runs here (~1.5 min each on 2 shared cores): the W=2 training run and the
# W=3 resume (uneven shards, more ranks than saved). The W=1 resume (measured: passes, ~60 s) runs with
# VERL_GRPO_E2E_FULL=1; test_reshard.py checks W=1 resharding exactly without Ray.
FULL = os.environ.get("VERL_GRPO_E2E_FULL") == "1"
FULL_REASON = "W=1 Ray resume: set VERL_GRPO_E2E_FULL=1 (W=1 resharding is covered by test_reshard.py)"


def _world(n: int) -> list[str]:
    return [f"trainer.n_gpus_per_node={n}"]


@pytest.fixture(scope="module")
def runs(hub_server, tmp_path_factory):
    from huggingface_hub import HfApi

    hub_server.come_up()
    hub_server.clear_faults()
    tmp = tmp_path_factory.mktemp("e2e-resume")
    token = hub_server.token_for("alice")
    old = os.environ.get("HF_TOKEN")
    os.environ["HF_TOKEN"] = token  # run_train passes the environment to train_grpo.py
    try:
        first = run_train(tmp, "first", [*SMALL, *_world(2), f"trainer.default_local_dir={tmp / 'first'}",
                                         "trainer.total_training_steps=2"]).steps
        tags_after_first = sorted(t.name for t in HfApi(token=token).list_repo_refs(REPO).tags)
        w1 = run_train(tmp, "w1", [*SMALL, *_world(1), f"trainer.default_local_dir={tmp / 'w1'}",
                                   "trainer.total_training_steps=3"]).steps if FULL else None
        w3 = run_train(tmp, "w3", [*SMALL, *_world(3), f"trainer.default_local_dir={tmp / 'w3'}",
                                   "trainer.total_training_steps=3"]).steps
    finally:
        if old is None:
            os.environ.pop("HF_TOKEN", None)
        else:
            os.environ["HF_TOKEN"] = old
    return {"tmp": tmp, "first": first, "w1": w1, "w3": w3, "tags_after_first": tags_after_first}


def test_empty_namespace_gets_step_0_before_the_first_step(runs):
    # exp-step-0 is the bootstrap, exp-step-2 the upload hook's resume snapshot of the last step
    assert runs["tags_after_first"] == ["exp-step-0", "exp-step-2"]
    log = (runs["tmp"] / "first.log").read_text()
    assert log.index("bootstrapping it with") < log.index("step:1 -")
    assert sorted(runs["first"]) == [1, 2]
    lineage = json.loads((runs["tmp"] / "first" / "global_step_2" / "lineage.json").read_text())
    assert lineage["world_size"] == 2 and lineage["tracking"]["wandb_run_id"]
    assert lineage["compat"]["model"]["architectures"] == ["Qwen2ForCausalLM"]


@pytest.mark.parametrize("world", [pytest.param(1, marks=pytest.mark.skipif(not FULL, reason=FULL_REASON)), 3])
def test_fresh_run_resumes_from_the_hub_at_another_world_size(runs, world):
    name = f"w{world}"
    steps, tmp = runs[name], runs["tmp"]
    assert sorted(steps) == [3], f"steps trained: {sorted(steps)}"  # steps 1-2 came from the Hub
    log = (tmp / f"{name}.log").read_text()
    assert "Resuming from" in log and "global_step_2" in log
    assert "bootstrapping" not in log  # step-0 is pushed once, by the first start only
    actor = tmp / name / "global_step_2" / "actor"  # the resharded checkpoint veRL loaded
    assert sorted(p.name for p in actor.glob("model_world_size_*")) == \
        [f"model_world_size_{world}_rank_{r}.pt" for r in range(world)]
    assert (tmp / name / "global_step_3" / "actor" / f"model_world_size_{world}_rank_0.pt").is_file()

    # lr schedule continues: linear warmup, so step 3's lr is the next point on the first run's line
    lr1, lr2, lr3 = runs["first"][1]["actor/lr"], runs["first"][2]["actor/lr"], steps[3]["actor/lr"]
    assert lr2 > lr1 and lr3 == pytest.approx(lr2 + (lr2 - lr1), rel=1e-6)

    # the dataloader does not replay: its position after step 3 counts 3 batches (a fresh start would count 1)
    data = torch.load(tmp / name / "global_step_3" / "data.pt", weights_only=False)
    first = torch.load(tmp / "first" / "global_step_2" / "data.pt", weights_only=False)
    assert _yielded(first) == 2 and _yielded(data) == 3

    # the tracking run id continues: the resumed run records the first run's id
    first_lineage = json.loads((tmp / "first" / "global_step_2" / "lineage.json").read_text())
    lineage = json.loads((tmp / name / "global_step_3" / "lineage.json").read_text())
    assert lineage["tracking"]["wandb_run_id"] == first_lineage["tracking"]["wandb_run_id"]
    assert lineage["world_size"] == world


def _yielded(state: dict) -> int:
    """Batches handed out by veRL's StatefulDataLoader (single-process or worker layout)."""
    if "_num_yielded" in state:
        return int(state["_num_yielded"])
    return int(state["_snapshot"]["_main_snapshot"]["_num_yielded"])


def test_trainer_state_on_the_hub_describes_the_snapshot(runs, hub_server):
    from utils.hub.snapshots import find_resume_snapshot

    snap = find_resume_snapshot(REPO, NS, revision="exp-step-2", token=hub_server.token_for("alice"))
    state = snap.state
    assert snap.tag == "exp-step-2" and snap.resumable
    assert state["global_step"] == 2 and state["world_size"] == 2 and state["has_optimizer"]
    assert state["dataloader"]["batches_yielded"] == 2
    assert state["lr_scheduler"]["last_epoch"] == 2
    assert state["verl_version"] == "0.9.1" and len(state["config_hash"]) == 16
    assert {"resume/extra_state_rank_0.pt", "resume/extra_state_rank_1.pt", "resume/data.pt", "optimizer.pt",
            "resume/lineage.json"} <= set(state["files"])


def test_the_resumed_run_pushes_its_own_snapshot_saved_at_the_new_world_size(runs, hub_server):
    from utils.hub.snapshots import find_resume_snapshot

    snap = find_resume_snapshot(REPO, NS, token=hub_server.token_for("alice"))  # the newest complete one
    assert snap.tag == "exp-step-3" and snap.resumable
    assert snap.state["global_step"] == 3 and snap.state["world_size"] == 3
