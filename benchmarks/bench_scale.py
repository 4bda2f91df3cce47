"""The scale table: consolidation and consolidate+upload time and peak RSS on synthetic veRL checkpoints of
Qwen2.5-0.5B/1.5B/3B shapes (fp32 shards, W=8), beside veRL's merger, the I/O floor and a plain
``HfApi.upload_folder``, all in the same run; then a linear fit and the extrapolation to 7B, 32B and 70B.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_scale.py --sizes 0.5B,1.5B,3B --repeat 3
    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_scale.py --sizes 1.5B --repeat 3 --json out/1.5B.json
    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_scale.py --fit out/0.5B.json out/1.5B.json out/3B.json

Each size is built, measured and deleted before the next one (3B fp32 shards are 12 GB; ``df -h`` first). Every
contender runs in its own subprocess (peak RSS from ``os.wait4``: that child alone), round-robin per repeat, from a
warm page cache; output: bf16 safetensors, 5 GB shards (``--max-shard-size 500MB``: smaller files, which the
pipelined upload sends while the next ones are written):

    floor            python + import torch, read every input byte once, write the output's byte count once
    engine           python utils/load_fsdp_to_hf.py ACTOR OUT --format safetensors --dtype bf16 --quiet
    verl merger      python -m verl.model_merger merge --backend fsdp --local_dir ACTOR --target_dir OUT
    engine+upload    HuggingFaceUploader(...).upload_from_checkpoint_dir(ACTOR): the pipelined shards -> Hub path
    upload_folder    HfApi.upload_folder of the engine's output (hash, then send) - the upload alone

Uploads go to the local Hub server of the tests (its own process, niced: the real Hub is remote), each into a
fresh repo (LFS objects belong to a repo), deleted right after. Targets (W=8 1.5B): engine <= 1.3x the
floor and >= 2.5x faster than veRL's merger; engine peak RSS <= 0.25x veRL's; engine+upload <= 1.15x
max(engine, upload_folder).
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

from benchmarks.bench_consolidate import _FLOOR, SHAPES, _qwen2_shapes, run_measured  # noqa: E402
from benchmarks.bench_upload import TOKEN, start_server  # noqa: E402

# Qwen2.5 shapes (all three tie their embeddings).
SIZES = {
    "small": SHAPES["small"],  # a few MB: a smoke run of the whole script (tests/test_consolidate_bench.py)
    "0.5B": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    "1.5B": SHAPES["full"],
    "3B": dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
               num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True),
}
EXTRAPOLATE = {"7B": 7.6e9, "32B": 32.8e9, "70B": 70.6e9}  # parameters (Qwen2.5-7B/32B, Llama-3-70B)

_UPLOAD = r"""
import sys
from utils.hf_uploader import HuggingFaceUploader
actor, repo, url, token, pipeline, staging, shard = sys.argv[1:8]
up = HuggingFaceUploader(repo, private=True, token=token, endpoint=url, weights_format="safetensors", dtype="bf16",
                         progress=False, pipeline=pipeline == "1", staging_dir=staging, max_shard_size=shard)
