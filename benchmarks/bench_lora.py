"""LoRA: adapter vs merged upload (size, consolidation time and peak RSS, upload time) on a synthetic veRL LoRA
checkpoint, against the local Hub server in its own process.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_lora.py                     # Qwen2.5-1.5B shapes, rank 16
    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_lora.py --size demo         # the CPU demo's tiny model
    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_lora.py --size small --rank 8

The input is veRL 0.9.1's LoRA layout (PEFT names: ``base_model.model.<module>.base_layer.weight``,
``...lora_A.default.weight``, ``...lora_B.default.weight``; ``lora_train_meta.json``) with real DTensor shards
(``Shard(0)`` over a 1-D mesh, built over torch's fake process group as in ``bench_consolidate.py``), adapters on
every linear layer of the decoder (``all-linear``), base weights fp32 as veRL's FSDP2 masters.

For each mode (``adapter``, ``merged``), in its own subprocess (peak RSS from ``os.wait4``)::

    python utils/load_fsdp_to_hf.py ACTOR OUT --lora MODE --format safetensors --dtype bf16 --quiet

then ``HuggingFaceUploader.upload_folder`` of OUT into a fresh repo (what the trainer hook sends). The full-model
bound it is compared with: 3 x the largest tensor + 16 MB over the interpreter's baseline (tests/
test_consolidate_memory.py), i.e. what a full fine-tuning checkpoint of the same shapes may take.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_consolidate import SHAPES, _qwen2_shapes, run_measured  # noqa: E402
from benchmarks.bench_upload import TOKEN, start_server  # noqa: E402

SIZES = {**SHAPES, "demo": dict(vocab_size=519, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build_lora_checkpoint(actor: Path, size: str, world_size: int, rank: int, alpha: float) -> dict:
    """Write veRL's LoRA rank files + ``lora_train_meta.json`` + ``huggingface/``; return sizes and the largest tensor."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from transformers import GenerationConfig, Qwen2Config

    from tests.fsdp_writer import build_tokenizer

    cfg = SIZES[size]
    actor.mkdir(parents=True, exist_ok=True)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("fsdp",))
    shapes: dict[str, tuple[int, ...]] = {}
    for key, shape in _qwen2_shapes(cfg).items():
        module, _, leaf = key.rpartition(".")
        if module.rsplit(".", 1)[-1] in TARGETS:
            shapes[f"base_model.model.{module}.base_layer.{leaf}"] = shape
            if leaf == "weight":
                shapes[f"base_model.model.{module}.lora_A.default.weight"] = (rank, shape[1])
                shapes[f"base_model.model.{module}.lora_B.default.weight"] = (shape[0], rank)
        else:
            shapes[f"base_model.model.{key}"] = shape
    gen = torch.Generator().manual_seed(0)
    for r in range(world_size):  # one rank's slice at a time
        sd = {}
        for k, shape in shapes.items():
            if k.endswith("lm_head.weight") and cfg["tie_word_embeddings"]:
                sd[k] = sd["base_model.model.model.embed_tokens.weight"]
                continue
            chunks = torch.arange(shape[0]).chunk(world_size)
            rows = chunks[r].numel() if r < len(chunks) else 0
            local = torch.empty((rows, *shape[1:])).uniform_(-0.05, 0.05, generator=gen)
            stride = torch.empty(shape, device="meta").stride()
            sd[k] = DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=torch.Size(shape),
                                       stride=stride)
        torch.save(sd, actor / f"model_world_size_{world_size}_rank_{r}.pt")
        del sd
    dist.destroy_process_group()
    (actor / "fsdp_config.json").write_text(json.dumps({"FSDP_version": 2, "world_size": world_size}))
    (actor / "lora_train_meta.json").write_text(json.dumps({"r": rank, "lora_alpha": alpha,
                                                            "task_type": "CAUSAL_LM"}))
    config = Qwen2Config(**cfg, max_position_embeddings=4096, bos_token_id=2, eos_token_id=1)
    config.architectures = ["Qwen2ForCausalLM"]
    config.dtype = "bfloat16"
    config.save_pretrained(actor / "huggingface")
    GenerationConfig(eos_token_id=[1, 5]).save_pretrained(actor / "huggingface")
    build_tokenizer(cfg["vocab_size"]).save_pretrained(actor / "huggingface")
    largest = max(4 * int(torch.Size(s).numel()) for s in shapes.values())
    lora_params = sum(int(torch.Size(s).numel()) for k, s in shapes.items() if ".lora_" in k)
    return {"checkpoint_bytes": sum(p.stat().st_size for p in actor.glob("model_world_size_*.pt")),
            "largest_tensor_bytes": largest, "lora_params": lora_params}


_BASELINE = "import torch, transformers, utils.load_fsdp_to_hf"  # the interpreter + imports the CLI pays for


def main(argv: list[str] | None = None) -> int:
    import os

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="full")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--work-dir", default=None, help="default: a temporary folder (removed afterwards)")
    args = p.parse_args(argv)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-lora-"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    server = None
    try:
        t0 = time.perf_counter()
        facts = build_lora_checkpoint(work / "actor", args.size, args.world_size, args.rank, args.alpha)
        print(f"input: {args.size} shapes, W={args.world_size}, rank {args.rank}: "
              f"{facts['checkpoint_bytes'] / 1e9:.2f} GB of rank files, {facts['lora_params'] / 1e6:.2f} M LoRA "
              f"parameters, largest tensor {facts['largest_tensor_bytes'] / 1e6:.1f} MB (built in "
              f"{time.perf_counter() - t0:.0f} s)", flush=True)
        _, base_rss, _ = run_measured([sys.executable, "-c", _BASELINE], env)
        bound = 3 * facts["largest_tensor_bytes"] + 16e6
        server, url = start_server(work / "hub")
        from utils.hf_uploader import HuggingFaceUploader

        rows = []
        for mode in ("adapter", "merged"):
            out = work / f"out-{mode}"
            wall, rss, rc = run_measured([sys.executable, str(ROOT / "utils" / "load_fsdp_to_hf.py"),
                                          str(work / "actor"), str(out), "--lora", mode, "--format", "safetensors",
                                          "--dtype", "bf16", "--quiet"], env)
            if rc != 0:
                return rc
            size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
            up = HuggingFaceUploader(f"bench/lora-{mode}-{time.time_ns()}", private=True, token=TOKEN, endpoint=url,
                                     progress=False)
            up.preflight()
            t1 = time.perf_counter()
            up.upload_folder(out, step=1)
            rows.append((mode, size, wall, rss - base_rss, time.perf_counter() - t1))
            shutil.rmtree(out)
        print(f"{'mode':8s} {'folder MB':>10s} {'consolidate s':>14s} {'peak RSS MB':>12s} {'upload s':>9s}")
        for mode, size, wall, rss, upload in rows:
            print(f"{mode:8s} {size / 1e6:10.1f} {wall:14.1f} {rss / 1e6:12.0f} {upload:9.1f}")
        (a_size, a_up), (m_size, m_up) = [(r[1], r[4]) for r in rows]
        print(f"adapter / merged: {a_size / m_size:.4f} of the bytes, {a_up / m_up:.3f} of the upload time")
        print(f"peak RSS over the import baseline vs the full-model bound (3 x largest + 16 MB = {bound / 1e6:.0f} "
              f"MB): " + ", ".join(f"{m} {r / 1e6:.0f} MB ({'within' if r <= bound else 'ABOVE'})"
                                   for m, _, _, r, _ in rows))
        return 0
    finally:
        if server is not None:
            server.terminate()
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
