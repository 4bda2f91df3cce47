"""End to end with vLLM rollouts on CPU: `train_grpo.py +cpu_rollout=vllm` in `.venv-vllm` -> Ray -> veRL's V1 GRPO
trainer -> 2 FSDP2 ranks (gloo) + veRL's own vLLM rollout (vLLMReplica, vLLMHttpServer with AsyncLLM, the agent
loop, weight sync through shared memory into vLLMColocateWorkerExtension), served by vLLM's CPU backend.

Two real runs, shared by the tests:
- `synced`: 2 GRPO steps, checkpoint at step 2, the Hub upload on against the local Hub server of conftest;
- `no_sync`: the same 2 steps with veRL's weight sync received and then dropped inside vLLM
  (`VERL_GRPO_HUB_VLLM_DROP_WEIGHT_SYNC=1`, training/cpu_plugin/vllm_cpu.py): the control.
Ground truth for "weight sync is real" is veRL's own metric `training/rollout_probs_diff_max` (rollout log-probs vs
the actor's recomputed ones for the same tokens); for "the model serves in vLLM", transformers' greedy tokens.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_train_grpo_e2e import SMALL
from tests.vllm_env import REPO, VLLM_PYTHON, needs_vllm, run_vllm_checks, vllm_env

pytestmark = [pytest.mark.slow, pytest.mark.vllm, needs_vllm]

ALICE = "hf_alice_local_token"
REPO_ID = "alice/tiny-grpo-vllm"
VLLM = ["+cpu_rollout=vllm", "trainer.total_training_steps=2", "trainer.save_freq=2"]
DROP_SYNC = "+ray_kwargs.ray_init.runtime_env.env_vars.VERL_GRPO_HUB_VLLM_DROP_WEIGHT_SYNC=1"
# Log lines only veRL's vLLM rollout path prints (the hf rollout run prints none of them).
VLLM_PATH_MARKERS = {
    "vLLM server args": "'serve'",  # vLLMHttpServer.launch_server pprints `vllm serve` args (replica 0)
    "vLLM engine": "Initializing a V1 LLM engine",
    "worker extension": "vLLMColocateWorkerExtension",
    "weight sync received in vLLM": "Loading standard weights (non-FP8, async)",
    "weight sync done": "update_weights done",
}


def _metrics(log: str) -> dict[int, dict[str, float]]:
    steps: dict[int, dict[str, float]] = {}
    for m in re.finditer(r"\bstep:(\d+) - (.*)", log):
        metrics = {}
        for kv in m.group(2).split(" - "):
            key, _, value = kv.partition(":")
            try:
                metrics[key.strip()] = float(value)
            except ValueError:
                pass
        steps[int(m.group(1))] = metrics
    return steps


def _train(tmp: Path, name: str, overrides: list[str], env: dict[str, str]) -> dict:
    cmd = [str(VLLM_PYTHON), str(REPO / "train_grpo.py"), f"hydra.run.dir={tmp / name / 'hydra'}", *SMALL, *VLLM,
           *overrides]
    started = time.monotonic()
    out = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=900)
    log = out.stdout + out.stderr
    (tmp / f"{name}.log").write_text(log)
    assert out.returncode == 0, log[-8000:]
    return {"log": log, "steps": _metrics(log), "seconds": time.monotonic() - started}


@pytest.fixture(scope="module")
def runs(hub_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vllm_e2e")
    hub_server.come_up()
    hub_server.clear_faults()
    env = vllm_env(VERL_GRPO_HUB_CACHE=str(tmp / "model-cache"), HF_TOKEN=ALICE)
    synced = _train(tmp, "synced", [f"trainer.default_local_dir={tmp / 'ckpt'}", "hf_upload.enabled=true",
                                    f"hf_upload.repo_id={REPO_ID}"], env)
    no_sync = _train(tmp, "no_sync", [f"trainer.default_local_dir={tmp / 'ckpt_no_sync'}", DROP_SYNC], env)
    # the checkpoint of the synced run, consolidated by the public CLI (main venv: no vLLM needed for it)
    merged = tmp / "merged"
    cli = subprocess.run([sys.executable, str(REPO / "utils" / "load_fsdp_to_hf.py"),
                          str(tmp / "ckpt" / "global_step_2" / "actor"), str(merged), "--format", "safetensors"],
                         cwd=tmp, env=vllm_env(), capture_output=True, text=True, timeout=300)
    (tmp / "consolidate.log").write_text(cli.stdout + cli.stderr)
    assert cli.returncode == 0, cli.stdout + cli.stderr
    # vLLM (in .venv-vllm) on the consolidated model and on the uploaded one, downloaded by huggingface_hub
    greedy = run_vllm_checks(["greedy", str(merged), "--hub", f"{REPO_ID}@step-2", "--hub-dir", str(tmp / "hub")],
                             cwd=tmp, env=env, timeout=900, log=tmp / "greedy.log")
    result = {"tmp": tmp, "synced": synced, "no_sync": no_sync, "merged": merged, "greedy": greedy}
    gaps = {name: {s: m.get("training/rollout_probs_diff_max") for s, m in result[name]["steps"].items()}
            for name in ("synced", "no_sync")}
    print(f"\n[vllm e2e] rollout_probs_diff_max {json.dumps(gaps)}; wall s: synced {synced['seconds']:.0f}, "
          f"no_sync {no_sync['seconds']:.0f}")
    return result


def test_two_grpo_steps_with_vllm_rollouts_write_a_checkpoint(runs):
    assert sorted(runs["synced"]["steps"]) == [1, 2]
    ckpt = runs["tmp"] / "ckpt"
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    actor = ckpt / "global_step_2" / "actor"
    for kind in ("model", "optim", "extra_state"):
        for rank in (0, 1):
            assert (actor / f"{kind}_world_size_2_rank_{rank}.pt").is_file(), (kind, rank)
    assert json.loads((actor / "fsdp_config.json").read_text()) == {"FSDP_version": 2, "world_size": 2}
    # the rewards of vLLM's samples went through the project's reward function
    assert "critic/score/mean" in runs["synced"]["steps"][2]


def test_the_run_took_verls_vllm_path(runs):
    log = runs["synced"]["log"]
    missing = [what for what, marker in VLLM_PATH_MARKERS.items() if marker not in log]
    assert not missing, missing
    assert "hf_server_" not in log  # the project's hf rollout was not used


def test_weight_sync_into_vllm_is_real(runs):
    synced = runs["synced"]["steps"]
    stale = runs["no_sync"]["steps"]
    # Step 1 samples from the initial weights in both runs: vLLM and the actor agree.
    assert synced[1]["training/rollout_probs_diff_max"] < 0.05
    assert stale[1]["training/rollout_probs_diff_max"] < 0.05
    # Step 2 samples after one update: with sync vLLM has the new weights; without, it lags behind.
    gap_synced = synced[2]["training/rollout_probs_diff_max"]
    gap_stale = stale[2]["training/rollout_probs_diff_max"]
    assert gap_synced < 0.05
    assert gap_stale > 0.1 and gap_stale > 5 * gap_synced, (gap_synced, gap_stale)
    assert "no-sync control" in runs["no_sync"]["log"] and "no-sync control" not in runs["synced"]["log"]


def test_consolidated_and_uploaded_models_serve_in_vllm_with_transformers_greedy_tokens(runs):
    models = runs["greedy"]["models"]
    downloaded = runs["greedy"]["downloads"][f"{REPO_ID}@step-2"]
    assert set(models) == {str(runs["merged"]), downloaded}
    assert "pytorch_model.bin" in models[downloaded]["files"]  # the uploader's default format loads in vLLM too
    assert "model.safetensors" in models[str(runs["merged"])]["files"]
    for path, tokens in models.items():
        assert len(tokens["hf"]) == 4 and all(len(t) == 24 for t in tokens["hf"]), path
        assert tokens["vllm"] == tokens["hf"], path
    # both are the trained model of step 2, not the initial one
    assert models[str(runs["merged"])]["hf"] == models[downloaded]["hf"]
