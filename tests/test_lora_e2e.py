"""LoRA GRPO end to end on CPU: real Ray + veRL 0.9.1's own LoRA path (PEFT, FSDP2 on gloo) + the hf
rollout, the local Hub server through the real client. Ray runs shared by the tests here:

1. `first`: `+lora=cpu` at world size 2, 2 GRPO steps, `hf_upload.strategy=checkpoint` with `hf_upload.lora=both`:
   the upload hook pushes the step-2 snapshot (merged model at the namespace root, the PEFT adapter in `adapter/`,
   the LoRA optimizer state, veRL's trainer state);
2. `resumed` (with VERL_GRPO_E2E_FULL=1: a second ~2-minute run): a fresh local directory at world size 1,
   `hf_upload.resume=required`, 3 steps: it pulls the LoRA snapshot, reshards the adapter and its optimizer for one
   rank, and veRL trains step 3 only. Without it, LoRA resharding at another world size is still checked exactly,
   without Ray, in tests/test_consolidate_lora.py.

Ground truth: PEFT itself (`PeftModel.from_pretrained(base, adapter)` on the tiny base model the run started from),
and the base model's own weights (frozen by LoRA: the checkpoint's base weights must equal them bit for bit).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tests.test_train_grpo_e2e import SMALL, run_train

pytestmark = pytest.mark.slow  # one short Ray run (~2 min on 2 cores), two with VERL_GRPO_E2E_FULL=1

REPO, NS = "alice/e2e-lora", "lora"
IDS = torch.arange(3, 3 + 2 * 13).reshape(2, 13)
HUB = ["hf_upload.enabled=true", f"hf_upload.repo_id={REPO}", f"hf_upload.namespace={NS}",
       "hf_upload.strategy=checkpoint", "hf_upload.lora=both"]
# PEFT's unmerged forward x@W^T + s*(x@A^T)@B^T vs the merged x@(W + s*B@A)^T: the same math in another order,
# fp32 rounding only. Measured max |delta logit| ~1e-6 on the tiny model; 1e-5 leaves room, a wrong merge is >1e-2.
LOGIT_ATOL = 1e-5


@pytest.fixture(scope="module")
def token(hub_server):
    hub_server.come_up()
    hub_server.clear_faults()
    old = os.environ.get("HF_TOKEN")
    os.environ["HF_TOKEN"] = hub_server.token_for("alice")  # run_train passes the environment on to train_grpo.py
    yield os.environ["HF_TOKEN"]
    if old is None:
        os.environ.pop("HF_TOKEN", None)
    else:
        os.environ["HF_TOKEN"] = old


@pytest.fixture(scope="module")
def runs(token, tmp_path_factory):
    """The W=2 LoRA run (see the module docstring): its per-step metrics, folders and the base model it loaded."""
    tmp = tmp_path_factory.mktemp("e2e-lora")
    first = run_train(tmp, "first", ["+lora=cpu", *SMALL, *HUB, "hf_upload.resume=auto",
                                     f"trainer.default_local_dir={tmp / 'first'}",
                                     "trainer.total_training_steps=2", "trainer.n_gpus_per_node=2"])
    from training.tiny_model import ensure_tiny_model

    base = Path(ensure_tiny_model(tmp / "model-cache"))  # the model the runs started from (run_train's cache)
    return {"tmp": tmp, "first": first, "base": base, "token": token}


@pytest.fixture(scope="module")
def resumed(runs):
    """A fresh directory at W=1 that resumes the W=2 run's LoRA snapshot from the Hub and trains step 3."""
    tmp = runs["tmp"]
    return run_train(tmp, "resumed", ["+lora=cpu", *SMALL, *HUB, "hf_upload.resume=required",
                                      f"trainer.default_local_dir={tmp / 'resumed'}",
                                      "trainer.total_training_steps=3", "trainer.n_gpus_per_node=1"])


def _base_model(base: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS % model.config.vocab_size).logits


def test_lora_training_writes_verls_lora_checkpoint_with_frozen_base_weights(runs):
    from tests.consolidation_checks import load_output_state_dict
    from utils.checkpoint.merge import RankShards

    assert sorted(runs["first"]) == [1, 2]
    actor = runs["tmp"] / "first" / "global_step_2" / "actor"
    assert json.loads((actor / "lora_train_meta.json").read_text()) == {"r": 8, "lora_alpha": 16,
                                                                        "task_type": "CAUSAL_LM"}
    shards = RankShards([actor / f"model_world_size_2_rank_{r}.pt" for r in range(2)])
    lora = [k for k in shards.keys if ".lora_" in k]
    assert len(lora) == 2 * 7 * 2  # A and B for 7 linear layers x 2 decoder layers (all-linear, no lm_head)
    base = load_output_state_dict(runs["base"])
    for key in shards.keys:  # LoRA freezes the base: its weights are the tiny model's, bit for bit
        if ".lora_" not in key:
            name = key.removeprefix("base_model.model.").replace(".base_layer.", ".")
            assert torch.equal(shards.assemble(key), base[name]), name
    b = shards.assemble(next(k for k in lora if ".lora_B." in k))
    assert b.abs().max() > 0  # B starts at 0: two steps moved it


