"""The benchmark script keeps working: its --small size runs end to end (engine, veRL's merger, I/O floor).

Figures are printed, not asserted (timings on shared CPUs are noise); the full size is run by hand.
"""

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
