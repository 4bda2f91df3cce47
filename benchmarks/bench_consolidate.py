"""Benchmark the consolidation engine against veRL's merger and the I/O floor, on one synthetic veRL checkpoint.

    python benchmarks/bench_consolidate.py --repeat 3            # Qwen2.5-1.5B shapes, W=8, fp32 (6.2 GB input)
    python benchmarks/bench_consolidate.py --small               # a few MB; what the test suite runs
    python benchmarks/bench_consolidate.py --work-dir /data/bench --keep --skip-verl

The input is written in veRL 0.9.1's FSDP2 layout with real DTensor shards (``Shard(0)`` over a 1-D ``('fsdp',)``
mesh, ``torch.chunk`` sizes), built in one process over torch's fake process group so no W processes are needed.
Every contender produces the same output - bf16 safetensors - and runs in its own subprocess; its peak RSS comes
from ``os.wait4`` (the kernel's figure for that child alone). The page cache is warmed first, so all three read
from memory:

    engine : python utils/load_fsdp_to_hf.py ACTOR OUT --format safetensors --dtype bf16 --quiet
    verl   : python -m verl.model_merger merge --backend fsdp --local_dir ACTOR --target_dir OUT
    floor  : python + import torch, read every input byte once, write the output's byte count once

Targets: engine throughput >= 2x veRL's, peak RSS <= 0.25x veRL's, wall <= 1.3x the floor.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {
    # Qwen2.5-1.5B (tied embeddings): 1.544 B parameters, 6.18 GB in fp32.
    "full": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
    "small": dict(vocab_size=4001, hidden_size=256, intermediate_size=683, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
}


def _qwen2_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    """The state-dict keys and shapes of Qwen2ForCausalLM (what model.state_dict() holds), without transformers."""
    h, i, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    hd = h // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * hd
    out = {"model.embed_tokens.weight": (v, h)}
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out |= {p + "self_attn.q_proj.weight": (h, h), p + "self_attn.q_proj.bias": (h,),
                p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.k_proj.bias": (kv,),
                p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.v_proj.bias": (kv,),
                p + "self_attn.o_proj.weight": (h, h), p + "mlp.gate_proj.weight": (i, h),
                p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i),
                p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)}
    out["model.norm.weight"] = (h,)
    out["lm_head.weight"] = (v, h)
    return out


def build_checkpoint(actor: Path, size: str, world_size: int) -> int:
    """Write rank files, fsdp_config.json and huggingface/; return the bytes of the model rank files."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from transformers import GenerationConfig, Qwen2Config

    from tests.fsdp_writer import build_tokenizer

    cfg = SHAPES[size]
    actor.mkdir(parents=True, exist_ok=True)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("fsdp",))
    shapes = _qwen2_shapes(cfg)
    gen = torch.Generator().manual_seed(0)
    for r in range(world_size):  # one rank's slice at a time: memory stays ~1/W of the model
        sd = {}
        for k, shape in shapes.items():
            if k == "lm_head.weight" and cfg["tie_word_embeddings"]:
                sd[k] = sd["model.embed_tokens.weight"]  # one storage, as FSDP2's tied params are saved
                continue
            local_rows = torch.arange(shape[0]).chunk(world_size)
            rows = local_rows[r].numel() if r < len(local_rows) else 0
            local = torch.empty((rows, *shape[1:])).uniform_(-0.05, 0.05, generator=gen)
            stride = torch.empty(shape, device="meta").stride()
            sd[k] = DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=torch.Size(shape),
                                       stride=stride)
        torch.save(sd, actor / f"model_world_size_{world_size}_rank_{r}.pt")
        del sd
    dist.destroy_process_group()
    (actor / "fsdp_config.json").write_text(json.dumps({"FSDP_version": 2, "world_size": world_size}))
    hf = actor / "huggingface"
    config = Qwen2Config(**cfg, max_position_embeddings=4096, bos_token_id=2, eos_token_id=1)
    config.architectures = ["Qwen2ForCausalLM"]
    config.dtype = "bfloat16"
    config.save_pretrained(hf)
    GenerationConfig(eos_token_id=[1, 5], temperature=0.7, top_p=0.8, do_sample=True).save_pretrained(hf)
    build_tokenizer(cfg["vocab_size"]).save_pretrained(hf)
    return sum(p.stat().st_size for p in actor.glob("model_world_size_*.pt"))