def test_rollout_receives_the_merged_weights_every_step(runs):
    """Within-run control: the reference policy of a LoRA run is the base model (adapters disabled), i.e. exactly
    what a rollout that never received the merged weights would still hold. So at step 2, on the same sampled tokens,
    KL(actor || rollout) must be far below KL(actor || base) - both veRL's k3 estimator."""
    step1, step2 = runs["first"][1], runs["first"][2]
    assert step1["actor/kl_loss"] == 0.0  # step 1: the adapters are still B = 0, actor == base
    moved = step2["actor/kl_loss"]  # what one update moved the actor away from the base weights
    synced = step2["rollout_corr/k3_kl"]
    # Measured: moved 4.3e-3, synced 6.4e-8 (veRL sends the merged weights as bf16: rounding, not staleness).
    assert moved > 1e-4, moved
    assert synced < 1e-3 * moved, (synced, moved)
    assert step2["training/rollout_probs_diff_max"] < 1e-4


def test_consolidated_merged_model_equals_base_plus_adapter_through_peft(runs, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from utils.load_fsdp_to_hf import consolidate_checkpoint

    res = consolidate_checkpoint(runs["tmp"] / "first", tmp_path / "out", lora="both", dtype="fp32",
                                 weights_format="safetensors", include_optimizer=True, progress=False)
    assert res.step == 2 and res.world_size == 2
    assert res.lora["r"] == 8 and res.lora["lora_alpha"] == 16 and res.lora["num_adapted_modules"] == 14
    assert res.lora["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    merged = AutoModelForCausalLM.from_pretrained(res.out_dir).eval()
    via_peft = PeftModel.from_pretrained(_base_model(runs["base"]), res.out_dir / "adapter").eval()
    torch.testing.assert_close(_logits(merged), _logits(via_peft), atol=LOGIT_ATOL, rtol=0)
    assert (_logits(merged) - _logits(_base_model(runs["base"]))).abs().max() > 1e-4  # the adapter matters
    optim = torch.load(res.out_dir / "optimizer.pt", weights_only=True)
    assert len(optim["state"]) == 28 and all(".lora_" in k for k in optim["state"])
    assert {float(s["step"]) for s in optim["state"].values()} == {2.0}


def test_upload_holds_both_forms_and_each_loads_from_the_hub(runs, tmp_path):
    from huggingface_hub import HfApi
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    api = HfApi(token=runs["token"])
    tags = sorted(t.name for t in api.list_repo_refs(REPO).tags)
    # the step-2 snapshot (and lora-step-3 once the resumed run pushed it); no step-0 bootstrap for a LoRA run
    assert "lora-step-2" in tags and set(tags) <= {"lora-step-2", "lora-step-3"}, tags
    files = set(api.list_repo_files(REPO, revision="lora-step-2"))
    # the merged model in hf_upload.weights_format (default bin); the PEFT adapter is always safetensors
    assert {f"{NS}/adapter/adapter_config.json", f"{NS}/adapter/adapter_model.safetensors", f"{NS}/config.json",
            f"{NS}/pytorch_model.bin", f"{NS}/optimizer.pt", f"{NS}/trainer_state.json", f"{NS}/README.md"} <= files
    merged = AutoModelForCausalLM.from_pretrained(REPO, revision="lora-step-2", subfolder=NS, token=runs["token"])
    adapter = PeftModel.from_pretrained(_base_model(runs["base"]), REPO, revision="lora-step-2",
                                        subfolder=f"{NS}/adapter", token=runs["token"])
    torch.testing.assert_close(_logits(merged.eval()), _logits(adapter.eval()), atol=LOGIT_ATOL, rtol=0)
    card = api.hf_hub_download(REPO, f"{NS}/README.md", revision="lora-step-2")
    text = Path(card).read_text()
    assert "| LoRA rank r | 8 |" in text and "| LoRA alpha | 16 |" in text and "`q_proj`" in text
    assert f'subfolder="{NS}/adapter"' in text and "- lora" in text
    config = json.loads(Path(api.hf_hub_download(REPO, f"{NS}/adapter/adapter_config.json",
                                                  revision="lora-step-2")).read_text())
    assert config["base_model_name_or_path"] == str(runs["base"])  # the folder the run loaded


@pytest.mark.skipif(os.environ.get("VERL_GRPO_E2E_FULL") != "1",
                    reason="LoRA Hub resume at W=1 (a second Ray run): set VERL_GRPO_E2E_FULL=1")
def test_fresh_run_at_world_size_1_resumes_the_lora_snapshot_and_trains_step_3(runs, resumed):
    from utils.hub.snapshots import find_resume_snapshot

    tmp = runs["tmp"]
    assert sorted(resumed) == [3], sorted(resumed)  # steps 1-2 came from the Hub
    log = (tmp / "resumed.log").read_text()
    assert "Resuming from" in log and "global_step_2" in log
    actor = tmp / "resumed" / "global_step_2" / "actor"  # what veRL loaded: adapters-only shards for one rank
    import torch.distributed.tensor  # noqa: F401  (registers DTensor for weights_only loading)

    shard = torch.load(actor / "model_world_size_1_rank_0.pt", weights_only=True)
    assert len(shard) == 28 and all(".lora_" in k for k in shard)
    assert json.loads((actor / "lora_train_meta.json").read_text())["r"] == 8
    assert (tmp / "resumed" / "global_step_3" / "actor" / "model_world_size_1_rank_0.pt").is_file()
    snap = find_resume_snapshot(REPO, NS, token=runs["token"])
    assert snap.tag == "lora-step-3" and snap.resumable and snap.state["world_size"] == 1
    optim = torch.load(snap.folder / "optimizer.pt", weights_only=True)
    assert {float(s["step"]) for s in optim["state"].values()} == {3.0}  # AdamW continued: 2 steps + 1
