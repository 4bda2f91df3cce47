"""Shared assertions for consolidation tests, and the session cache of real FSDP2 checkpoints they run on.

The assertions take a checkpoint directory and an *independent* reference state dict, so any checkpoint - the
FSDP2 writer's, or one written by the real veRL trainer - plugs into the same checks::

    out = consolidate_checkpoint(actor_dir, tmp_path / "out", weights_format="safetensors", dtype="fp32")
    assert_weights_equal(out.out_dir, reference_state_dict, tied=True)
    assert_logits_equal(out.out_dir, reference_state_dict)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from tests.fsdp_writer import WrittenCheckpoint, write_checkpoint

# name -> writer arguments. Dims of the tiny model (101, 35, 37, 32, 16) make uneven shards at W = 2, 3, 4.
CASES: dict[str, dict] = {
    "w1_tied": dict(world_size=1, tied=True),
    "w2_untied": dict(world_size=2, tied=False),
    "w3_tied": dict(world_size=3, tied=True),
    "w4_untied": dict(world_size=4, tied=False),
    "hsdp2x2_tied": dict(world_size=4, tied=True, hsdp=(2, 2)),
}
# Bigger checkpoints for memory checks; not part of the all-cases parametrisations.
LARGE_CASES: dict[str, dict] = {
    "medium_w2": dict(world_size=2, tied=False, preset="medium", steps=1),
}
# LoRA runs (PEFT around the model before FSDP2, as veRL's lora_rank > 0 does): rank 4, alpha 8.
LORA_CASES: dict[str, dict] = {
    "lora_w2": dict(world_size=2, tied=False, lora=(4, 8.0)),
    "lora_w3_tied": dict(world_size=3, tied=True, lora=(4, 8.0)),
    "lora_only_w2": dict(world_size=2, tied=False, lora=(4, 8.0), lora_only=True),
}
# Derived from a written case without re-running FSDP: the same real shards in an older layout.
DERIVED = {
    "legacy_w2": "w2_untied",  # no fsdp_config.json (veRL before mid-2025)
    "plain_w1": "w1_tied",  # plain tensors at W=1 (old veRL, verl #903)
}
# Derived LoRA cases (kept out of DERIVED: the full-model parametrisations run over that).
LORA_DERIVED = {
    "lora_w2_nometa": "lora_w2",  # no lora_train_meta.json (veRL before it wrote one): alpha unknown
}


class CheckpointCache:
    """Writes each case on first use (spawning FSDP processes is the expensive part) and reuses it afterwards."""

    def __init__(self, root: Path):
        self.root = root
        self._done: dict[str, WrittenCheckpoint] = {}

    def __getitem__(self, name: str) -> WrittenCheckpoint:
        if name not in self._done:
            self._done[name] = self._derive(name) if name in {**DERIVED, **LORA_DERIVED} else write_checkpoint(
                self.root / name, **{**CASES, **LARGE_CASES, **LORA_CASES}[name])
        return self._done[name]

    def _derive(self, name: str) -> WrittenCheckpoint:
        src = self[{**DERIVED, **LORA_DERIVED}[name]]
        dst = self.root / name
        shutil.copytree(src.root, dst)
        ck = WrittenCheckpoint(root=dst, step=src.step, world_size=src.world_size, tied=src.tied)
        if name == "legacy_w2":
            (ck.actor_dir / "fsdp_config.json").unlink()
        elif name == "lora_w2_nometa":
            (ck.actor_dir / "lora_train_meta.json").unlink()
        elif name == "plain_w1":
            (ck.actor_dir / "fsdp_config.json").unlink()
            gt = load_ground_truth(ck)
            model = dict(gt["model"])
            if ck.tied:  # torch.save keeps the tie: both names share one storage, as in a real save
                model["lm_head.weight"] = model["model.embed_tokens.weight"]
            torch.save(model, ck.actor_dir / "model_world_size_1_rank_0.pt")
        return ck


def load_ground_truth(ck: WrittenCheckpoint) -> dict:
    """``{"model": full state dict, "optim": full optimizer state dict, "config": dict}`` gathered by the writer."""
    return torch.load(ck.ground_truth_path, weights_only=True)


def load_output_state_dict(out_dir: Path) -> dict[str, torch.Tensor]:
    """Read every weight file of a consolidated folder directly (no transformers), via the index if sharded."""
    from safetensors.torch import load_file

    out_dir = Path(out_dir)
    files = sorted(p.name for p in out_dir.iterdir() if p.suffix in (".bin", ".safetensors"))
    state: dict[str, torch.Tensor] = {}
    for name in files:
        part = load_file(out_dir / name) if name.endswith(".safetensors") else torch.load(out_dir / name,
                                                                                          weights_only=True)
        assert not set(part) & set(state), f"{name} repeats keys"
        state.update(part)
    for index in out_dir.glob("*.index.json"):
        weight_map = json.loads(index.read_text())["weight_map"]
        assert weight_map.keys() == state.keys(), "index does not cover exactly the written keys"
    return state


def assert_weights_equal(out_dir: Path, reference: dict[str, torch.Tensor], *, tied: bool,
                         dtype: torch.dtype = torch.float32) -> None:
    """Every tensor on disk equals the reference (cast to ``dtype``) bitwise; a tied lm_head is stored once."""
    written = load_output_state_dict(out_dir)
    expected = {k: v for k, v in reference.items() if not (tied and k == "lm_head.weight")}
    assert sorted(written) == sorted(expected)
    for k, v in expected.items():
        assert written[k].dtype == (dtype if v.is_floating_point() else v.dtype), k
        assert torch.equal(written[k], v.to(written[k].dtype)), k


def reference_model(config_dir: Path, reference: dict[str, torch.Tensor]):
    """The model the reference state dict describes, in fp32, built without the engine's files."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config_dir)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(reference, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return model.eval()


def assert_logits_equal(out_dir: Path, reference: dict[str, torch.Tensor], config_dir: Path, *,
                        atol: float = 0.0) -> None:
    """``from_pretrained(out_dir)`` gives the reference model's logits: exactly (atol=0) or within ``atol``."""
    from transformers import AutoModelForCausalLM

    ref = reference_model(config_dir, reference)
    loaded = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    ids = torch.arange(3, 3 + 2 * 11).reshape(2, 11) % ref.config.vocab_size
    with torch.no_grad():
        want = ref(input_ids=ids).logits
        got = loaded(input_ids=ids).logits.float()
    if atol == 0.0:
        assert torch.equal(got, want), (got - want).abs().max()
    else:
        torch.testing.assert_close(got, want, atol=atol, rtol=0)
