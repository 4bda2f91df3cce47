"""Step-time overhead of ``hf_upload.strategy=every_save`` on the real CPU demo (target <= 5 %).

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_train_upload.py [--steps 8] [--repeats 1]

Runs ``train_grpo.py`` (the CPU demo config, a checkpoint every step) without uploads and with ``every_save``
uploads to the local Hub server (its own process), alternately, and compares veRL's own ``timing_s/step`` metric
(the training loop's step, save included; uploads run in a Ray task beside it). Step 1 (warm-up) is left out.
The tiny demo model makes each upload small, so this measures the cost of the upload machinery competing for the
same CPU cores (consolidation process, hashing, HTTP), not network bandwidth.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TOKEN = "hf_bench_local_token"
SMALL = ["data.train_batch_size=4", "actor_rollout_ref.actor.ppo_mini_batch_size=4",
         "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8",
         "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=8",
         "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=8", "reasoning_gym.val_size=4",
         "data.val_batch_size=4", "trainer.save_freq=1"]


def run(tmp: Path, name: str, steps: int, env: dict[str, str], extra: list[str]) -> tuple[dict[int, float], float]:
    """One training run; returns ({step: timing_s/step}, wall seconds)."""
    cmd = [sys.executable, str(ROOT / "train_grpo.py"), f"hydra.run.dir={tmp / name / 'hydra'}", *SMALL,
           f"trainer.total_training_steps={steps}", f"trainer.default_local_dir={tmp / name / 'ckpt'}", *extra]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    log = out.stdout + out.stderr
    (tmp / f"{name}.log").write_text(log)
    if out.returncode != 0:
        sys.exit(f"{name} failed (exit {out.returncode}); log: {tmp / f'{name}.log'}")
    times = {int(m.group(1)): float(m.group(2)) for m in re.finditer(r"\bstep:(\d+) - .*?timing_s/step:([\d.]+)", log)}
    return times, wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=1)
    args = p.parse_args()

    from benchmarks.bench_upload import start_server

    tmp = Path(tempfile.mkdtemp(prefix="bench-train-upload-"))
    server, url = start_server(tmp / "hub")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_ENDPOINT": url, "HF_HUB_DISABLE_XET": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HOME": str(tmp / "hf_home"), "HF_TOKEN": TOKEN}
    results: dict[str, list[float]] = {"no upload": [], "every_save": []}
    walls: dict[str, list[float]] = {"no upload": [], "every_save": []}
    try:
        for r in range(args.repeats):
            for name, extra in (("no upload", []),
                                ("every_save", ["hf_upload.enabled=true", f"hf_upload.repo_id=bench/every-save-{r}",
                                                "hf_upload.strategy=every_save"])):
                times, wall = run(tmp, f"{name.replace(' ', '_')}_{r}", args.steps, env, extra)
                results[name] += [t for s, t in times.items() if s > 1]
                walls[name].append(wall)
    finally:
        server.terminate()
    base, up = statistics.median(results["no upload"]), statistics.median(results["every_save"])
    print(f"CPU demo, {args.steps} steps x {args.repeats} run(s), checkpoint every step, steps 2..{args.steps}:")
    for name in results:
        print(f"  {name:>10}: median step {statistics.median(results[name]):.2f}s  "
              f"mean {statistics.mean(results[name]):.2f}s  run wall {statistics.mean(walls[name]):.0f}s")
    print(f"  overhead of every_save uploads on the median step time: {100 * (up / base - 1):+.1f}% (target <= 5%)")
    print(f"  logs: {tmp}")


if __name__ == "__main__":
    main()
