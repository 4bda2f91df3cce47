"""End to end on CPU, real Ray + veRL + FSDP2 (gloo), local Hub server through the real client. The runs are the
suite's shared ones (`tests/shared_runs.py`):

1. `trained_run`: an empty repo, `hf_upload.resume=auto`, world size 2: the tiny model is pushed as `step-0`
   before training; 2 GRPO steps; the trainer's upload hook pushes each checkpoint as a resume snapshot
   (`strategy=checkpoint`: model, optimizer.pt, trainer_state.json);
2. `resumed_run`: a fresh, empty local directory at world size 3, `resume=auto`, 3 steps: it pulls the step-2
   snapshot, reshards it, and veRL trains step 3 only, with the lr schedule continuing (its saved scheduler state
   counts 3 steps) and the dataloader not replaying (its saved position counts 3 batches, not 1); step 3 is then pushed
   as `step-3`, saved at the new world size;
3. `w1` (only with VERL_GRPO_E2E_FULL=1): the same at world size 1 from that W=3 snapshot, training step 4.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.shared_runs import ALICE, RUN_REPO, resume_from_the_hub

pytestmark = pytest.mark.slow  # reads the shared runs; a third Ray run with VERL_GRPO_E2E_FULL=1

# The W=1 resume (measured: passes, ~60 s) is one more Ray run: it runs with VERL_GRPO_E2E_FULL=1;
# test_reshard.py checks W=1 resharding exactly without Ray.
FULL = os.environ.get("VERL_GRPO_E2E_FULL") == "1"
FULL_REASON = "W=1 Ray resume: set VERL_GRPO_E2E_FULL=1 (W=1 resharding is covered by test_reshard.py)"


@pytest.fixture(scope="module")
def runs(trained_run, resumed_run, e2e_dir, hub_server) -> dict:
    """{"first": the W=2 run, 3: the W=3 resume, 1: the W=1 resume (FULL only)}, each (steps, local dir, log)."""
    assert resumed_run.extra["resume"].returncode == 0  # step-3 is on the Hub before W=1 resumes from it
    out = {"first": (trained_run.steps, trained_run.extra["ckpt"], trained_run.log),
           3: (resumed_run.steps, resumed_run.extra["ckpt"], resumed_run.log),
           "tags_after_first": trained_run.extra["tags"]}
    if FULL:
        # its step-3 upload is left pending (the Hub goes down once the pull is done): the repo keeps W=3's step-3
        w1 = resume_from_the_hub(e2e_dir, hub_server, world=1, steps=4, finish=False)
        out[1] = (w1.steps, w1.extra["ckpt"], w1.log)
    return out


def test_empty_namespace_gets_step_0_before_the_first_step(runs):
    # step-0 is the bootstrap, step-1 and step-2 the upload hook's resume snapshots
    assert runs["tags_after_first"] == ["step-0", "step-1", "step-2"]
    steps, first, log = runs["first"]
    assert log.index("bootstrapping it with") < log.index("step:1 -")
    assert sorted(steps) == [1, 2]
    lineage = json.loads((first / "global_step_2" / "lineage.json").read_text())
    assert lineage["world_size"] == 2 and lineage["tracking"]["wandb_run_id"]
    assert lineage["compat"]["model"]["architectures"] == ["Qwen2ForCausalLM"]


@pytest.mark.parametrize("world", [pytest.param(1, marks=pytest.mark.skipif(not FULL, reason=FULL_REASON)), 3])
def test_fresh_run_resumes_from_the_hub_at_another_world_size(runs, world):
    steps, local, log = runs[world]
    first_steps, first, _ = runs["first"]
    last = 3 if world == 3 else 4  # W=3 resumes step-2 (from W=2); W=1 resumes step-3 (from W=3)
    assert sorted(steps) == [last], f"steps trained: {sorted(steps)}"  # the earlier steps came from the Hub
    assert "Resuming from" in log and f"global_step_{last - 1}" in log
    assert "bootstrapping" not in log  # step-0 is pushed once, by the first start only
    actor = local / f"global_step_{last - 1}" / "actor"  # the resharded checkpoint veRL loaded
    assert sorted(p.name for p in actor.glob("model_world_size_*")) == \
        [f"model_world_size_{world}_rank_{r}.pt" for r in range(world)]
    assert (local / f"global_step_{last}" / "actor" / f"model_world_size_{world}_rank_{world - 1}.pt").is_file()
    assert (local / "latest_checkpointed_iteration.txt").read_text().strip() == str(last)

    # the lr schedule continues: veRL's saved scheduler has stepped once per step so far (a restart would say 1)
    for rank in range(world):
        extra = torch.load(local / f"global_step_{last}" / "actor" / f"extra_state_world_size_{world}_rank_{rank}.pt",
                           weights_only=False)
        assert extra["lr_scheduler"]["last_epoch"] == last, (rank, extra["lr_scheduler"])
    assert steps[last]["actor/lr"] == pytest.approx(first_steps[2]["actor/lr"], rel=1e-6)  # constant lr, no warmup

    # the dataloader does not replay: its saved position counts every batch so far (a fresh start would count 1)
    data = torch.load(local / f"global_step_{last}" / "data.pt", weights_only=False)
    first_data = torch.load(first / "global_step_2" / "data.pt", weights_only=False)
    assert _yielded(first_data) == 2 and _yielded(data) == last

    # the tracking run id continues: the resumed run records the first run's id
    first_lineage = json.loads((first / "global_step_2" / "lineage.json").read_text())
    lineage = json.loads((local / f"global_step_{last}" / "lineage.json").read_text())
    assert lineage["tracking"]["wandb_run_id"] == first_lineage["tracking"]["wandb_run_id"]
    assert lineage["world_size"] == world


def _yielded(state: dict) -> int:
    """Batches handed out by veRL's StatefulDataLoader (single-process or worker layout)."""
    if "_num_yielded" in state:
        return int(state["_num_yielded"])
    return int(state["_snapshot"]["_main_snapshot"]["_num_yielded"])


def test_trainer_state_on_the_hub_describes_the_snapshot(runs):
    from utils.hub.snapshots import find_resume_snapshot

    snap = find_resume_snapshot(RUN_REPO, "", revision="step-2", token=ALICE)
    state = snap.state
    assert snap.tag == "step-2" and snap.resumable
    assert state["global_step"] == 2 and state["world_size"] == 2 and state["has_optimizer"]
    assert state["dataloader"]["batches_yielded"] == 2
    assert state["lr_scheduler"]["last_epoch"] == 2
    assert state["verl_version"] == "0.9.1" and len(state["config_hash"]) == 16
    assert {"resume/extra_state_rank_0.pt", "resume/extra_state_rank_1.pt", "resume/data.pt", "optimizer.pt",
            "resume/lineage.json"} <= set(state["files"])


def test_the_resumed_run_pushes_its_own_snapshot_saved_at_the_new_world_size(resumed_run):
    from utils.hub.snapshots import find_resume_snapshot

    # pushed by `hf_uploader.py resume` after the run (the Hub was down at its end; test_train_upload_e2e.py)
    assert resumed_run.extra["resume"].returncode == 0, resumed_run.extra["resume"].stderr
    snap = find_resume_snapshot(RUN_REPO, "", token=ALICE)  # the newest complete one
    assert snap.tag == "step-3" and snap.resumable
    assert snap.state["global_step"] == 3 and snap.state["world_size"] == 3