_FLOOR = r"""
import os, sys, torch  # pay the same interpreter + torch start-up as the contenders
files, out, nbytes = sys.argv[1:-2], sys.argv[-2], int(sys.argv[-1])
buf = bytearray(64 << 20)
view = memoryview(buf)
for f in files:
    with open(f, "rb", buffering=0) as fh:
        while fh.readinto(buf):
            pass
with open(out, "wb", buffering=0) as fh:
    while nbytes > 0:
        nbytes -= fh.write(view[: min(len(buf), nbytes)])
"""


# Linux carries a process's peak RSS across fork and exec (the child's ru_maxrss starts at its parent's high-water
# mark), so a benchmark that built a multi-GB checkpoint in-process would see that figure for every command it
# measures. A bare interpreter (no imports, ~10 MB) forks and execs the command instead, and reports its peak.
_LAUNCHER = """import os, sys
pid = os.fork()
if pid == 0:
    os.execvpe(sys.argv[1], sys.argv[1:], os.environ)
_, status, usage = os.wait4(pid, 0)
sys.stderr.write(f"\\n__maxrss_kb={usage.ru_maxrss}\\n")
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""


def run_measured(cmd: list[str], env: dict[str, str]) -> tuple[float, int, int]:
    """Run ``cmd``; return (wall seconds, peak RSS bytes of that command alone, exit code)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-S", "-c", _LAUNCHER, *cmd], cwd=ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wall = time.perf_counter() - t0
    err, _, rss = proc.stderr.decode().rpartition("__maxrss_kb=")
    if proc.returncode != 0:
        print(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{err[-3000:]}", file=sys.stderr)
    return wall, int(rss.strip() or 0) * 1024, proc.returncode


def _dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.glob("*.safetensors"))


