"""``optimizer.pt``: name-keyed, equal to the full optimizer state gathered by the writer processes, loadable into a
plain AdamW over the HF model by name, and into FSDP2 at another world size via torch's ``set_optimizer_state_dict``.
"""

from __future__ import annotations

import pytest
import torch

from tests.consolidation_checks import load_ground_truth
from tests.fsdp_writer import load_optimizer_at_world_size
from utils.load_fsdp_to_hf import consolidate_checkpoint

pytestmark = pytest.mark.slow


def _assert_optim_equal(got: dict, want: dict) -> None:
    assert list(got["state"]) == list(want["state"])
    for name, entry in want["state"].items():
        assert sorted(got["state"][name]) == sorted(entry), name
        for k, v in entry.items():
            assert torch.equal(got["state"][name][k], v), (name, k)
    # set/get_optimizer_state_dict flatten and rebuild the groups, so betas may come back as a list, not a tuple
    def norm(group: dict) -> dict:
        return {k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in group.items()}

    for g, w in zip(map(norm, got["param_groups"]), map(norm, want["param_groups"]), strict=True):
        assert {k: v for k, v in g.items() if g.get(k) != w.get(k)} == {k: v for k, v in w.items() if g.get(k) != v}


@pytest.fixture(scope="module")
def consolidated_w3(fsdp_checkpoints, tmp_path_factory):
    ck = fsdp_checkpoints["w3_tied"]
    out = tmp_path_factory.mktemp("opt") / "out"
    res = consolidate_checkpoint(ck.actor_dir, out, include_optimizer=True, progress=False)
    return ck, res


def test_optimizer_pt_equals_the_full_state_gathered_by_fsdp(consolidated_w3):
    ck, res = consolidated_w3
    assert res.optimizer_file == "optimizer.pt" and "optimizer.pt" in res.files
    got = torch.load(res.out_dir / "optimizer.pt", weights_only=True)
    _assert_optim_equal(got, load_ground_truth(ck)["optim"])
    assert got["state"]["model.embed_tokens.weight"]["step"].ndim == 0  # 0-d step kept once, not concatenated


@pytest.mark.parametrize("case", ["w4_untied", "hsdp2x2_tied", "legacy_w2", "plain_w1"])
def test_optimizer_merge_across_layouts(fsdp_checkpoints, tmp_path, case):
    ck = fsdp_checkpoints[case]
    res = consolidate_checkpoint(ck.actor_dir, tmp_path / "out", include_optimizer=True, progress=False)
    _assert_optim_equal(torch.load(res.out_dir / "optimizer.pt", weights_only=True), load_ground_truth(ck)["optim"])


def test_optimizer_pt_loads_into_a_plain_adamw_over_the_hf_model_by_name(consolidated_w3):
    from transformers import AutoModelForCausalLM

    ck, res = consolidated_w3
    model = AutoModelForCausalLM.from_pretrained(res.out_dir)
    full = torch.load(res.out_dir / "optimizer.pt", weights_only=True)
    names = [n for n, _ in model.named_parameters()]
    assert full["param_groups"][0]["params"] == names  # the HF model's own parameter names and order
    # torch's Optimizer.load_state_dict wants integer ids: map the names through the model's parameter order.
    ids = {n: i for i, n in enumerate(names)}
    by_id = {"state": {ids[n]: s for n, s in full["state"].items()},
             "param_groups": [{**g, "params": [ids[n] for n in g["params"]]} for g in full["param_groups"]]}
    optim = torch.optim.AdamW(model.parameters(), lr=1.0)
    optim.load_state_dict(by_id)
    gt = load_ground_truth(ck)["optim"]
    for n, p in model.named_parameters():
        assert torch.equal(optim.state[p]["exp_avg"], gt["state"][n]["exp_avg"]), n
    assert optim.param_groups[0]["lr"] == gt["param_groups"][0]["lr"]
    model(input_ids=torch.tensor([[3, 4, 5]]), labels=torch.tensor([[3, 4, 5]])).loss.backward()
    optim.step()  # usable: one more step runs and advances the step count
    assert optim.state[model.model.norm.weight]["step"].item() == gt["state"]["model.norm.weight"]["step"].item() + 1


def test_optimizer_pt_loads_at_another_world_size_with_set_optimizer_state_dict(consolidated_w3, tmp_path):
    ck, res = consolidated_w3
    got = load_optimizer_at_world_size(res.out_dir, 2, tmp_path / "roundtrip.pt")  # saved at W=3, loaded at W=2
    _assert_optim_equal(got["roundtrip"], load_ground_truth(ck)["optim"])
    assert got["local_shapes_rank0"]["exp_avg"] == torch.Size([51, 35])  # really sharded at W=2: 101 -> 51 + 50