up.upload_from_checkpoint_dir(actor, step=1)
"""
_UPLOAD_FOLDER = r"""
import sys
from huggingface_hub import HfApi
folder, repo, url, token = sys.argv[1:5]
HfApi(endpoint=url, token=token).upload_folder(repo_id=repo, folder_path=folder, commit_message="Upload step 1")
"""


def n_params(size: str) -> int:
    cfg = SIZES[size]
    shapes = _qwen2_shapes(cfg)
    if cfg["tie_word_embeddings"]:
        shapes.pop("lm_head.weight")
    total = 0
    for s in shapes.values():
        n = 1
        for d in s:
            n *= d
        total += n
    return total


def build(actor: Path, size: str, world: int, env: dict[str, str]) -> None:
    code = ("import sys; from pathlib import Path; import benchmarks.bench_consolidate as b; "
            f"b.SHAPES['x'] = {SIZES[size]!r}; b.build_checkpoint(Path(sys.argv[1]), 'x', {world})")
    subprocess.run([sys.executable, "-c", code, str(actor)], cwd=ROOT, env=env, check=True)


def measure_size(size: str, work: Path, repeat: int, world: int, skip_verl: bool, env: dict[str, str],
                 shard: str = "5GB") -> dict:
    from huggingface_hub import HfApi

    actor = work / f"{size}_w{world}" / "global_step_1" / "actor"
    files = sorted(actor.glob(f"model_world_size_{world}_rank_*.pt"))
    if len(files) != world:
        shutil.rmtree(actor, ignore_errors=True)
        t0 = time.perf_counter()
        build(actor, size, world, env)
        files = sorted(actor.glob(f"model_world_size_{world}_rank_*.pt"))
        print(f"[{size}] built W={world} in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    in_bytes = sum(f.stat().st_size for f in files)
    for f in files:  # warm the page cache: every contender reads from memory
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass
    server, url = start_server(work / "hub")
    api = HfApi(endpoint=url, token=TOKEN)
    out_engine, out_verl, floor_out, staging = work / "out_engine", work / "out_verl", work / "floor.bin", work / "st"
    staging.mkdir(exist_ok=True)
    runs: dict[str, list[tuple[float, int]]] = {k: [] for k in
                                                ("floor", "engine", "verl merger", "engine+upload", "upload_folder")}
    out_bytes = out_files = 0
    try:
        for rep in range(repeat):
            shutil.rmtree(out_engine, ignore_errors=True)
            wall, rss, rc = run_measured([sys.executable, "utils/load_fsdp_to_hf.py", str(actor), str(out_engine),
                                          "--format", "safetensors", "--dtype", "bf16", "--max-shard-size", shard,
                                          "--quiet"], env)
            assert rc == 0
            runs["engine"].append((wall, rss))
            out_bytes = sum(p.stat().st_size for p in out_engine.glob("*.safetensors"))
            out_files = len(list(out_engine.glob("*.safetensors")))
            if not skip_verl:
                shutil.rmtree(out_verl, ignore_errors=True)
                wall, rss, rc = run_measured([sys.executable, "-m", "verl.model_merger", "merge", "--backend", "fsdp",
                                              "--local_dir", str(actor), "--target_dir", str(out_verl)], env)
                assert rc == 0
                runs["verl merger"].append((wall, rss))
                shutil.rmtree(out_verl, ignore_errors=True)
            wall, rss, rc = run_measured([sys.executable, "-c", _FLOOR, *map(str, files), str(floor_out),
                                          str(out_bytes)], env)
            floor_out.unlink(missing_ok=True)
            runs["floor"].append((wall, rss))
            for kind in ("upload_folder", "engine+upload") if rep % 2 else ("engine+upload", "upload_folder"):
                repo = f"bench/{kind.replace('+', '-')}-{rep}-{time.time_ns()}"
                api.create_repo(repo, private=True)  # preflight happens at trainer start, not at the final upload
                if kind == "upload_folder":
                    cmd = [sys.executable, "-c", _UPLOAD_FOLDER, str(out_engine), repo, url, TOKEN]
                else:
                    cmd = [sys.executable, "-c", _UPLOAD, str(actor), repo, url, TOKEN, "1", str(staging), shard]
                wall, rss, rc = run_measured(cmd, env)
                assert rc == 0
                runs[kind].append((wall, rss))
                api.delete_repo(repo)
            print(f"[{size}] repeat {rep + 1}/{repeat}: " + ", ".join(f"{k} {v[-1][0]:.1f}s" for k, v in runs.items()
                                                                         if v), file=sys.stderr, flush=True)
    finally:
        server.kill()
        server.wait()
        shutil.rmtree(work / "hub", ignore_errors=True)
        shutil.rmtree(out_engine, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)
    return {"size": size, "params": n_params(size), "world_size": world, "in_bytes": in_bytes, "out_bytes": out_bytes,
            "cpus": os.cpu_count(), "repeat": repeat, "max_shard_size": shard,
            "out_files": out_files,
            "runs": {k: {"walls": [w for w, _ in v], "wall": statistics.median(w for w, _ in v),
                         "peak_rss": max(r for _, r in v)} for k, v in runs.items() if v}}


def report(results: list[dict]) -> None:
    print(f"{'size':>5} {'params':>7} {'in GB':>6} | " + " | ".join(f"{k:>20}" for k in
          ("floor", "engine", "verl merger", "engine+upload", "upload_folder")) + "   (median wall s / peak RSS GB)")
    for r in results:
        cells = []
        for k in ("floor", "engine", "verl merger", "engine+upload", "upload_folder"):
            v = r["runs"].get(k)
            cells.append(f"{v['wall']:>9.1f} / {v['peak_rss'] / 1e9:>6.2f}" if v else f"{'-':>20}")
        print(f"{r['size']:>5} {r['params'] / 1e9:>6.2f}B {r['in_bytes'] / 1e9:>6.2f} | " + " | ".join(
            f"{c:>20}" for c in cells))
    for r in results:
        R = r["runs"]
        line = [f"{r['size']}: engine/floor x{R['engine']['wall'] / R['floor']['wall']:.2f} (<= 1.3)"]
        if "verl merger" in R:
            line.append(f"veRL/engine x{R['verl merger']['wall'] / R['engine']['wall']:.2f} (>= 2.5)")
            line.append(f"RSS engine/veRL x{R['engine']['peak_rss'] / R['verl merger']['peak_rss']:.2f} (<= 0.25)")
        if "engine+upload" in R and "upload_folder" in R:
            line.append(f"engine+upload/max(engine, upload_folder) x"
                        f"{R['engine+upload']['wall'] / max(R['engine']['wall'], R['upload_folder']['wall']):.2f} "
                        "(<= 1.15)")
        print("  " + "; ".join(line))
    if len(results) >= 2:
        fit(results)


def _linfit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    if var == 0:  # one size only: no slope to fit
        return my, 0.0
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var
    return my - b * mx, b


def fit(results: list[dict]) -> None:
    """Least-squares line per contender, wall = a + b * params (and peak RSS), extrapolated."""
    xs = [r["params"] for r in results]
    print(f"\nfit wall = a + b*params over {', '.join(r['size'] for r in results)}; extrapolated (2 CPUs, warm cache, "
          "local Hub):")
    print(f"{'contender':>15} {'a s':>6} {'s/B':>6} | " + " | ".join(f"{k:>22}" for k in EXTRAPOLATE))
    for k in ("floor", "engine", "verl merger", "engine+upload", "upload_folder"):
        if not all(k in r["runs"] for r in results):
            continue
        a, b = _linfit(xs, [r["runs"][k]["wall"] for r in results])
        ra, rb = _linfit(xs, [r["runs"][k]["peak_rss"] for r in results])
        cells = [f"{a + b * p:>8.0f} s {max(ra + rb * p, 0) / 1e9:>7.1f} GB" for p in EXTRAPOLATE.values()]
        print(f"{k:>15} {a:>6.1f} {b * 1e9:>6.1f} | " + " | ".join(f"{c:>22}" for c in cells))
    print("temporary disk of engine+upload: the bf16 output once (2 B/param; pre-upload hard-links, no copy): "
          + ", ".join(f"{n} {p * 2 / 1e9:.0f} GB" for n, p in EXTRAPOLATE.items())
          + "; input fp32 shards 4 B/param: " + ", ".join(f"{n} {p * 4 / 1e9:.0f} GB" for n, p in EXTRAPOLATE.items()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="0.5B,1.5B,3B")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--world-size", type=int, default=8)
    p.add_argument("--work-dir", type=Path, default=None, help="scratch folder (default: a temp dir, removed)")
    p.add_argument("--keep", action="store_true", help="keep the built checkpoints")
    p.add_argument("--skip-verl", action="store_true")
    p.add_argument("--max-shard-size", default="5GB",
                   help="largest output file for the engine, engine+upload and so upload_folder (default 5GB)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--fit", nargs="+", type=Path, default=None, metavar="JSON", help="only report saved results")
    args = p.parse_args(argv)
    if args.fit:
        results = [r for f in args.fit for r in json.loads(f.read_text())]
        report(sorted(results, key=lambda r: r["params"]))
        return 0
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench_scale_"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1",
               HF_HOME=os.environ.get("HF_HOME") or tempfile.mkdtemp(prefix="bench-hf-home-"))
    env.pop("HF_TOKEN", None)
    results = []
    try:
        for size in args.sizes.split(","):
            results.append(measure_size(size, work, args.repeat, args.world_size, args.skip_verl, env,
                                        args.max_shard_size))
            if not args.keep:
                shutil.rmtree(work / f"{size}_w{args.world_size}", ignore_errors=True)
            if args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(results, indent=1))
    finally:
        if not args.keep and args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    report(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