def _same_tensors(a: Path, b: Path, keys: list[str]) -> bool:
    import torch
    from safetensors import safe_open

    def find(d: Path, k: str):
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(f, framework="pt") as h:
                if k in h.keys():
                    return h.get_tensor(k)
        raise KeyError(k)

    return all(torch.equal(find(a, k), find(b, k)) for k in keys)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="a few-MB checkpoint (W=2) instead of Qwen2.5-1.5B (W=8)")
    p.add_argument("--world-size", type=int, default=None)
    p.add_argument("--work-dir", type=Path, default=None, help="scratch folder (default: a temp dir, removed)")
    p.add_argument("--keep", action="store_true", help="keep the work dir (reuse its checkpoint next time)")
    p.add_argument("--skip-verl", action="store_true", help="do not run veRL's merger")
    p.add_argument("--repeat", type=int, default=1, help="runs of each contender, round-robin; the median is shown")
    p.add_argument("--build-only", type=Path, default=None, metavar="ACTOR_DIR", help=argparse.SUPPRESS)
    p.add_argument("--compare", nargs=2, type=Path, default=None, metavar="DIR", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    # This process stays lean (no torch): a child's peak RSS counts the parent's memory at fork time, so building
    # the input and comparing outputs run in children of their own.
    if args.build_only:
        build_checkpoint(args.build_only, "small" if args.small else "full", args.world_size)
        return 0
    if args.compare:
        some = ["model.embed_tokens.weight", "model.layers.0.mlp.down_proj.weight", "model.norm.weight"]
        print(f"engine output == veRL output on {len(some)} tensors: {_same_tensors(*args.compare, some)}")
        return 0
    size = "small" if args.small else "full"
    world = args.world_size or (2 if args.small else 8)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench_consolidate_"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    try:
        actor = work / f"{size}_w{world}" / "global_step_1" / "actor"
        files = sorted(actor.glob(f"model_world_size_{world}_rank_*.pt"))
        if len(files) != world:
            t0 = time.perf_counter()
            shutil.rmtree(actor, ignore_errors=True)
            subprocess.run([sys.executable, __file__, "--build-only", str(actor), "--world-size", str(world)]
                           + (["--small"] if args.small else []), cwd=ROOT, env=env, check=True)
            files = sorted(actor.glob(f"model_world_size_{world}_rank_*.pt"))
            print(f"built {size} checkpoint W={world} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        in_bytes = sum(f.stat().st_size for f in files)
        for f in files:  # warm the page cache, so every contender reads from memory
            with open(f, "rb") as fh:
                while fh.read(64 << 20):
                    pass

        out_engine, out_verl, floor_out = work / "out_engine", work / "out_verl", work / "floor.bin"
        engine_cmd = [sys.executable, "utils/load_fsdp_to_hf.py", str(actor), str(out_engine), "--format",
                      "safetensors", "--dtype", "bf16", "--quiet"]
        verl_cmd = [sys.executable, "-m", "verl.model_merger", "merge", "--backend", "fsdp", "--local_dir",
                    str(actor), "--target_dir", str(out_verl)]
        runs: dict[str, list[tuple[float, int]]] = {"engine (this repo)": [], "verl.model_merger": [], "I/O floor": []}
        out_bytes = 0
        # Round-robin repeats, median wall: on shared CPUs one run of each is mostly noise.
        for rep in range(args.repeat):
            for out in (out_engine, out_verl):
                shutil.rmtree(out, ignore_errors=True)
            wall, rss, rc = run_measured(engine_cmd, env)
            if rc != 0:
                return rc
            out_bytes = _dir_bytes(out_engine)
            runs["engine (this repo)"].append((wall, rss))
            if not args.skip_verl:
                wall, rss, rc = run_measured(verl_cmd, env)
                if rc != 0:
                    return rc
                runs["verl.model_merger"].append((wall, rss))
                if rep == 0:
                    subprocess.run([sys.executable, __file__, "--compare", str(out_engine), str(out_verl)], cwd=ROOT,
                                   env=env, check=True)
                shutil.rmtree(out_verl, ignore_errors=True)
            shutil.rmtree(out_engine, ignore_errors=True)
            wall, rss, rc = run_measured([sys.executable, "-c", _FLOOR, *map(str, files), str(floor_out),
                                          str(out_bytes)], env)
            floor_out.unlink(missing_ok=True)
            runs["I/O floor"].append((wall, rss))
        rows = [(name, statistics.median(w for w, _ in r), max(m for _, m in r), [w for w, _ in r])
                for name, r in runs.items() if r]

        print(f"input {in_bytes / 1e9:.2f} GB fp32 (W={world}, {size}) -> output {out_bytes / 1e9:.2f} GB bf16 "
              f"safetensors; {os.cpu_count()} CPUs")
        print(f"{'contender':<20} {'wall s':>8} {'GB/s in':>8} {'peak RSS GB':>12}   (median wall of {args.repeat}; "
              "each run's wall)")
        for name, wall, rss, walls in rows:
            print(f"{name:<20} {wall:>8.2f} {in_bytes / 1e9 / wall:>8.2f} {rss / 1e9:>12.2f}   "
                  f"{' '.join(f'{w:.1f}' for w in walls)}")
        eng = rows[0]
        if not args.skip_verl:
            verl = rows[1]
            print(f"engine vs veRL: throughput x{verl[1] / eng[1]:.2f} (target >= 2), peak RSS x{eng[2] / verl[2]:.2f} "
                  "(target <= 0.25)")
        print(f"engine vs I/O floor: wall x{eng[1] / rows[-1][1]:.2f} (target <= 1.3)")
        return 0
    finally:
        if not args.keep and args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
