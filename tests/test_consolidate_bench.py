"""The benchmark script keeps working: its --small size runs end to end (engine, veRL's merger, I/O floor).

Figures are printed, not asserted (timings on shared CPUs are noise); the full size is run by hand.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_benchmark_small_runs_and_prints_the_table(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/bench_consolidate.py", "--small", "--work-dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "engine output == veRL output on 3 tensors: True" in out
    for row in ["engine (this repo)", "verl.model_merger", "I/O floor", "engine vs veRL: throughput x",
                "engine vs I/O floor: wall x"]:
        assert row in out, out


@pytest.mark.slow
def test_scale_benchmark_small_runs_end_to_end(tmp_path):
    """benchmarks/bench_scale.py on the few-MB size: build, engine, floor, pipelined upload, upload_folder, table."""
    proc = subprocess.run([sys.executable, "benchmarks/bench_scale.py", "--sizes", "small", "--repeat", "1", "--world-size", "2",
                           "--skip-verl", "--work-dir", str(tmp_path), "--json", str(tmp_path / "r.json"),
                           "--max-shard-size", "1MB"],  # several files: the pipelined upload overlaps the writes
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = json.loads((tmp_path / "r.json").read_text())
    assert result["max_shard_size"] == "1MB" and result["out_files"] > 1, result
    assert "engine/floor x" in proc.stdout and "engine+upload/max(engine, upload_folder) x" in proc.stdout, proc.stdout
    fit = subprocess.run([sys.executable, "benchmarks/bench_scale.py", "--fit", str(tmp_path / "r.json"),
                          str(tmp_path / "r.json")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert fit.returncode == 0 and "70B" in fit.stdout, fit.stdout + fit.stderr
